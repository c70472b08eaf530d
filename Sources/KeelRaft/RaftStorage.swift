// The persisted log behind a Raft node. Raft only reads it; the caller writes it (the entries and
// hard state of each `Ready`) and then calls `advance`. The runtime puts it on KeelStorage's log;
// tests and the simulator use `MemoryRaftStorage`.

import KeelCore

/// Why the storage cannot answer.
public enum RaftStorageError: Error, Sendable, Equatable {
    /// The entry was compacted into a snapshot.
    case compacted
    /// The entry is past the end of the log.
    case unavailable
    /// The snapshot asked for is no longer the storage's snapshot.
    case snapshotOutOfDate
}

/// Read access to what the caller has persisted.
public protocol RaftStorage: AnyObject {
    /// The hard state and membership persisted at the last `advance`.
    func initialState() -> (HardState, Membership)
    /// The index of the first entry held (the snapshot's index + 1).
    var firstIndex: LogIndex { get }
    /// The index of the last entry held (the snapshot's index when there are none).
    var lastIndex: LogIndex { get }
    /// The term of an entry; the snapshot's index gives the snapshot's term.
    func term(at index: LogIndex) throws(RaftStorageError) -> Term
    /// Entries in `from..<to`, at least one, and no more than `maxSize` bytes after the first.
    func entries(from: LogIndex, to: LogIndex, maxSize: Int) throws(RaftStorageError) -> [Entry]
    /// The newest snapshot's metadata.
    var snapshot: SnapshotMetadata { get }
    /// A chunk of the newest snapshot's bytes.
    func snapshotChunk(of snapshot: SnapshotMetadata, offset: Int, maxSize: Int) throws(RaftStorageError) -> SnapshotChunk
}

/// A `RaftStorage` in memory, with the writes a caller makes after each `Ready`.
public final class MemoryRaftStorage: RaftStorage {
    public private(set) var hardState = HardState()
    public private(set) var snapshot: SnapshotMetadata
    /// The snapshot's bytes.
    public private(set) var snapshotData: [UInt8] = []
    // Invariant: entries[i].index == snapshot.index + 1 + i
    public private(set) var entries: [Entry] = []

    /// An empty log with the initial membership.
    public init(membership: Membership) {
        snapshot = SnapshotMetadata(index: .zero, term: .zero, membership: membership)
    }

    public func initialState() -> (HardState, Membership) { (hardState, snapshot.membership) }

    public var firstIndex: LogIndex { snapshot.index.next }

    public var lastIndex: LogIndex { LogIndex(snapshot.index.rawValue + UInt64(entries.count)) }

    public func term(at index: LogIndex) throws(RaftStorageError) -> Term {
        if index == snapshot.index { return snapshot.term }
        if index < snapshot.index { throw .compacted }
        if index > lastIndex { throw .unavailable }
        return entries[Int(index.rawValue - snapshot.index.rawValue - 1)].term
    }

    public func entries(from: LogIndex, to: LogIndex, maxSize: Int) throws(RaftStorageError) -> [Entry] {
        if from <= snapshot.index { throw .compacted }
        if to > lastIndex.next || from > to { throw .unavailable }
        var result: [Entry] = []
        var size = 0
        var index = from
        while index < to {
            let entry = entries[Int(index.rawValue - snapshot.index.rawValue - 1)]
            size += entry.size
            if !result.isEmpty && size > maxSize { break }
            result.append(entry)
            index = index.next
        }
        return result
    }

    public func snapshotChunk(of snapshot: SnapshotMetadata, offset: Int, maxSize: Int) throws(RaftStorageError) -> SnapshotChunk {
        let data: [UInt8]
        if snapshot == self.snapshot {
            data = snapshotData
        } else if let retained = retained.last(where: { $0.metadata == snapshot }) {
            // A transfer of an older snapshot goes on to its end rather than restart at every compaction.
            data = retained.data
        } else {
            throw .snapshotOutOfDate
        }
        let start = min(max(offset, 0), data.count)
        let end = min(data.count, start + max(maxSize, 1))
        return SnapshotChunk(data: Array(data[start..<end]), isLast: end == data.count)
    }

    /// Snapshots replaced recently, kept so transfers under way can finish.
    private var retained: [(metadata: SnapshotMetadata, data: [UInt8])] = []
    /// How many replaced snapshots are kept for transfers under way.
    public static let retainedSnapshotsMax = 4

    private func retire(_ metadata: SnapshotMetadata, _ data: [UInt8]) {
        retained.append((metadata, data))
        if retained.count > Self.retainedSnapshotsMax { retained.removeFirst() }
    }

    // MARK: - Writes by the caller

    /// Persists the hard state.
    public func setHardState(_ state: HardState) { hardState = state }

    /// Persists entries, replacing any conflicting suffix.
    public func append(_ newEntries: [Entry]) {
        guard let first = newEntries.first else { return }
        precondition(first.index > snapshot.index, "appending below the snapshot")
        precondition(first.index <= lastIndex.next, "appending past the end leaves a gap")
        let replaced = Int(lastIndex.rawValue) - Int(first.index.rawValue) + 1
        if replaced > 0 { entries.removeLast(replaced) }
        entries.append(contentsOf: newEntries)
    }

    /// Replaces everything with a snapshot received from the leader.
    public func applySnapshot(_ metadata: SnapshotMetadata, data: [UInt8]) {
        retire(snapshot, snapshotData)
        snapshot = metadata
        snapshotData = data
        entries = []
        if hardState.commit < metadata.index { hardState.commit = metadata.index }
    }

    /// Records a snapshot of the local state at `index` (which must be applied) and drops the
    /// entries it covers.
    public func createSnapshot(at index: LogIndex, membership: Membership, data: [UInt8]) {
        precondition(index > snapshot.index && index <= lastIndex, "snapshot index out of range")
        let term = entries[Int(index.rawValue - snapshot.index.rawValue - 1)].term
        entries.removeFirst(Int(index.rawValue - snapshot.index.rawValue))
        retire(snapshot, snapshotData)
        snapshot = SnapshotMetadata(index: index, term: term, membership: membership)
        snapshotData = data
    }
}
