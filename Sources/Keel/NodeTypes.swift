// The public vocabulary of a Keel node: its state machine, its settings, its errors, its status.

import KeelCore
import KeelRaft
import KeelStorage

/// The state a node replicates. Every node applies the same commands in the same order, so
/// `apply` must be deterministic: the same state and command give the same state and result on
/// every machine (no clocks, no randomness, no iteration over unordered collections).
///
/// A node calls these one at a time, never two at once: `apply` on its event loop or, for a
/// leader's large batches, on its apply thread (`NodeConfiguration.applyOffLoopBytes`);
/// `snapshot()` and `restore(from:)` on the loop, when nothing is applied elsewhere. Reach the
/// machine only through the node's calls (`read`, `readDirectly`, `inspect`), which hold the lock
/// `apply` holds.
public protocol StateMachine: AnyObject, SendableMetatype {
    /// A frozen copy of the state that can be written out on another thread while `apply` goes on.
    /// Make it O(1): a copy-on-write value such as `TreeDictionary` (swift-collections) is one.
    associatedtype Snapshot: CheckpointSource

    /// Applies a committed command and returns its result (given to the caller of `propose`).
    func apply(_ command: [UInt8]) -> [UInt8]

    /// `apply(_:)` for a command that is part of a larger buffer (the log entry it came in),
    /// without copying it out first. The default copies it and calls `apply(_:)`; a machine that
    /// can read a slice implements this as well (both must give the same result).
    func apply(_ command: ArraySlice<UInt8>) -> [UInt8]

    /// A hint that these committed commands are about to be applied, in this order: a machine may
    /// start loading what they will touch into the cache (so that the misses of many commands
    /// overlap). It must not change the state. The default does nothing.
    func willApply(_ commands: [ArraySlice<UInt8>])

    /// The state as of the last applied command. Called on the loop; written out off the loop.
    func snapshot() -> Snapshot

    /// Replaces the whole state with a snapshot's bytes (what a `Snapshot` wrote).
    func restore(from bytes: [UInt8]) throws
}

extension StateMachine {
    public func apply(_ command: ArraySlice<UInt8>) -> [UInt8] { apply(Array(command)) }
    public func willApply(_ commands: [ArraySlice<UInt8>]) {}
}

/// How current a read must be.
public enum Consistency: Sendable, Equatable {
    /// Reflects every write acknowledged before the read began, on any node (ReadIndex: the
    /// leader confirms it still leads with a round of heartbeats).
    case linearizable
    /// As `linearizable`, but the leader confirms its leadership by its lease instead of a round
    /// trip. Correct as long as clocks tick at about the same rate (see docs/raft.md).
    case lease
    /// This node's state as it is: fast, possibly stale (it may miss recent writes), never
    /// a write that was not committed.
    case local
}

/// Errors a node's callers see.
public enum NodeError: Error, Sendable, Equatable, CustomStringConvertible {
    /// No leader is known; try again after an election.
    case noLeader
    /// The call must go to the leader (the one this node knows, if any).
    case notLeader(NodeID?)
    /// This node is not a member of the cluster (it was removed, or has not joined yet).
    case notMember
    /// The node is shutting down or stopped.
    case shuttingDown
    /// The node's storage failed (a failed fsync): it has stopped.
    case storageFailed(String)
    /// The request did not complete in time (the outcome of a write is then unknown).
    case timedOut
    /// The leader changed while the request waited: a read can be retried; a write's outcome is
    /// unknown (it may still commit under the new leader).
    case leaderChanged
    /// The disk is full: the write was not made durable here. Reads go on; writes are accepted
    /// again once there is room.
    case noSpace(String)
    /// A setting or an argument outside what is allowed.
    case invalidArgument(String)
    /// Raft refused the request (for example a membership change while another is under way).
    case refused(String)
    /// The node restarted its Raft core (after a full disk) while the write waited, after the
    /// write had been handed to Raft: its outcome is unknown (it may still commit).
    case interrupted(String)

    public var description: String {
        switch self {
        case .noLeader: "keel: no leader is known"
        case .notLeader(let leader): "keel: this node is not the leader" + (leader.map { " (node \($0) is)" } ?? "")
        case .notMember: "keel: this node is not a member of the cluster"
        case .shuttingDown: "keel: the node is shutting down"
        case .storageFailed(let reason): "keel: storage failed, the node has stopped: \(reason)"
        case .timedOut: "keel: timed out; the outcome is unknown"
        case .leaderChanged: "keel: the leader changed while the request waited; the outcome is unknown"
        case .noSpace(let reason): "keel: the disk is full; the write was refused (\(reason))"
        case .invalidArgument(let reason): "keel: invalid argument: \(reason)"
        case .refused(let reason): "keel: refused: \(reason)"
        case .interrupted(let reason): "keel: interrupted (\(reason)); the outcome is unknown"
        }
    }

    init(_ error: RaftError) {
        switch error {
        case .noLeader: self = .noLeader
        case .notLeader(let leader): self = .notLeader(leader)
        case .notMember: self = .notMember
        case .invalidConfiguration(let reason): self = .invalidArgument(reason)
        default: self = .refused(error.description)
        }
    }
}

/// How to run a node.
public struct NodeConfiguration: Sendable {
    /// This node's id (not 0).
    public var node: NodeID
    /// Where its log and checkpoints live (created if missing).
    public var dataDirectory: String
    /// Where the members listen for peers, this node included. For a new cluster (`join` false)
    /// these are its voters; a node that joins a running cluster lists the members it can reach.
    public var members: [NodeID: PeerAddress]
    /// Where to dial members, whatever the membership's records say (the log's and snapshots'
    /// addresses, and `members`): a route through a proxy or a tunnel. Empty by default.
    public var routes: [NodeID: PeerAddress] = [:]
    /// Whether this node joins a running cluster (after a member called `addLearner` or
    /// `addMember` for it) instead of founding one. A joining node learns the membership and the
    /// state from the leader.
    public var join = false
    /// A secret every peer presents; connections without it are refused.
    public var clusterToken: [UInt8]
    /// Milliseconds per Raft tick (the election timeout is 10 to 20 ticks).
    public var tickMilliseconds: Int64 = 50
    /// Milliseconds a proposal, read or membership change may wait.
    public var requestTimeoutMilliseconds: Int64 = 5000
    /// Take a snapshot (a checkpoint, then log compaction) after this many applied entries.
    public var snapshotInterval: UInt64 = 10_000
    /// Also take one once this node's log has grown by this many bytes since the last checkpoint
    /// (0: no such trigger). What the log held after that checkpoint when the node started counts.
    public var snapshotLogBytes: UInt64 = 0
    /// A snapshot that `snapshotInterval` or `snapshotLogBytes` makes due waits until the log
    /// written since the last checkpoint is also at least this percentage of that checkpoint's
    /// file size (0: no such wait). This bounds the checkpoint bytes written per log byte on a
    /// large state (100: at most one checkpoint byte per log byte) at the cost of a longer log to
    /// replay at restart (up to this percentage of the checkpoint). `checkpoint()` does not wait.
    public var snapshotLogGrowthPercent: UInt64 = 0
    /// The largest command `propose` accepts, in bytes: an entry must fit in one peer message
    /// (under the transport's 16 MiB frame limit) to reach the other nodes.
    public var commandSizeMax = 8 << 20
    /// A leader applies a Ready's committed commands on a thread of its own when they come to
    /// this many bytes or more (0: always on the loop), while its loop goes on reading, proposing
    /// and answering; later entries follow them there until that thread has caught up. Smaller
    /// batches are applied on the loop, with no hop between threads.
    public var applyOffLoopBytes = 16 << 10
    /// Promote a learner to voter once it is within `promotionLagEntries` of the leader's log.
    public var autoPromoteLearners = true
    public var promotionLagEntries: UInt64 = 100
    /// A leader that is the only voter (a single node, or one whose learners are catching up)
    /// writes and syncs each group commit on its loop, which waits for the disk as Redis's loop
    /// waits in its fsync, instead of handing it to the log's writer thread and taking the result
    /// back (`WriteAheadLog.write(entries:hardState:inline:completion:)`). Faster where the loop,
    /// the clients and the disk share few cores (docs/server.md, "The log's writes"). With other
    /// voters the writer thread is used whatever this says (a leader must go on taking their
    /// acknowledgements while it syncs); leave it off for a loop shared with work that must not
    /// wait for the disk. Needs the log's fsync `always`. Off by default; `keel serve` turns it
    /// on with its default fsync `always` (`--sync-on-loop no` leaves it off).
    public var syncOnLoop = false
    /// The log's settings. The fsync policy must be `always` (Raft's votes and acknowledged
    /// entries must survive a crash) unless `allowUnsyncedLog` is set.
    public var log = LogOptions()
    /// Accepts a log policy of `everysec` or `never`: writes are acknowledged before they are on
    /// disk. On one node a crash can lose the last writes (as Redis without `appendfsync always`);
    /// in a cluster it can also lose a vote and so break Raft's guarantees. Off by default.
    public var allowUnsyncedLog = false
    public var raft: RaftConfiguration

    /// A node of a new cluster whose voters are `members` (this node among them).
    public init(node: NodeID, dataDirectory: String, members: [NodeID: PeerAddress], clusterToken: [UInt8]) {
        self.node = node
        self.dataDirectory = dataDirectory
        self.members = members
        self.clusterToken = clusterToken
        raft = RaftConfiguration(id: node)
    }

    /// A single-node cluster that can add members later.
    public init(node: NodeID, dataDirectory: String, listen: PeerAddress, clusterToken: [UInt8]) {
        self.init(node: node, dataDirectory: dataDirectory, members: [node: listen], clusterToken: clusterToken)
    }

    /// Checks the settings.
    public func validate() throws(NodeError) {
        guard node.rawValue != 0 else { throw .invalidArgument("node id 0 is reserved") }
        guard members[node] != nil else { throw .invalidArgument("members must include this node's own address (node \(node))") }
        guard !members.keys.contains(NodeID(0)) else { throw .invalidArgument("node id 0 is reserved") }
        guard raft.id == node else { throw .invalidArgument("raft.id (\(raft.id)) differs from node (\(node))") }
        guard (1...60_000).contains(tickMilliseconds) else { throw .invalidArgument("tickMilliseconds must be in 1...60000") }
        guard requestTimeoutMilliseconds > 0 else { throw .invalidArgument("requestTimeoutMilliseconds must be positive") }
        guard (1...(UInt64(1) << 62)).contains(snapshotInterval) else { throw .invalidArgument("snapshotInterval must be in 1...2^62") }
        guard snapshotLogGrowthPercent <= 1_000_000 else { throw .invalidArgument("snapshotLogGrowthPercent must be at most 1000000") }
        guard applyOffLoopBytes >= 0 else { throw .invalidArgument("applyOffLoopBytes must not be negative") }
        guard promotionLagEntries <= UInt64(1) << 62 else { throw .invalidArgument("promotionLagEntries must be at most 2^62") }
        guard (1...(12 << 20)).contains(commandSizeMax) else { throw .invalidArgument("commandSizeMax must be in 1...12 MiB (a peer frame is at most 16 MiB)") }
        guard log.fsyncPolicy == .always || allowUnsyncedLog else {
            throw .invalidArgument("a node's log needs fsync `always` (a vote or an acknowledged entry must survive a crash); set allowUnsyncedLog to accept losing them")
        }
        guard !syncOnLoop || log.fsyncPolicy == .always else { throw .invalidArgument("syncOnLoop needs the log's fsync `always`") }
        guard !clusterToken.isEmpty else { throw .invalidArgument("the cluster token must not be empty") }
        do { try raft.validate() } catch { throw NodeError(error) }
    }
}

/// A member as a node sees it.
public struct MemberStatus: Sendable, Equatable {
    public var id: NodeID
    /// Where it listens for peers, if known.
    public var address: PeerAddress?
    public var isVoter: Bool
    /// The highest log index known to be on it (reported by the leader only).
    public var matchIndex: LogIndex?
}

/// A node's view of itself and its cluster.
public struct NodeStatus: Sendable, Equatable {
    public var id: NodeID
    public var role: Role
    public var term: Term
    public var leader: NodeID?
    public var commitIndex: LogIndex
    public var appliedIndex: LogIndex
    public var lastIndex: LogIndex
    /// The index of the newest snapshot (checkpoint) the log is compacted to.
    public var snapshotIndex: LogIndex
    /// Voters and learners, in id order.
    public var members: [MemberStatus]
    /// Why the node stopped, if it did (a failed fsync).
    public var stopped: String?
    /// Received snapshots this node refused because they did not verify (each time, its Raft
    /// core restarted from what is durable and the transfer began again).
    public var rejectedSnapshots: Int
}
