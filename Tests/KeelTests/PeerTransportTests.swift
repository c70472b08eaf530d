import Foundation
import Keel
import KeelCore
import KeelRaft
import Logging
import NIOCore
import NIOPosix
import Testing

final class Inbox: @unchecked Sendable {
    // @unchecked Sendable: `messages` is only touched under `lock`.
    private let lock = NSLock()
    private var messages: [Message] = []
    func append(_ message: Message) { lock.withLock { messages.append(message) } }
    var all: [Message] { lock.withLock { messages } }
}

/// Polls until `condition` holds or a generous deadline passes (a guard against hanging, not a
/// timing assertion).
func eventually(_ condition: () -> Bool) async throws -> Bool {
    for _ in 0..<1000 {
        if condition() { return true }
        try await Task.sleep(for: .milliseconds(10))
    }
    return condition()
}

let silentLogger = Logger(label: "keel.test") { _ in SwiftLogNoOpLogHandler() }

@Suite("Peer transport over loopback TCP", .serialized)
struct PeerTransportTests {
    func transport(_ node: UInt64, port: Int = 0, token: String = "secret", peers: [NodeID: PeerAddress] = [:],
                   group: any EventLoopGroup, inbox: Inbox) -> PeerTransport {
        var configuration = PeerTransportConfiguration(node: NodeID(node), listen: PeerAddress(host: "127.0.0.1", port: port), clusterToken: Array(token.utf8))
        configuration.reconnectDelayMinMilliseconds = 10
        configuration.reconnectDelayMaxMilliseconds = 100
        return PeerTransport(configuration: configuration, peers: peers, group: group, logger: silentLogger) { inbox.append($0) }
    }

    func heartbeats(_ terms: ClosedRange<UInt64>, from: UInt64 = 1, to: UInt64 = 2) -> [Message] {
        terms.map { Message(kind: .heartbeat, from: NodeID(from), to: NodeID(to), term: Term($0)) }
    }

    @Test("messages sent to a peer arrive, in order")
    func delivery() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let received = Inbox()
        let b = transport(2, group: group, inbox: received)
        let port = try await b.start()
        let a = transport(1, peers: [NodeID(2): PeerAddress(host: "127.0.0.1", port: port)], group: group, inbox: Inbox())
        try await a.start()
        a.send(heartbeats(1...200))
        #expect(try await eventually { received.all.count == 200 })
        #expect(received.all.map(\.term.rawValue) == Array(1...200))
        await a.shutdown()
        await b.shutdown()
        try await group.shutdownGracefully()
    }

    @Test("a peer presenting the wrong cluster token is refused and nothing it sends is delivered")
    func wrongToken() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let received = Inbox()
        let b = transport(2, token: "right", group: group, inbox: received)
        let port = try await b.start()
        let intruder = transport(1, token: "wrong", peers: [NodeID(2): PeerAddress(host: "127.0.0.1", port: port)], group: group, inbox: Inbox())
        intruder.send(heartbeats(1...5))
        try await Task.sleep(for: .milliseconds(300))
        #expect(received.all.isEmpty)
        // A message that claims another sender is dropped too.
        let honest = transport(1, token: "right", peers: [NodeID(2): PeerAddress(host: "127.0.0.1", port: port)], group: group, inbox: Inbox())
        honest.send([Message(kind: .heartbeat, from: NodeID(3), to: NodeID(2), term: Term(9))] + heartbeats(10...10))
        try await Task.sleep(for: .milliseconds(300))
        #expect(received.all.isEmpty, "the spoofed message closes the connection before the next one is read")
        // The honest peer's link notices the close, reconnects, and gets through (Raft resends; so does this test).
        #expect(try await eventually {
            honest.send(heartbeats(11...11))
            return received.all.contains { $0.term == Term(11) }
        })
        #expect(!received.all.contains { $0.from == NodeID(3) || $0.term == Term(10) })
        await intruder.shutdown()
        await honest.shutdown()
        await b.shutdown()
        try await group.shutdownGracefully()
    }

    @Test("a link reconnects with backoff after its peer restarts")
    func reconnect() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let first = Inbox()
        let b = transport(2, group: group, inbox: first)
        let port = try await b.start()
        let a = transport(1, peers: [NodeID(2): PeerAddress(host: "127.0.0.1", port: port)], group: group, inbox: Inbox())
        a.send(heartbeats(1...1))
        #expect(try await eventually { first.all.count == 1 })
        await b.shutdown()
        let second = Inbox()
        let restarted = transport(2, port: port, group: group, inbox: second)
        try await restarted.start()
        var term: UInt64 = 100
        let arrived = try await eventually {
            term += 1
            a.send(heartbeats(term...term))
            return !second.all.isEmpty
        }
        #expect(arrived)
        await a.shutdown()
        await restarted.shutdown()
        try await group.shutdownGracefully()
    }
}

@Suite("Peer transport limits")
struct PeerTransportLimitTests {
    @Test("before its hello a connection may send only a hello-sized frame")
    func helloSizedFirstFrame() throws {
        var big = Message(kind: .propose, from: NodeID(1), to: NodeID(2), term: .zero)
        big.entries = [Entry(index: .zero, term: .zero, data: [UInt8](repeating: 1, count: 5000))]
        var buffer = ByteBuffer(bytes: PeerFrameFormat.encode(.raft(big)))
        #expect(throws: PeerProtocolError.self) { try PeerFrameDecoder(expectingHello: true).decodeFrame(&buffer) }
        var hello = ByteBuffer(bytes: PeerFrameFormat.encode(.hello(node: NodeID(1), token: Array("t".utf8))))
        #expect(try PeerFrameDecoder(expectingHello: true).decodeFrame(&hello) != nil)
    }
}
