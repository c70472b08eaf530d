// The quantities Keel passes across module boundaries, each its own type so that a term is never
// used as an index by accident (STYLE.md: "each quantity its own type").

/// A Raft term: a logical clock that increases with every election (Raft §5.1).
public struct Term: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64

    /// Creates a term from its number.
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Creates a term from its number.
    public init(_ value: UInt64) { self.rawValue = value }

    /// The term before any election.
    public static let zero = Term(0)

    public static func < (lhs: Term, rhs: Term) -> Bool { lhs.rawValue < rhs.rawValue }

    public var description: String { String(rawValue) }
}

/// The position of an entry in the log. The first entry has index 1; index 0 means "nothing".
public struct LogIndex: RawRepresentable, Hashable, Comparable, Strideable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64

    /// Creates an index from its number.
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Creates an index from its number.
    public init(_ value: UInt64) { self.rawValue = value }

    /// The index before the first entry.
    public static let zero = LogIndex(0)

    public static func < (lhs: LogIndex, rhs: LogIndex) -> Bool { lhs.rawValue < rhs.rawValue }

    public func distance(to other: LogIndex) -> Int64 {
        Int64(bitPattern: other.rawValue &- rawValue)
    }

    public func advanced(by n: Int64) -> LogIndex {
        LogIndex(UInt64(bitPattern: Int64(bitPattern: rawValue) &+ n))
    }

    /// The index after this one.
    public var next: LogIndex { LogIndex(rawValue + 1) }

    public var description: String { String(rawValue) }
}

/// The identity of a node in a cluster. 0 is never a valid node.
public struct NodeID: RawRepresentable, Hashable, Comparable, Sendable, CustomStringConvertible {
    public var rawValue: UInt64

    /// Creates a node id from its number.
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Creates a node id from its number.
    public init(_ value: UInt64) { self.rawValue = value }

    public static func < (lhs: NodeID, rhs: NodeID) -> Bool { lhs.rawValue < rhs.rawValue }

    public var description: String { String(rawValue) }
}
