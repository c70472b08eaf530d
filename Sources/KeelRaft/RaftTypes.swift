// The values Raft passes around: entries, hard state, membership, snapshots, read states.
// Plain value types, no I/O: the caller persists and transmits them as it likes.

import KeelCore

/// What an entry carries.
public enum EntryKind: UInt8, Sendable, Equatable {
    /// Opaque bytes for the state machine (empty for the no-op a new leader appends).
    case normal = 0
    /// A membership change (`ConfigurationChange`, encoded).
    case configurationChange = 1
}

/// One log entry.
public struct Entry: Sendable, Equatable, CustomStringConvertible {
    public var index: LogIndex
    public var term: Term
    public var kind: EntryKind
    public var data: [UInt8]

    public init(index: LogIndex, term: Term, kind: EntryKind = .normal, data: [UInt8] = []) {
        self.index = index
        self.term = term
        self.kind = kind
        self.data = data
    }

    /// The bytes it counts for in size limits.
    public var size: Int { data.count + 24 }

    public var description: String {
        switch kind {
        case .normal: "\(term)/\(index)" + (data.isEmpty ? " no-op" : " \(data.count)B")
        case .configurationChange: "\(term)/\(index) " + (ConfigurationChange(decoding: data)?.description ?? "bad configuration change")
        }
    }
}

/// The state Raft must persist before it sends messages or applies entries (Raft Figure 2).
public struct HardState: Sendable, Equatable, CustomStringConvertible {
    /// The latest term this node has seen.
    public var term: Term
    /// The candidate this node voted for in `term`, if any.
    public var votedFor: NodeID?
    /// The highest index known to be committed. It must be persisted: the membership is rebuilt
    /// at restart from the committed configuration entries, so a commit index that went back could
    /// revive a configuration that was already replaced.
    public var commit: LogIndex

    public init(term: Term = .zero, votedFor: NodeID? = nil, commit: LogIndex = .zero) {
        self.term = term
        self.votedFor = votedFor
        self.commit = commit
    }

    public var description: String { "term \(term) vote \(votedFor.map { String($0.rawValue) } ?? "-") commit \(commit)" }
}

/// Who takes part: voters count towards quorums; learners receive the log but do not vote.
public struct Membership: Sendable, Equatable, CustomStringConvertible {
    /// Voting members, sorted.
    public private(set) var voters: [NodeID]
    /// Non-voting members, sorted.
    public private(set) var learners: [NodeID]

    public init(voters: [NodeID], learners: [NodeID] = []) {
        self.voters = Array(Set(voters)).sorted()
        self.learners = Array(Set(learners).subtracting(voters)).sorted()
    }

    /// Every member.
    public var all: [NodeID] { (voters + learners).sorted() }

    public func isVoter(_ id: NodeID) -> Bool { voters.contains(id) }
    public func isLearner(_ id: NodeID) -> Bool { learners.contains(id) }
    public func contains(_ id: NodeID) -> Bool { isVoter(id) || isLearner(id) }

    /// The number of voters that make a majority.
    public var quorum: Int { voters.count / 2 + 1 }

    /// The membership after a change.
    public func applying(_ change: ConfigurationChange) -> Membership {
        var voters = Set(self.voters)
        var learners = Set(self.learners)
        switch change.kind {
        case .addVoter, .promoteLearner:
            learners.remove(change.node)
            voters.insert(change.node)
        case .addLearner:
            if !voters.contains(change.node) { learners.insert(change.node) }
        case .remove:
            voters.remove(change.node)
            learners.remove(change.node)
        }
        return Membership(voters: Array(voters), learners: Array(learners))
    }

    public var description: String {
        "voters \(voters.map { String($0.rawValue) }.joined(separator: ","))"
            + (learners.isEmpty ? "" : " learners \(learners.map { String($0.rawValue) }.joined(separator: ","))")
    }
}

/// A change of membership, one server at a time (Raft dissertation §4.1).
public struct ConfigurationChange: Sendable, Equatable, CustomStringConvertible {
    public enum Kind: UInt8, Sendable, Equatable {
        case addVoter = 1
        case addLearner = 2
        case promoteLearner = 3
        case remove = 4
    }

    public var kind: Kind
    public var node: NodeID
    /// Bytes Raft carries but never reads (the node runtime puts the member's address and the
    /// request id here).
    public var context: [UInt8]

    public init(_ kind: Kind, _ node: NodeID, context: [UInt8] = []) {
        self.kind = kind
        self.node = node
        self.context = context
    }

    /// The entry data: kind (1 byte), node (8 bytes, little-endian), then the context (the rest).
    public var encoded: [UInt8] {
        var writer = ByteWriter(capacity: 9 + context.count)
        writer.write(kind.rawValue)
        writer.write(node.rawValue)
        writer.write(bytes: context)
        return writer.bytes
    }

    /// Decodes entry data; nil if it is not a change.
    public init?(decoding bytes: [UInt8]) {
        var reader = ByteReader(bytes)
        guard let raw = try? reader.readUInt8(), let kind = Kind(rawValue: raw), let node = try? reader.readUInt64() else { return nil }
        self.init(kind, NodeID(node), context: Array(bytes.dropFirst(9)))
    }

    public var description: String {
        switch kind {
        case .addVoter: "add voter \(node)"
        case .addLearner: "add learner \(node)"
        case .promoteLearner: "promote \(node)"
        case .remove: "remove \(node)"
        }
    }
}

/// What a snapshot covers: the state after `index`, and the membership at that point.
public struct SnapshotMetadata: Sendable, Equatable, CustomStringConvertible {
    public var index: LogIndex
    public var term: Term
    public var membership: Membership

    public init(index: LogIndex, term: Term, membership: Membership) {
        self.index = index
        self.term = term
        self.membership = membership
    }

    public var description: String { "snapshot \(term)/\(index) (\(membership))" }
}

/// A piece of a snapshot's bytes.
public struct SnapshotChunk: Sendable, Equatable {
    public var data: [UInt8]
    /// Whether this chunk ends the snapshot.
    public var isLast: Bool

    public init(data: [UInt8], isLast: Bool) {
        self.data = data
        self.isLast = isLast
    }
}

/// A chunk of an incoming snapshot for the caller to store, at its offset.
public struct IncomingSnapshotChunk: Sendable, Equatable {
    public var metadata: SnapshotMetadata
    public var offset: Int
    public var data: [UInt8]

    public init(metadata: SnapshotMetadata, offset: Int, data: [UInt8]) {
        self.metadata = metadata
        self.offset = offset
        self.data = data
    }
}

/// A linearizable read may be served once the state machine has applied `index`.
public struct ReadState: Sendable, Equatable {
    public var index: LogIndex
    public var context: [UInt8]

    public init(index: LogIndex, context: [UInt8]) {
        self.index = index
        self.context = context
    }
}

/// A node's role.
public enum Role: String, Sendable, Equatable {
    case follower
    case preCandidate
    case candidate
    case leader
}

/// Volatile state that the caller may want to watch: who leads, and this node's role.
public struct SoftState: Sendable, Equatable {
    public var leader: NodeID?
    public var role: Role
}
