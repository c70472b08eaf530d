// The settings of a Raft node, with the bounds on what it sends and buffers.

import KeelCore

/// How linearizable reads are confirmed.
public enum ReadConsistency: Sendable, Equatable {
    /// ReadIndex (dissertation §6.4): the leader confirms it still leads with a round of heartbeats.
    case readIndex
    /// Lease (§6.4.1): the leader answers at once while check-quorum says it leads. Allowed only
    /// with `checkQuorum`; it trusts bounded clock drift.
    case lease
}

/// Faults that can be switched on to prove the checkers catch them. Never set outside tests.
public struct RaftFaults: Sendable, Equatable {
    /// A follower grants a vote even after voting for another candidate in the same term (breaks §5.2).
    public var voteTwiceInTerm = false
    /// Commit by counting replicas of entries from older terms (breaks §5.4.2), and skip the
    /// no-op a new leader appends (which would otherwise hide the fault, as in the paper's Figure 8).
    public var commitEntriesOfOlderTerms = false
    /// Answer read-index requests at once from the local commit index, on any node (breaks §6.4).
    public var readWithoutReadIndex = false

    public init() {}
}

/// The settings of one node.
public struct RaftConfiguration: Sendable, Equatable {
    /// This node.
    public var id: NodeID
    /// Ticks without a leader's word before a follower campaigns; the actual timeout is random in
    /// `electionTicks..<2*electionTicks`.
    public var electionTicks = 10
    /// Ticks between a leader's heartbeats.
    public var heartbeatTicks = 1
    /// Pre-vote (dissertation §9.6): campaign only after a majority says it would vote.
    public var preVote = true
    /// Check-quorum (§6.2): a leader steps down after an election timeout without hearing from a
    /// majority, and followers that hear from a leader ignore vote requests (§4.2.3).
    public var checkQuorum = true
    /// How reads are confirmed.
    public var readConsistency = ReadConsistency.readIndex
    /// The most bytes of entries in one AppendEntries.
    public var messageSizeMax = 1 << 20
    /// The most entries in one AppendEntries.
    public var messageEntriesMax = 1024
    /// The most AppendEntries in flight to one follower (pipelining).
    public var inflightAppendsMax = 256
    /// The most bytes of snapshot in one InstallSnapshot chunk.
    public var snapshotChunkSizeMax = 1 << 20
    /// The most bytes of proposals not yet committed that a leader accepts.
    public var uncommittedSizeMax = 64 << 20
    /// The most read requests a leader keeps waiting.
    public var pendingReadsMax = 4096
    /// Faults for checker tests.
    public var faults = RaftFaults()

    public init(id: NodeID) { self.id = id }

    /// Checks the settings.
    public func validate() throws(RaftError) {
        guard id.rawValue != 0 else { throw .invalidConfiguration("node id 0 is reserved") }
        guard heartbeatTicks > 0, electionTicks > heartbeatTicks else {
            throw .invalidConfiguration("the election timeout (\(electionTicks) ticks) must be longer than the heartbeat (\(heartbeatTicks))")
        }
        guard readConsistency == .readIndex || checkQuorum else {
            throw .invalidConfiguration("lease reads need check-quorum")
        }
        guard messageSizeMax > 0, messageEntriesMax > 0, inflightAppendsMax > 0, snapshotChunkSizeMax > 0 else {
            throw .invalidConfiguration("message, inflight and chunk limits must be positive")
        }
    }
}

/// Errors from the calls a caller makes on a node.
public enum RaftError: Error, Sendable, Equatable, CustomStringConvertible {
    /// No leader is known, so the proposal or read cannot go anywhere. Try again after an election.
    case noLeader
    /// The call must be made on the leader; this node is not it (the leader it knows, if any).
    case notLeader(NodeID?)
    /// The leader is handing over to another node and takes no proposals meanwhile.
    case leadershipTransferInProgress
    /// This node is not a member.
    case notMember
    /// A membership change is already under way; one at a time.
    case configurationChangeInProgress
    /// The leader has not yet committed an entry of its term, so it may not start a change.
    case leaderNotReady
    /// Too many proposals or reads are waiting.
    case overloaded
    /// A setting outside its range.
    case invalidConfiguration(String)
    /// A message that is malformed or from a node that is not a member.
    case invalidMessage(String)

    public var description: String {
        switch self {
        case .noLeader: "raft: no leader is known"
        case .notLeader(let leader): "raft: this node is not the leader" + (leader.map { " (node \($0) is)" } ?? "")
        case .leadershipTransferInProgress: "raft: leadership is being transferred"
        case .notMember: "raft: this node is not a member"
        case .configurationChangeInProgress: "raft: a membership change is already in progress"
        case .leaderNotReady: "raft: the leader has not committed an entry of its term yet"
        case .overloaded: "raft: too many requests are waiting"
        case .invalidConfiguration(let message): "raft: invalid configuration: \(message)"
        case .invalidMessage(let message): "raft: invalid message: \(message)"
        }
    }
}
