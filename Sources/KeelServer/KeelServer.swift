// `keel serve`: a Redis-protocol server on a Keel node whose state machine is the key-value store.
//
// Connections run on the server's event loops; writes become log entries proposed through the
// node (their replies come from `apply`), reads run on the node's loop at a read index (or at
// once for READONLY connections). The leader deletes expired keys through the log: those its
// reads meet, and those an active sweep finds every 100 ms.

import Foundation
import Keel
import KeelCore
import KeelKV
import KeelRaft
import KeelStorage
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

extension KVStore: StateMachine {}

/// Counters the server keeps for INFO and /metrics.
struct ServerStats {
    var connectionsReceived = 0
    var connectionsRejected = 0
    var commandsProcessed = 0
    var errorReplies = 0
    var expiredKeys = 0
    /// Log entries applied that carried the single writes of several clients (`WriteBatch`), and those writes.
    var sharedWriteEntries = 0
    var sharedWrites = 0
    /// Flushes of replies sent straight to the socket, and handed to the channel (`RESPConnection.flush`).
    var directWrites = 0
    var channelWrites = 0
    var lastCheckpointUnixSeconds: Int64 = 0
    var checkpointsTaken = 0
    /// The node's checkpoint index when the sweeper last looked (nil before it first did): a
    /// higher one is a checkpoint taken since (automatic, or received from the leader).
    var checkpointIndexSeen: UInt64?
    var writeLatency = LatencyHistogram()
    var readLatency = LatencyHistogram()
}

/// A running server.
public final class KeelServer: @unchecked Sendable {
    // @unchecked Sendable: `stats`, `clients` behind locks; the rest set once.
    public let configuration: ServerConfiguration
    /// The connections' loops (and the node's, with one thread).
    let group: MultiThreadedEventLoopGroup
    /// The node's own loop, with more than one thread.
    let nodeGroup: MultiThreadedEventLoopGroup?
    let node: KeelNode<KVStore>
    let logger: Logger
    let startedAt = Date()
    let stats = NIOLockedValueBox(ServerStats())
    let clients = NIOLockedValueBox([UInt64: ClientInfo]())
    private let nextClient = NIOLockedValueBox<UInt64>(1)
    private var channel: (any Channel)?
    private var httpChannel: (any Channel)?
    /// Each connection loop's direct reads of the current turn (see `ReadBatch`); set once.
    let readBatches: [ObjectIdentifier: ReadBatch]
    /// Each connection loop's single writes of the current turn (see `WriteBatch`); set once.
    let writeBatches: [ObjectIdentifier: WriteBatch]
    /// The HTTP port, when HTTP is on.
    public private(set) var localHTTPPort = 0
    private var sweeper: RepeatedTask?
    /// The address clients connect to (the port chosen when `port` was 0).
    public private(set) var localPort = 0

    init(configuration: ServerConfiguration, group: MultiThreadedEventLoopGroup, nodeGroup: MultiThreadedEventLoopGroup?,
         node: KeelNode<KVStore>, logger: Logger) {
        self.configuration = configuration
        self.group = group
        self.nodeGroup = nodeGroup
        self.node = node
        self.logger = logger
        var batches: [ObjectIdentifier: ReadBatch] = [:]
        var writes: [ObjectIdentifier: WriteBatch] = [:]
        for loop in group.makeIterator() {
            batches[ObjectIdentifier(loop)] = ReadBatch(loop: loop)
            writes[ObjectIdentifier(loop)] = WriteBatch(loop: loop, node: node)
        }
        readBatches = batches
        writeBatches = writes
        // As Redis: LASTSAVE starts at the start-up time.
        stats.withLockedValue { $0.lastCheckpointUnixSeconds = Int64(Date().timeIntervalSince1970) }
    }

    /// Recovers the data directory, starts the node and listens for clients.
    public static func start(configuration: ServerConfiguration, logger: Logger = Logger(label: "keel.serve")) async throws -> KeelServer {
        try configuration.validate()
        // With one thread, the node and every connection share its loop (nothing hops between
        // threads). With more, the node has a loop of its own (Raft, the log's completions,
        // applying) and the connections share the others (parsing, replies, direct reads).
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, configuration.ioThreads - 1))
        let nodeGroup = configuration.ioThreads > 1 ? MultiThreadedEventLoopGroup(numberOfThreads: 1) : nil
        let node: KeelNode<KVStore>
        do {
            node = try await KeelNode.start(configuration: configuration.nodeConfiguration(), machine: KVStore(), group: nodeGroup ?? group, logger: logger)
        } catch {
            try? await group.shutdownGracefully()
            try? await nodeGroup?.shutdownGracefully()
            throw error
        }
        let server = KeelServer(configuration: configuration, group: group, nodeGroup: nodeGroup, node: node, logger: logger)
        do {
            var bootstrap = ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 511)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            if configuration.tcpKeepalive > 0 {
                // As Redis: probes after `tcpKeepalive` seconds of silence, then every third of
                // that, and the connection is dropped after 3 unanswered.
                let idle = SocketOptionValue(configuration.tcpKeepalive)
                bootstrap = bootstrap
                    .childChannelOption(.socketOption(.so_keepalive), value: 1)
                    .childChannelOption(ChannelOptions.Types.SocketOption(level: .tcp, name: .init(rawValue: TCP_KEEPIDLE)), value: idle)
                    .childChannelOption(ChannelOptions.Types.SocketOption(level: .tcp, name: .init(rawValue: TCP_KEEPINTVL)), value: max(1, idle / 3))
                    .childChannelOption(ChannelOptions.Types.SocketOption(level: .tcp, name: .init(rawValue: TCP_KEEPCNT)), value: 3)
            }
            let timeout = configuration.timeout
            let channel = try await bootstrap
                .childChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture {
                        let authentication = AuthenticationLimits(limited: configuration.requirePassword != nil)
                        if timeout > 0 {
                            try channel.pipeline.syncOperations.addHandler(IdleStateHandler(allTimeout: .seconds(Int64(timeout))))
                        }
                        try channel.pipeline.syncOperations.addHandler(RESPConnection(server: server, authentication: authentication))
                    }
                }
                .bind(host: configuration.bind, port: configuration.port).get()
            server.channel = channel
            server.localPort = channel.localAddress?.port ?? configuration.port
        } catch {
            await node.shutdown()
            try? await group.shutdownGracefully()
            try? await nodeGroup?.shutdownGracefully()
            throw error
        }
        if configuration.httpPort > 0 {
            do {
                let http = try await server.startHTTP(port: configuration.httpPort)
                server.httpChannel = http
                server.localHTTPPort = http.localAddress?.port ?? configuration.httpPort
            } catch {
                try? await server.channel?.close()
                await node.shutdown()
                try? await group.shutdownGracefully()
                try? await nodeGroup?.shutdownGracefully()
                throw error
            }
        }
        server.startSweeper()
        logger.notice("keel serve: node \(configuration.nodeID.rawValue) listening for clients on \(configuration.bind):\(server.localPort), data in \(configuration.dataDirectory), fsync \(configuration.fsync.rawValue)")
        return server
    }

    /// Stops accepting, lets in-flight requests finish, syncs and closes.
    public func shutdown() async {
        sweeper?.cancel()
        try? await channel?.close()
        try? await httpChannel?.close()
        // Requests in flight finish (or fail with shuttingDown) inside node.shutdown().
        await node.shutdown()
        try? await group.shutdownGracefully()
        try? await nodeGroup?.shutdownGracefully()
    }

    /// Waits until the listening channel closes.
    public func waitUntilClosed() async {
        try? await channel?.closeFuture.get()
    }

    func newClientID() -> UInt64 {
        nextClient.withLockedValue { id in
            defer { id += 1 }
            return id
        }
    }

    /// Unix time in milliseconds.
    static func nowMilliseconds() -> Int64 {
        var time = timespec()
        clock_gettime(CLOCK_REALTIME, &time)
        return Int64(time.tv_sec) * 1000 + Int64(time.tv_nsec) / 1_000_000
    }

    // MARK: - Expiry

    /// Every 100 ms on the leader: up to 200 expired keys become one delete entry.
    private func startSweeper() {
        let loop = group.next()
        sweeper = loop.scheduleRepeatedAsyncTask(initialDelay: .milliseconds(100), delay: .milliseconds(100)) { [self] _ in
            let promise = loop.makePromise(of: Void.self)
            promise.completeWithTask { await self.sweep() }
            return promise.futureResult
        }
    }

    private func sweep() async {
        guard let status = try? await node.status() else { return }
        noteCheckpoint(at: status.snapshotIndex.rawValue)
        guard status.role == .leader else { return }
        let now = Self.nowMilliseconds()
        let keys: [ExpiredKey] = (try? await node.read(consistency: .local) { store -> [ExpiredKey] in
            var random = SystemRandomNumberGenerator()
            return store.sampleExpired(now: now, limit: 200, random: &random)
        }) ?? []
        await deleteExpired(keys)
    }

    /// Proposes the deletion of expired keys (the entry deletes each only if its expiry is
    /// still the one seen).
    func deleteExpired(_ keys: [ExpiredKey]) async {
        guard !keys.isEmpty else { return }
        let entry = KVEntry.expire(keys).encoded(now: Self.nowMilliseconds())
        if let reply = try? await node.propose(entry), case .integer(let removed) = Reply(decoding: reply) {
            stats.withLockedValue { $0.expiredKeys += Int(removed) }
        }
    }
}
