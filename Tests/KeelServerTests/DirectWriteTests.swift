@testable import KeelServer
import Foundation
import NIOCore
import NIOEmbedded
import NIOPosix
import Synchronization
import Testing

/// Replies skip NIO's write path when the connection can name its socket's descriptor
/// (`RESPConnection.socketDescriptor(of:)`, found by reflection on NIO's channel). These tests
/// fail when the NIO in use no longer lets it be found, or when it finds the wrong socket.
@Suite("Direct writes to a connection's socket")
struct DirectWriteTests {
    /// Tells what `socketDescriptor(of:)` finds for each accepted channel.
    final class Finder: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let found: EventLoopPromise<CInt>
        init(found: EventLoopPromise<CInt>) { self.found = found }
        func channelActive(context: ChannelHandlerContext) {
            found.succeed(RESPConnection.socketDescriptor(of: context.channel))
            context.fireChannelActive()
        }
    }

    @Test("the descriptor found for accepted connections is their socket's")
    func findsTheSocket() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let loop = group.next()
        let promises = [loop.makePromise(of: CInt.self), loop.makePromise(of: CInt.self)]
        let next = Mutex(0)
        let server = try await ServerBootstrap(group: group)
            .childChannelInitializer { channel in
                let index = next.withLock { index in
                    defer { index += 1 }
                    return index
                }
                return channel.pipeline.addHandler(Finder(found: promises[index]))
            }
            .bind(host: "127.0.0.1", port: 0).get()
        // Closed whatever happens (a failed `#require` throws).
        var clients: [CInt] = []
        let outcome: Result<Void, any Error>
        do {
            let port = try #require(server.localAddress?.port)
            // Two clients: each connection's descriptor must reach its own client.
            for (index, promise) in promises.enumerated() {
                let client = try connect(port: port)
                clients.append(client)
                let descriptor = try await promise.futureResult.get()
                try #require(descriptor >= 0, "connection \(index): no descriptor found")
                let message = Array("hello \(index)\n".utf8)
                let sent = try await loop.submit { send(descriptor, message, message.count, RESPConnection.sendFlags) }.get()
                try #require(sent == message.count)
                #expect(receive(client, count: message.count) == message, "connection \(index): its client did not get the bytes")
            }
            outcome = .success(())
        } catch {
            outcome = .failure(error)
        }
        for client in clients { Foundation.close(client) }
        try? await server.close()
        try? await group.shutdownGracefully()
        try outcome.get()
    }

    @Test("a channel without a socket has no descriptor")
    func noSocket() throws {
        let channel = EmbeddedChannel()
        #expect(RESPConnection.socketDescriptor(of: channel) == -1)
        _ = try channel.finish()
    }

    /// A client socket connected to the port, whose reads give up after 10 seconds.
    func connect(port: Int) throws -> CInt {
        #if canImport(Glibc)
        let descriptor = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        #else
        let descriptor = socket(AF_INET, SOCK_STREAM, 0)
        #endif
        try #require(descriptor >= 0)
        var limit = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(descriptor, SOL_SOCKET, SO_RCVTIMEO, &limit, socklen_t(MemoryLayout<timeval>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let result = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                Foundation.connect(descriptor, $0, socklen_t(MemoryLayout<sockaddr_in>.size))
            }
        }
        if result != 0 { Foundation.close(descriptor) }
        try #require(result == 0)
        return descriptor
    }

    /// Up to `count` bytes, fewer if the socket closes or nothing comes for 10 seconds.
    func receive(_ descriptor: CInt, count: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var received = 0
        while received < count {
            let read = bytes.withUnsafeMutableBytes { recv(descriptor, $0.baseAddress! + received, count - received, 0) }
            if read <= 0 { break }
            received += read
        }
        return Array(bytes[..<received])
    }
}
