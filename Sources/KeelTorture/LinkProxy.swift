// A TCP proxy for one peer link (node A dialing node B), so the torture run can cut it. Keel's
// peer transport carries frames one way per connection (the dialer sends), so the proxy that A
// dials to reach B carries exactly A's messages to B: cutting it is a one-way cut, and cutting
// both directions between two groups is a partition.
//
// A cut closes every forwarded connection and refuses new ones (the dialer sees a reset and
// retries with backoff) until the link is restored.

import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// Forwards connections to 127.0.0.1:`target` until cut.
final class LinkProxy: Sendable {
    let target: Int
    private let group: any EventLoopGroup
    private let state = NIOLockedValueBox(State())

    private struct State {
        var server: (any Channel)?
        var cut = false
        var channels: [ObjectIdentifier: any Channel] = [:]
        var port = 0
    }

    init(target: Int, group: any EventLoopGroup) {
        self.target = target
        self.group = group
    }

    /// The port to dial instead of the target's.
    var port: Int { state.withLockedValue { $0.port } }

    func start() throws {
        let target = self.target
        let server = try ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { [self] inbound in
                if state.withLockedValue({ $0.cut }) { return inbound.close() }
                return ClientBootstrap(group: inbound.eventLoop)
                    .connectTimeout(.seconds(2))
                    .connect(host: "127.0.0.1", port: target)
                    .flatMap { [self] outbound in
                        let admitted = state.withLockedValue { state -> Bool in
                            guard !state.cut else { return false }
                            state.channels[ObjectIdentifier(inbound)] = inbound
                            state.channels[ObjectIdentifier(outbound)] = outbound
                            return true
                        }
                        guard admitted else {
                            outbound.close(promise: nil)
                            return inbound.close()
                        }
                        for channel in [inbound, outbound] {
                            channel.closeFuture.whenComplete { [self] _ in
                                _ = state.withLockedValue { $0.channels.removeValue(forKey: ObjectIdentifier(channel)) }
                            }
                        }
                        return inbound.pipeline.addHandler(Forwarder(peer: outbound)).flatMap {
                            outbound.pipeline.addHandler(Forwarder(peer: inbound))
                        }.map {
                            // Active channels start reading here; one not yet active reads when it becomes so.
                            if outbound.isActive { outbound.read() }
                            if inbound.isActive { inbound.read() }
                        }
                    }
            }
            .bind(host: "127.0.0.1", port: 0).wait()
        state.withLockedValue {
            $0.server = server
            $0.port = server.localAddress?.port ?? 0
        }
    }

    /// Closes every forwarded connection and refuses new ones until `restore()`.
    func cut() {
        let channels = state.withLockedValue { state -> [any Channel] in
            state.cut = true
            defer { state.channels = [:] }
            return Array(state.channels.values)
        }
        for channel in channels { channel.close(promise: nil) }
    }

    func restore() { state.withLockedValue { $0.cut = false } }

    var isCut: Bool { state.withLockedValue { $0.cut } }

    func stop() {
        cut()
        let server = state.withLockedValue { $0.server }
        try? server?.close().wait()
    }

    /// Copies bytes to the peer channel, reading on only once the peer has taken them (so a
    /// stopped receiver slows the sender as a direct connection would); closes the peer when this
    /// side closes.
    private final class Forwarder: ChannelInboundHandler, Sendable {
        typealias InboundIn = ByteBuffer
        let peer: any Channel
        init(peer: any Channel) { self.peer = peer }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            peer.write(unwrapInboundIn(data), promise: nil)
        }

        func channelReadComplete(context: ChannelHandlerContext) {
            let loopBound = NIOLoopBound(context, eventLoop: context.eventLoop)
            peer.writeAndFlush(ByteBuffer()).whenComplete { result in
                switch result {
                case .success: loopBound.value.read()
                case .failure: loopBound.value.close(promise: nil)
                }
            }
        }

        func channelActive(context: ChannelHandlerContext) { context.read() }
        func channelInactive(context: ChannelHandlerContext) { peer.close(promise: nil) }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
    }
}
