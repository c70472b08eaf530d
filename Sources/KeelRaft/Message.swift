// Raft's messages, one flat struct as etcd's raft does: which fields matter depends on the kind.

import KeelCore

/// The kinds of message between Raft nodes.
public enum MessageKind: String, Sendable, Equatable {
    /// AppendEntries (Raft §5.3): `index`/`logTerm` are prevLogIndex/prevLogTerm.
    case appendEntries
    /// Reply: `index` is the last index matched, or on reject `rejectHint`/`logTerm` guide the backtrack.
    case appendEntriesResponse
    /// RequestVote (§5.2): `index`/`logTerm` are the candidate's last index and term.
    case requestVote
    case requestVoteResponse
    /// Pre-vote (dissertation §9.6): as RequestVote, for `term`, without anyone changing term.
    case preVote
    case preVoteResponse
    /// Leader's heartbeat: `commit` (no more than the follower matches) and a read-index `context`.
    case heartbeat
    case heartbeatResponse
    /// InstallSnapshot (§7), one chunk: `snapshot`, `snapshotOffset`, `snapshotData`, `snapshotDone`.
    case installSnapshot
    /// Reply: `snapshotOffset` is the offset the follower expects next; `reject` if it cannot take it.
    case installSnapshotResponse
    /// Leadership transfer (dissertation §3.10): campaign now.
    case timeoutNow
    /// A follower asks the leader for a read index (`context` identifies the read).
    case readIndex
    /// The leader's answer: `index` is the read index.
    case readIndexResponse
    /// A proposal forwarded from a follower to the leader (`entries`).
    case propose
}

/// A message from one node to another.
public struct Message: Sendable, Equatable, CustomStringConvertible {
    public var kind: MessageKind
    public var from: NodeID
    public var to: NodeID
    public var term: Term
    public var logTerm: Term = .zero
    public var index: LogIndex = .zero
    public var entries: [Entry] = []
    public var commit: LogIndex = .zero
    public var reject = false
    /// On a `readIndex` request: the requester accepts an answer the leader confirms by its lease
    /// (§6.4.1) instead of a round of heartbeats.
    public var leaseRead = false
    public var rejectHint: LogIndex = .zero
    public var context: [UInt8] = []
    public var snapshot: SnapshotMetadata?
    public var snapshotOffset = 0
    public var snapshotData: [UInt8] = []
    public var snapshotDone = false

    public init(kind: MessageKind, from: NodeID, to: NodeID, term: Term) {
        self.kind = kind
        self.from = from
        self.to = to
        self.term = term
    }

    /// The bytes it counts for in size limits.
    public var size: Int { 64 + entries.reduce(0) { $0 + $1.size } + snapshotData.count + context.count }

    public var description: String {
        var text = "\(from)->\(to) \(kind) term \(term)"
        switch kind {
        case .appendEntries:
            text += " prev \(logTerm)/\(index) commit \(commit) entries [\(entries.map(\.description).joined(separator: ", "))]"
        case .appendEntriesResponse:
            text += reject ? " reject hint \(rejectHint) logTerm \(logTerm)" : " match \(index)"
        case .requestVote, .preVote:
            text += " last \(logTerm)/\(index)" + (context.isEmpty ? "" : " transfer")
        case .requestVoteResponse, .preVoteResponse:
            text += reject ? " rejected" : " granted"
        case .heartbeat:
            text += " commit \(commit)" + (context.isEmpty ? "" : " ctx \(context.count)B")
        case .heartbeatResponse:
            text += context.isEmpty ? "" : " ctx \(context.count)B"
        case .installSnapshot:
            text += " \(snapshot?.description ?? "-") offset \(snapshotOffset) \(snapshotData.count)B" + (snapshotDone ? " last" : "")
        case .installSnapshotResponse:
            text += reject ? " reject" : " next offset \(snapshotOffset) match \(index)"
        case .timeoutNow:
            break
        case .readIndex:
            text += " ctx \(context.count)B"
        case .readIndexResponse:
            text += " index \(index)"
        case .propose:
            text += " \(entries.count) entries"
        }
        return text
    }
}
