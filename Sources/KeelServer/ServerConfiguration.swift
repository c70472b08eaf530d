// The settings of `keel serve`.

import Keel
import NIOCore
import KeelCore
import KeelStorage

/// How `keel serve` runs.
public struct ServerConfiguration: Sendable {
    /// Where clients connect (127.0.0.1 unless told otherwise).
    public var bind = "127.0.0.1"
    public var port = 6379
    public var dataDirectory = "./keel-data"
    public var fsync = FsyncPolicy.always
    /// Every command but AUTH, HELLO and QUIT needs this password, when set.
    public var requirePassword: String?
    /// The HTTP port for /metrics, /health and the status page; 0 turns it off.
    public var httpPort = 0
    /// Applied entries between checkpoints.
    public var checkpointEntries: UInt64 = 1_000_000
    /// Log bytes written between checkpoints (as Redis rewrites its AOF at 64 MiB); 0 turns this
    /// trigger off.
    public var checkpointLogBytes: UInt64 = 64 << 20
    /// A checkpoint that either trigger makes due also waits until the log written since the last
    /// one is this percentage of that checkpoint's size (as Redis's auto-aof-rewrite-percentage);
    /// 0 turns this off.
    public var checkpointLogGrowth: UInt64 = 100
    /// The size at which a log segment is sealed and the next begun (64 MiB). Smaller segments
    /// rotate, and give disk space back, sooner; `keel torture` uses 1 MiB to meet a full disk.
    public var logSegmentBytes = 64 << 20
    public var limits = RESPLimits()
    /// The most client connections at once.
    public var maxClients = 10_000
    /// Seconds a client may send nothing and be sent nothing, with no request in progress, before
    /// its connection is closed (Redis's `timeout`); 0, the default, never.
    public var timeout = 0
    /// Seconds of silence after which the kernel probes a client connection (TCP keepalive, as
    /// Redis's `tcp-keepalive`, 300 by default: a client whose machine vanished is dropped after
    /// about 2 × this); 0 turns it off.
    public var tcpKeepalive = 300
    /// This node, and for a cluster where every member listens for peers (this node included).
    public var nodeID = NodeID(1)
    public var peerPort = 16379
    public var peers: [NodeID: PeerAddress] = [:]
    /// Where to dial members instead of the addresses the cluster records (`--peer-routes`).
    public var peerRoutes: [NodeID: PeerAddress] = [:]
    public var clusterToken = "keel"
    /// Join a running cluster (as a learner a member added) instead of founding one.
    public var join = false
    /// With fsync `always` on a single node, whether the node's loop writes and syncs each group
    /// commit itself, waiting for the disk as Redis's loop does (`--sync-on-loop yes`, the
    /// default), or hands it to the log's writer thread and goes on (`no`). With other voters
    /// the writer thread is used either way (`NodeConfiguration.syncOnLoop`).
    public var syncOnLoop = true
    /// Event loop threads for connections (clients and peers) and the node. With one everything
    /// runs on one loop and nothing hops between threads; more spread the connections (the node
    /// still runs on one of them). The log writes from its own thread either way (a single node
    /// with fsync `always`: from the node's loop, `syncOnLoop`). The default is half the cores
    /// (1 to 8), leaving the rest to the log writer, the kernel and clients.
    public var ioThreads = ServerConfiguration.defaultIOThreads

    /// Half the cores, at least 1 and at most 8.
    public static var defaultIOThreads: Int { min(8, max(1, System.coreCount / 2)) }
    /// Milliseconds per Raft tick.
    public var tickMilliseconds: Int64 = 50

    public init() {}

    /// The members this node starts with: the peers given, or just itself.
    var members: [NodeID: PeerAddress] {
        var members = peers
        if members[nodeID] == nil { members[nodeID] = PeerAddress(host: bind, port: peerPort) }
        return members
    }

    public func validate() throws(NodeError) {
        guard (0...65535).contains(port) else { throw .invalidArgument("--port must be in 0...65535") }
        guard (0...65535).contains(httpPort) else { throw .invalidArgument("--http-port must be in 0...65535") }
        guard (1...65535).contains(peerPort) else { throw .invalidArgument("--peer-port must be in 1...65535") }
        guard (1 << 20...1 << 30).contains(logSegmentBytes) else { throw .invalidArgument("--log-segment-bytes must be in 1048576...1073741824") }
        guard checkpointEntries >= 1 else { throw .invalidArgument("--checkpoint-entries must be at least 1") }
        guard checkpointLogGrowth <= 1_000_000 else { throw .invalidArgument("--checkpoint-log-growth must be in 0...1000000") }
        guard (1...128).contains(ioThreads) else { throw .invalidArgument("--io-threads must be in 1...128") }
        guard (1...1_000_000).contains(maxClients) else { throw .invalidArgument("--maxclients must be in 1...1000000") }
        guard (0...Int(Int32.max)).contains(timeout) else { throw .invalidArgument("--timeout must be in 0...2147483647") }
        guard (0...32767).contains(tcpKeepalive) else { throw .invalidArgument("--tcp-keepalive must be in 0...32767") }
        guard limits.bulkLengthMax >= 1, limits.multibulkLengthMax >= 1, limits.inlineLengthMax >= 16, limits.queryBufferMax >= 1024 else {
            throw .invalidArgument("protocol limits are too small")
        }
        guard nodeID.rawValue != 0 else { throw .invalidArgument("--node-id 0 is reserved") }
        if let password = requirePassword, password.isEmpty { throw .invalidArgument("--requirepass must not be empty") }
    }

    /// The node's settings.
    func nodeConfiguration() -> NodeConfiguration {
        var configuration = NodeConfiguration(node: nodeID, dataDirectory: dataDirectory, members: members, clusterToken: Array(clusterToken.utf8))
        configuration.join = join
        configuration.routes = peerRoutes
        configuration.snapshotInterval = checkpointEntries
        configuration.snapshotLogBytes = checkpointLogBytes
        configuration.snapshotLogGrowthPercent = checkpointLogGrowth
        configuration.tickMilliseconds = tickMilliseconds
        configuration.log.fsyncPolicy = fsync
        // With a sync for every write a single node's loop writes and syncs each group commit
        // itself, as Redis's does (docs/server.md, "The log's writes").
        configuration.syncOnLoop = syncOnLoop && fsync == .always
        configuration.log.segmentSize = logSegmentBytes
        configuration.allowUnsyncedLog = fsync != .always
        return configuration
    }
}
