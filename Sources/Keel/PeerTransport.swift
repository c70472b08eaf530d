// The peer transport: Raft messages between nodes over TCP, on SwiftNIO.
//
// Each node listens on its peer port and dials every peer it sends to; each TCP connection
// carries frames one way (the dialer sends, the listener receives). The dialer's first frame is a
// hello with its node id and the cluster token; the listener closes (and logs) a connection whose
// token is wrong, and drops any Raft message whose sender is not the node that said hello.
//
// Sending never blocks and never waits: messages go to a per-peer link that lives on one event
// loop, are written as frames, and flushed once per call to `send` (batched). A link that is not
// connected keeps a bounded queue (oldest dropped first: Raft retransmits what matters) and
// reconnects with exponential backoff. Raft tolerates loss, so nothing here retries a message.

import KeelCore
import KeelRaft
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// Where a peer listens.
public struct PeerAddress: Sendable, Equatable, Hashable, CustomStringConvertible {
    public var host: String
    public var port: Int

    public init(host: String, port: Int) {
        self.host = host
        self.port = port
    }

    public var description: String { "\(host):\(port)" }
}

/// Settings of the peer transport.
public struct PeerTransportConfiguration: Sendable {
    /// This node.
    public var node: NodeID
    /// Where to listen for peers.
    public var listen: PeerAddress
    /// The token every peer must present.
    public var clusterToken: [UInt8]
    /// Frame and message bounds.
    public var limits = PeerLimits()
    /// Messages kept for a peer that is not connected; past it the oldest are dropped.
    public var queuedMessagesMax = 4096
    /// Accepted connections kept at once; more are closed at once.
    public var inboundConnectionsMax = 64
    /// Milliseconds an accepted connection may take to send its hello.
    public var helloTimeoutMilliseconds: Int64 = 5000
    /// Reconnect backoff, doubling from the first to the last, in milliseconds.
    public var reconnectDelayMinMilliseconds: Int64 = 50
    public var reconnectDelayMaxMilliseconds: Int64 = 2000

    public init(node: NodeID, listen: PeerAddress, clusterToken: [UInt8]) {
        self.node = node
        self.listen = listen
        self.clusterToken = clusterToken
    }
}

/// Sends and receives Raft messages over TCP.
public final class PeerTransport: Sendable {
    public let configuration: PeerTransportConfiguration
    let group: any EventLoopGroup
    let logger: Logger
    let deliver: @Sendable (Message) -> Void
    private let state: NIOLockedValueBox<State>

    struct State {
        var server: (any Channel)?
        /// Accepted connections, closed at shutdown.
        var inbound: [ObjectIdentifier: any Channel] = [:]
        var links: [NodeID: PeerLink] = [:]
        var addresses: [NodeID: PeerAddress] = [:]
        var closed = false
    }

    /// Creates a transport. `deliver` is called on an event loop for every well-formed message
    /// from an authenticated peer; it must not block.
    public init(configuration: PeerTransportConfiguration, peers: [NodeID: PeerAddress], group: any EventLoopGroup,
                logger: Logger = Logger(label: "keel.peer"), deliver: @escaping @Sendable (Message) -> Void) {
        self.configuration = configuration
        self.group = group
        self.logger = logger
        self.deliver = deliver
        state = NIOLockedValueBox(State(addresses: peers))
    }

    /// Starts listening. Returns the port actually bound (useful with port 0).
    @discardableResult
    public func start() async throws -> Int {
        let configuration = self.configuration
        let logger = self.logger
        let deliver = self.deliver
        let state = self.state
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                let key = ObjectIdentifier(channel)
                let accepted = state.withLockedValue { state -> Bool in
                    if state.closed || state.inbound.count >= configuration.inboundConnectionsMax { return false }
                    state.inbound[key] = channel
                    return true
                }
                guard accepted else { return channel.close() }
                channel.closeFuture.whenComplete { _ in state.withLockedValue { _ = $0.inbound.removeValue(forKey: key) } }
                return channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(
                        ByteToMessageHandler(PeerFrameDecoder(limits: configuration.limits, expectingHello: true)))
                    try channel.pipeline.syncOperations.addHandler(
                        PeerInboundHandler(token: configuration.clusterToken, node: configuration.node, logger: logger, deliver: deliver,
                                           helloTimeout: .milliseconds(configuration.helloTimeoutMilliseconds)))
                }
            }
            .bind(host: configuration.listen.host, port: configuration.listen.port)
            .get()
        state.withLockedValue { $0.server = channel }
        return channel.localAddress?.port ?? configuration.listen.port
    }

    /// Changes where peers listen (membership changes); links to removed peers are closed.
    public func updatePeers(_ peers: [NodeID: PeerAddress]) {
        let stale = state.withLockedValue { state -> [PeerLink] in
            state.addresses = peers
            let gone = state.links.filter { peers[$0.key] != $0.value.address }
            for id in gone.keys { state.links[id] = nil }
            return Array(gone.values)
        }
        for link in stale { link.close() }
    }

    /// Sends messages (in order per peer), without waiting. Messages to unknown peers are dropped.
    public func send(_ messages: [Message]) {
        var byPeer: [NodeID: [Message]] = [:]
        for message in messages { byPeer[message.to, default: []].append(message) }
        for (peer, batch) in byPeer {
            guard let link = link(to: peer) else {
                logger.debug("no address for node \(peer); dropped \(batch.count) messages")
                continue
            }
            link.send(batch)
        }
    }

    private func link(to peer: NodeID) -> PeerLink? {
        state.withLockedValue { state in
            if state.closed { return nil }
            if let link = state.links[peer] { return link }
            guard let address = state.addresses[peer] else { return nil }
            let link = PeerLink(peer: peer, address: address, configuration: configuration, eventLoop: group.next(), logger: logger)
            state.links[peer] = link
            return link
        }
    }

    /// Stops listening and closes every link.
    public func shutdown() async {
        let (server, links, inbound) = state.withLockedValue { state -> ((any Channel)?, [PeerLink], [any Channel]) in
            state.closed = true
            let links = Array(state.links.values)
            state.links = [:]
            return (state.server, links, Array(state.inbound.values))
        }
        for link in links { link.close() }
        for channel in inbound { channel.close(promise: nil) }
        if let server {
            do { try await server.close() } catch {
                logger.debug("closing the peer listener: \(error)")
            }
        }
    }
}

/// Receives frames from one dialing peer: a hello with the right token first, then Raft messages
/// from that peer only.
final class PeerInboundHandler: ChannelInboundHandler {
    typealias InboundIn = PeerFrame

    let token: [UInt8]
    let node: NodeID
    let logger: Logger
    let deliver: @Sendable (Message) -> Void
    let helloTimeout: TimeAmount
    private var peer: NodeID?
    /// Set once the connection is refused: frames already decoded from the same read are ignored.
    private var refused = false

    init(token: [UInt8], node: NodeID, logger: Logger, deliver: @escaping @Sendable (Message) -> Void, helloTimeout: TimeAmount) {
        self.token = token
        self.node = node
        self.logger = logger
        self.deliver = deliver
        self.helloTimeout = helloTimeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        // A connection that never says hello is closed.
        let loopBound = NIOLoopBound((self, context), eventLoop: context.eventLoop)
        context.eventLoop.scheduleTask(in: helloTimeout) {
            let (handler, context) = loopBound.value
            if handler.peer == nil { handler.refuse(context, "no hello within \(handler.helloTimeout)") }
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !refused else { return }
        switch unwrapInboundIn(data) {
        case .hello(let from, let presented):
            guard peer == nil else { return refuse(context, "a second hello") }
            guard constantTimeEquals(presented, secret: token) else { return refuse(context, "node \(from) presented a wrong cluster token") }
            peer = from
        case .raft(let message):
            guard let peer else { return refuse(context, "a Raft message before the hello") }
            guard message.from == peer, message.to == node else {
                return refuse(context, "node \(peer) sent a message from \(message.from) to \(message.to)")
            }
            deliver(message)
        }
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        refuse(context, "\(error)")
    }

    private func refuse(_ context: ChannelHandlerContext, _ reason: String) {
        guard !refused else { return }
        refused = true
        logger.warning("closing peer connection from \(context.remoteAddress?.description ?? "?"): \(reason)")
        context.close(promise: nil)
    }
}

/// The outbound connection to one peer, confined to one event loop.
final class PeerLink: @unchecked Sendable {
    // @unchecked Sendable: every mutable field is read and written only on `eventLoop`
    // (`send` and `close` hop onto it), and `address` and `peer` never change.
    let peer: NodeID
    let address: PeerAddress
    let configuration: PeerTransportConfiguration
    let eventLoop: any EventLoop
    let logger: Logger
    private var channel: (any Channel)?
    private var connecting = false
    private var closed = false
    private var queue: [Message] = []
    private var delay: Int64
    /// No connection attempt before this moment (backoff).
    private var nextAttempt = NIODeadline.uptimeNanoseconds(0)

    init(peer: NodeID, address: PeerAddress, configuration: PeerTransportConfiguration, eventLoop: any EventLoop, logger: Logger) {
        self.peer = peer
        self.address = address
        self.configuration = configuration
        self.eventLoop = eventLoop
        self.logger = logger
        delay = configuration.reconnectDelayMinMilliseconds
    }

    func send(_ messages: [Message]) {
        eventLoop.execute { self.sendOnLoop(messages) }
    }

    func close() {
        eventLoop.execute {
            self.closed = true
            self.queue = []
            self.channel?.close(promise: nil)
            self.channel = nil
        }
    }

    private func sendOnLoop(_ incoming: [Message]) {
        guard !closed else { return }
        // A frame the peer would refuse closes the link and everything behind it: drop it here.
        let messages = incoming.filter { message in
            let fits = message.size + 64 <= configuration.limits.frameSizeMax
            if !fits { logger.warning("dropping a \(message.kind) of about \(message.size) bytes to node \(peer): over the frame limit") }
            return fits
        }
        if let channel, channel.isActive {
            for message in messages { channel.write(PeerFrame.raft(message), promise: nil) }
            channel.flush()
            return
        }
        queue.append(contentsOf: messages)
        if queue.count > configuration.queuedMessagesMax { queue.removeFirst(queue.count - configuration.queuedMessagesMax) }
        connect()
    }

    private func connect() {
        guard !connecting, !closed, channel == nil, NIODeadline.now() >= nextAttempt else { return }
        connecting = true
        let limits = configuration.limits
        ClientBootstrap(group: eventLoop)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .connectTimeout(.seconds(2))
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(MessageToByteHandler(PeerFrameEncoder()))
                    // The listener never writes; a decoder here only notices a misbehaving one.
                    try channel.pipeline.syncOperations.addHandler(ByteToMessageHandler(PeerFrameDecoder(limits: limits)))
                }
            }
            .connect(host: address.host, port: address.port)
            .whenComplete { result in
                self.connecting = false
                switch result {
                case .success(let channel):
                    if self.closed {
                        channel.close(promise: nil)
                        return
                    }
                    if let local = channel.localAddress, local == channel.remoteAddress {
                        // Connecting to a stopped peer on this host can pick the peer's own port as
                        // the local one and connect to itself (TCP simultaneous open), which would
                        // keep the peer from binding its port again: drop it and retry later.
                        channel.close(promise: nil)
                        return self.retryLater(after: "a connection to itself")
                    }
                    self.channel = channel
                    let connectedAt = NIODeadline.now()
                    channel.write(PeerFrame.hello(node: self.configuration.node, token: self.configuration.clusterToken), promise: nil)
                    let pending = self.queue
                    self.queue = []
                    for message in pending { channel.write(PeerFrame.raft(message), promise: nil) }
                    channel.flush()
                    channel.closeFuture.whenComplete { _ in
                        self.eventLoop.execute {
                            if self.channel === channel {
                                self.channel = nil
                                // A connection that lasted was healthy: start the backoff over.
                                if NIODeadline.now() - connectedAt > .milliseconds(self.configuration.reconnectDelayMaxMilliseconds) {
                                    self.delay = self.configuration.reconnectDelayMinMilliseconds
                                }
                                // The peer closed us (restart, or it refused us): back off before the next try.
                                self.nextAttempt = .now() + .milliseconds(self.delay)
                                self.delay = min(self.delay * 2, self.configuration.reconnectDelayMaxMilliseconds)
                                if !self.queue.isEmpty {
                                    self.eventLoop.scheduleTask(deadline: self.nextAttempt) { self.connect() }
                                }
                            }
                        }
                    }
                case .failure(let error):
                    self.retryLater(after: "\(error)")
                }
            }
    }

    /// A failed attempt: the next one after the backoff delay (which doubles, up to its maximum).
    private func retryLater(after reason: String) {
        logger.debug("connecting to node \(peer) at \(address) failed: \(reason); retrying in \(delay) ms")
        nextAttempt = .now() + .milliseconds(delay)
        delay = min(delay * 2, configuration.reconnectDelayMaxMilliseconds)
        eventLoop.scheduleTask(deadline: nextAttempt) {
            if !self.queue.isEmpty { self.connect() }
        }
    }
}
