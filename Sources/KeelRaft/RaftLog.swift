// The log as Raft sees it: what the caller has persisted (`RaftStorage`) plus entries and a
// snapshot not persisted yet ("unstable", handed out in the next `Ready`).

import KeelCore

struct RaftLog {
    let storage: any RaftStorage
    /// Entries not yet persisted; `unstable[0].index == unstableOffset`.
    private(set) var unstable: [Entry] = []
    private(set) var unstableOffset: LogIndex
    /// A snapshot received from the leader and not yet installed by the caller.
    private(set) var unstableSnapshot: SnapshotMetadata?
    // Invariant: applied <= committed <= lastIndex
    private(set) var committed: LogIndex
    /// Entries up to here have been handed to the caller to apply.
    private(set) var applied: LogIndex

    init(storage: any RaftStorage, committed: LogIndex, applied: LogIndex = .zero) {
        self.storage = storage
        unstableOffset = storage.lastIndex.next
        let snapshotIndex = storage.snapshot.index
        // What the caller applied was committed, and it holds those entries (or their snapshot).
        let applied = min(applied, max(storage.lastIndex, snapshotIndex))
        self.committed = max(committed, snapshotIndex, applied)
        self.applied = max(snapshotIndex, applied)
    }

    var firstIndex: LogIndex {
        if let unstableSnapshot { return unstableSnapshot.index.next }
        return storage.firstIndex
    }

    var lastIndex: LogIndex {
        if let last = unstable.last { return last.index }
        if let unstableSnapshot { return unstableSnapshot.index }
        return storage.lastIndex
    }

    var lastTerm: Term { (try? term(at: lastIndex)) ?? .zero }

    /// The term of the entry at `index`, or an error if it is compacted or past the end.
    func term(at index: LogIndex) throws(RaftStorageError) -> Term {
        if let unstableSnapshot, index == unstableSnapshot.index { return unstableSnapshot.term }
        if index >= unstableOffset, !unstable.isEmpty, index <= unstable.last!.index {
            return unstable[Int(index.rawValue - unstableOffset.rawValue)].term
        }
        if index > lastIndex { throw .unavailable }
        if unstableSnapshot != nil, index < unstableSnapshot!.index { throw .compacted }
        return try storage.term(at: index)
    }

    func matchTerm(_ index: LogIndex, _ term: Term) -> Bool {
        guard let found = try? self.term(at: index) else { return false }
        return found == term
    }

    /// Whether a log ending at (lastTerm, lastIndex) is at least as up to date as this one (§5.4.1).
    func isUpToDate(lastIndex: LogIndex, lastTerm: Term) -> Bool {
        lastTerm > self.lastTerm || (lastTerm == self.lastTerm && lastIndex >= self.lastIndex)
    }

    /// Entries in `from...lastIndex`, bounded by bytes and count (at least one if any).
    func entries(from: LogIndex, maxSize: Int, maxCount: Int) throws(RaftStorageError) -> [Entry] {
        guard from <= lastIndex else { return [] }
        if from < firstIndex { throw .compacted }
        var result: [Entry] = []
        var size = 0
        let end = min(lastIndex.next, LogIndex(from.rawValue + UInt64(maxCount)))
        if from < unstableOffset {
            let storageEnd = min(end, unstableOffset)
            result = try storage.entries(from: from, to: storageEnd, maxSize: maxSize)
            size = result.reduce(0) { $0 + $1.size }
            if result.last?.index.next != storageEnd { return result }
        }
        var index = max(from, unstableOffset)
        while index < end {
            let entry = unstable[Int(index.rawValue - unstableOffset.rawValue)]
            size += entry.size
            if !result.isEmpty && size > maxSize { break }
            result.append(entry)
            index = index.next
        }
        return result
    }

    /// AppendEntries on a follower (§5.3): if the log matches at (index, logTerm), appends what
    /// is new (truncating a conflicting suffix) and returns the index of the last new entry.
    mutating func maybeAppend(index: LogIndex, logTerm: Term, committed leaderCommit: LogIndex, entries: [Entry]) -> LogIndex? {
        guard matchTerm(index, logTerm) else { return nil }
        let lastNew = LogIndex(index.rawValue + UInt64(entries.count))
        if let conflict = findConflict(entries) {
            // A conflict at or below the commit index means §5.4 broke somewhere (only a deliberate
            // fault gets here); the entry is refused rather than a committed one overwritten.
            guard conflict > committed else { return nil }
            append(Array(entries[Int(conflict.rawValue - index.rawValue - 1)...]))
        }
        commit(to: min(leaderCommit, lastNew))
        return lastNew
    }

    /// The index of the first entry that is new or conflicts, if any.
    func findConflict(_ entries: [Entry]) -> LogIndex? {
        for entry in entries where !matchTerm(entry.index, entry.term) { return entry.index }
        return nil
    }

    /// The largest index at or below `index` whose term is at most `term` (fast backtracking).
    func findConflictByTerm(index: LogIndex, term: Term) -> LogIndex {
        var candidate = min(index, lastIndex)
        while candidate > .zero {
            guard let found = try? self.term(at: candidate) else { break }
            if found <= term { break }
            candidate = LogIndex(candidate.rawValue - 1)
        }
        return candidate
    }

    /// Appends entries (the first may overwrite an unstable or persisted suffix).
    mutating func append(_ entries: [Entry]) {
        guard let first = entries.first else { return }
        precondition(first.index > committed, "overwriting committed entry \(first.index)")
        precondition(first.index <= lastIndex.next, "appending with a gap")
        if first.index == lastIndex.next, !unstable.isEmpty || first.index == unstableOffset {
            unstable.append(contentsOf: entries)
        } else if first.index <= unstableOffset {
            // Replaces persisted entries too: the caller overwrites them when it persists these.
            unstableOffset = first.index
            unstable = entries
        } else {
            unstable.removeLast(Int(unstable.last!.index.rawValue - first.index.rawValue + 1))
            unstable.append(contentsOf: entries)
        }
    }

    mutating func commit(to index: LogIndex) {
        guard index > committed else { return }
        precondition(index <= lastIndex, "commit \(index) is past the last index \(lastIndex)")
        committed = index
    }

    /// Committed entries not yet handed out, bounded by bytes.
    func nextCommittedEntries(maxSize: Int) -> [Entry] {
        guard committed > applied else { return [] }
        return (try? entries(from: applied.next, maxSize: maxSize, maxCount: Int(committed.rawValue - applied.rawValue))) ?? []
    }

    mutating func applied(to index: LogIndex) {
        precondition(index <= committed, "applied \(index) past commit \(committed)")
        if index > applied { applied = index }
    }

    /// The caller persisted entries up to `index` (with `term`): they are no longer unstable.
    mutating func stable(to index: LogIndex, term: Term) {
        guard let last = unstable.last, index >= unstableOffset, index <= last.index else { return }
        guard unstable[Int(index.rawValue - unstableOffset.rawValue)].term == term else { return }
        unstable.removeFirst(Int(index.rawValue - unstableOffset.rawValue + 1))
        unstableOffset = index.next
    }

    /// The caller installed the snapshot.
    mutating func stableSnapshot(_ metadata: SnapshotMetadata) {
        if unstableSnapshot == metadata { unstableSnapshot = nil }
    }

    /// Replaces the log with a snapshot from the leader (§7).
    mutating func restore(_ metadata: SnapshotMetadata) {
        committed = metadata.index
        applied = metadata.index
        unstable = []
        unstableOffset = metadata.index.next
        unstableSnapshot = metadata
    }

    func checkInvariants() {
        precondition(applied <= committed, "applied \(applied) > committed \(committed)")
        precondition(committed <= lastIndex, "committed \(committed) > last \(lastIndex)")
        for (offset, entry) in unstable.enumerated() {
            precondition(entry.index.rawValue == unstableOffset.rawValue + UInt64(offset), "unstable entries out of sequence")
        }
        if let first = unstable.first {
            precondition(first.index <= storage.lastIndex.next || unstableSnapshot != nil, "gap between storage and unstable entries")
        }
    }
}
