// The write-ahead log: many appenders, one writer thread, group commit.
//
// Appenders enqueue under `queueLock` and are given the next index there, so index order is queue
// order. The writer thread takes everything queued (up to `Limits.groupCommitSizeMax` bytes),
// encodes it into one buffer, writes it with one pwrite, makes it durable with one fdatasync
// (policy `always`), and only then calls the appenders' completions, in index order. Appends that
// arrive while a sync runs wait in the queue and share the next one: that is group commit.
//
// Inline writes (`write(entries:hardState:inline: true, completion:)`): the caller takes the
// writer's part itself, under `writeLock`, and writes and syncs what is queued before it returns.
// The writer thread takes batches under the same lock, so batches are still written one at a time
// and in queue order, whoever writes them.
//
// Failure rules (DESIGN.md contract 3):
// - A failed fdatasync, or any write error but ENOSPC, stops the log for good: the batch and
//   everything queued fail, nothing more is acknowledged, and every later append is refused with
//   `StorageError.stopped`, whose message says why. The sync is never retried.
//   The newest segment is then cut back to its synced end (see `stop`).
// - ENOSPC from a write, a preallocation or a segment creation fails the writes it hit and
//   everything queued behind them, truncates the segment back to its last acknowledged record, and
//   leaves the log running: reads work, and later appends are tried again (and succeed once space
//   is freed). ENOSPC from fdatasync of a segment is a failed fsync like any other: fatal. The
//   hard-state file a suffix replacement or a restart writes first (to a temporary file, renamed
//   over the old one) counts as a write: ENOSPC anywhere in it, its fdatasync included, fails the
//   write before anything is removed (the temporary file is never read).
//
// Rotation: when the next record would pass `segmentSize`, the current segment is trimmed to its
// last record and synced (it is now sealed: nothing invalid may ever be found in it), then the next
// segment is created with its header, preallocated, synced, and the directory synced.
//
// Sync markers: a batch that follows a sync starts with a marker record holding the segment's
// synced end, so recovery can tell damage inside the synced part (corruption) from a tail that
// was never synced (docs/formats/log.md).

import Foundation
import DequeModule
import KeelCore
import Synchronization

/// Settings of the log.
public struct LogOptions: Sendable, Equatable {
    /// When writes become durable. The default, `always`, syncs before every acknowledgement.
    public var fsyncPolicy: FsyncPolicy = .always
    /// The size at which a segment is sealed and the next one begun. Default 64 MiB.
    public var segmentSize: Int = 64 * 1024 * 1024
    /// How often `everysec` syncs, in milliseconds.
    public var everysecIntervalMilliseconds: Int = 1000
    /// Bounds on entries and queues.
    public var limits = Limits()
    /// Whether the next segment is zero-filled on a background thread ahead of the rotation that
    /// needs it (and a new log's first segment zero-filled when it is created). nil, the default:
    /// with fsync `always` (what it speeds up: a sync after every write) when the file system's
    /// zero-fill writes blocks for real (POSIX yes; the simulated file system no, so it stays
    /// deterministic). With `everysec` and `never` it would only double the bytes written.
    public var prepareSegments: Bool?

    public init(fsyncPolicy: FsyncPolicy = .always, segmentSize: Int = 64 * 1024 * 1024, limits: Limits = Limits()) {
        self.fsyncPolicy = fsyncPolicy
        self.segmentSize = segmentSize
        self.limits = limits
    }

    /// Checks the settings against their limits.
    public func validate() throws(StorageError) {
        guard segmentSize >= limits.segmentSizeMin, segmentSize <= limits.segmentSizeMax else {
            throw .invalidConfiguration("segment size \(segmentSize) is outside \(limits.segmentSizeMin)...\(limits.segmentSizeMax) bytes")
        }
        guard everysecIntervalMilliseconds > 0 else { throw .invalidConfiguration("the everysec interval must be positive") }
        guard limits.segmentSizeMax + limits.entrySizeMax + LogFormat.segmentHeaderSize < Int(UInt32.max) else {
            throw .invalidConfiguration("segmentSizeMax plus entrySizeMax must stay below 4 GiB (record offsets are 32-bit)")
        }
    }
}

/// A durable, append-only sequence of entries in segment files, written by one thread at a time
/// (the writer thread, or the caller of an inline write).
public final class WriteAheadLog: @unchecked Sendable {
    // @unchecked Sendable: the mutable state is split in two, each part guarded:
    // `queueLock` guards `queue`, `nextIndex` and `runState`; `segments` (a Mutex) guards the
    // segment table that readers and compaction use. The current segment's file is written only
    // under `writeLock` (by the writer thread, or the caller of an inline write), and a segment's
    // handle is closed only under `segments` by compaction, which never touches the newest
    // segment.

    /// An append waiting for the writer.
    private struct Pending {
        /// The entry, if any (a write may carry only a hard state).
        let entry: (index: LogIndex, term: Term, payload: [UInt8])?
        /// Explicit-index writes: drop the log from `entry.index` on before writing the entry.
        let replacesSuffix: Bool
        /// A hard state record to write before the entry.
        let hardState: [UInt8]?
        /// Drop the whole log and continue after this index (a snapshot was installed).
        var restartAfter: LogIndex?
        /// The index reported to the completion.
        let index: LogIndex
        let completion: @Sendable (Result<LogIndex, StorageError>) -> Void
        /// Part of an inline write: its caller writes it (the writer thread leaves it, and what
        /// follows it, while the log runs).
        var inline = false

        var payloadCount: Int { (entry?.payload.count ?? 0) + (hardState?.count ?? 0) }

        init(index: LogIndex, term: Term, payload: [UInt8], completion: @escaping @Sendable (Result<LogIndex, StorageError>) -> Void) {
            entry = (index, term, payload)
            replacesSuffix = false
            hardState = nil
            self.index = index
            self.completion = completion
        }

        init(entry: (index: LogIndex, term: Term, payload: [UInt8])?, replacesSuffix: Bool, hardState: [UInt8]?, index: LogIndex,
             completion: @escaping @Sendable (Result<LogIndex, StorageError>) -> Void) {
            self.entry = entry
            self.replacesSuffix = replacesSuffix
            self.hardState = hardState
            self.index = index
            self.completion = completion
        }
    }

    /// How indexes are chosen: by the log (`append`) or by the caller (`write`). A log uses one.
    private enum IndexMode { case assigned, explicit }

    private enum RunState {
        case running
        case stopped(String)
        case closing
    }

    /// A segment as readers and the writer see it.
    struct Segment {
        var name: String
        var handle: OpenFile
        var firstIndex: LogIndex
        // Invariant: lastIndex == firstIndex - 1 + offsets.count
        var lastIndex: LogIndex
        var dataEnd: Int
        var offsets: [UInt32]
        /// The term of each entry (parallel to `offsets`).
        var terms: [UInt64]
        /// Bytes known durable (fdatasync returned after they were written).
        // Invariant: syncedEnd <= dataEnd
        var syncedEnd: Int
        /// The synced end the newest sync marker in the segment declares.
        var lastMarker: Int

        /// Entries in the segment (from the indexes, so it holds for the writer's copy too).
        var entryCount: Int { Int(lastIndex.rawValue &+ 1 &- firstIndex.rawValue) }

        /// The segment without its offset and term arrays: the writer's own copy. Sharing the
        /// arrays with the table would make every append to the table's copy them whole.
        func withoutIndexes() -> Segment {
            var copy = self
            copy.offsets = []
            copy.terms = []
            return copy
        }
    }

    private struct Table {
        var segments: [Segment]
        var isClosed = false
        /// The newest hard state written or recovered.
        var hardState: [UInt8]?
        var bytesWritten: UInt64 = 0
        var syncCount: UInt64 = 0
    }

    /// The directory holding the segments.
    public let directory: String
    /// The settings.
    public let options: LogOptions
    private let fileSystem: any FileSystem

    private let queueLock = NSCondition()
    /// Held by whoever takes a batch from the queue and writes it: the writer thread, or a caller
    /// of an inline write. Batches are written one at a time, in queue order.
    private let writeLock = NSLock()
    /// The buffer of inline writes (under `writeLock`).
    private var inlineBuffer: [UInt8] = []
    private var queue = Deque<Pending>()
    private var queuedBytes = 0
    private var nextIndex: LogIndex
    private var runState = RunState.running
    private var indexMode: IndexMode?
    private let writerDone = DispatchSemaphore(value: 0)
    private var closed = false
    /// Set before the thread starts and never changed.
    private var writerThread: Thread?
    // Touched only under `writeLock` (set in init before the writer thread starts):
    /// The newest hard state the writer has put in a buffer.
    private var writerHardState: [UInt8]?
    /// Whether the next record must be preceded by `writerHardState` (after a suffix was replaced).
    private var rewriteHardState = false
    /// The sequence number of `writerHardState`; each new hard state takes the next one.
    private var writerHardStateSequence: UInt64 = 0

    private let table: Mutex<Table>

    /// Opens the log over segments that recovery has already checked (and repaired), or creates
    /// the first segment at `nextIndex` when there are none.
    ///
    /// - Parameters:
    ///   - directory: the `log` directory.
    ///   - scans: the segments, oldest first, each ending clean.
    ///   - nextIndex: the index the next append gets.
    init(directory: String, fileSystem: any FileSystem, options: LogOptions, scans: [SegmentScan], nextIndex: LogIndex,
         hardState: [UInt8]? = nil, hardStateSequence: UInt64 = 0) throws(StorageError) {
        try options.validate()
        self.directory = directory
        self.options = options
        self.fileSystem = fileSystem
        self.nextIndex = nextIndex
        var segments: [Segment] = []
        do {
            for (position, scan) in scans.enumerated() {
                let isNewest = position == scans.count - 1
                let handle = try fileSystem.open(joinPath(directory, scan.name), options: isNewest ? [] : [.readOnly])
                segments.append(Segment(name: scan.name, handle: handle, firstIndex: scan.firstIndex, lastIndex: scan.lastIndex,
                                        dataEnd: scan.dataEnd, offsets: scan.offsets, terms: scan.terms, syncedEnd: scan.dataEnd,
                                        lastMarker: scan.syncedEnd))
            }
            if let newest = segments.last, !scans.isEmpty {
                // What was read back may sit in the page cache only (a process restart without a
                // machine crash): make it durable, so the next sync marker can vouch for it.
                try fileSystem.synchronize(newest.handle)
            }
            if let newest = segments.last {
                precondition(newest.lastIndex.next == nextIndex, "the log must continue from its newest segment")
            } else {
                // A new log's first segment is zero-filled here (later ones are prepared ahead).
                segments.append(try Self.createSegment(directory: directory, firstIndex: nextIndex, fileSystem: fileSystem, size: options.segmentSize,
                                                       zeroFill: Self.preparesSegments(options, fileSystem)))
            }
        } catch {
            for segment in segments { fileSystem.close(segment.handle) }
            throw .fileSystem(error)
        }
        table = Mutex(Table(segments: segments, hardState: hardState))
        writerHardState = hardState
        writerHardStateSequence = hardStateSequence
        // Written again into the newest segment with the next record: recovery may have removed
        // the segment that held it (a checkpoint that outran the log).
        rewriteHardState = hardState != nil
        let thread = Thread { [self] in self.runWriter() }
        thread.name = "keel-log-writer"
        writerThread = thread
        thread.start()
        // A prepared segment left by a crash is not trusted (it may be half written): start over.
        let stale = joinPath(directory, Self.preparedName)
        if fileSystem.exists(stale) { try? fileSystem.remove(stale) }
        prepareNextSegment()
    }

    // MARK: - The next segment, prepared ahead

    /// The name of the next segment while it is prepared: not a segment name, so recovery and
    /// inspection never read it.
    static let preparedName = "next-segment.tmp"

    private enum Preparation { case none, preparing, ready, closed }

    /// The next segment is zero-filled and synced on a background queue ahead of the rotation
    /// that needs it (as etcd's file pipeline). Writing zeros, not only reserving blocks, matters:
    /// an fdatasync after overwriting written blocks needs no journal commit for the extents, which
    /// made keel serve's fsync-every-write throughput about 13% higher on ext4. A rotation takes
    /// it when ready (a header, a sync, a rename, a directory sync) and otherwise creates the
    /// segment itself, as before.
    private let preparation = Locked(Preparation.none)
    private let preparer = DispatchQueue(label: "keel.log.prepare")

    /// Whether the next segment is prepared (for tests).
    var nextSegmentIsPrepared: Bool { preparation.withLock { if case .ready = $0 { true } else { false } } }

    private var preparesSegments: Bool { Self.preparesSegments(options, fileSystem) }

    private static func preparesSegments(_ options: LogOptions, _ fileSystem: any FileSystem) -> Bool {
        options.prepareSegments ?? (options.fsyncPolicy == .always && fileSystem.zeroFillWritesBlocks)
    }

    private func prepareNextSegment() {
        guard preparesSegments else { return }
        let start = preparation.withLock { state -> Bool in
            guard case .none = state else { return false }
            state = .preparing
            return true
        }
        guard start else { return }
        let path = joinPath(directory, Self.preparedName)
        let (fileSystem, size) = (self.fileSystem, options.segmentSize)
        preparer.async { [preparation] in
            guard preparation.withLock({ if case .preparing = $0 { true } else { false } }) else { return }
            do throws(FileSystemError) {
                let handle = try fileSystem.open(path, options: [.create, .truncate])
                defer { fileSystem.close(handle) }
                // Reserved whole first (a full disk fails at once), then zeroed in pieces, so that
                // closing the log need not wait for all of it.
                try fileSystem.allocate(handle, offset: 0, length: size)
                var at = 0
                while at < size {
                    guard preparation.withLock({ if case .preparing = $0 { true } else { false } }) else {
                        throw FileSystemError(kind: .other, errno: 0, operation: "prepare", path: path)
                    }
                    let count = min(4 << 20, size - at)
                    try fileSystem.zeroFill(handle, offset: at, length: count)
                    at += count
                }
                try fileSystem.synchronize(handle)
                let kept = preparation.withLock { state -> Bool in
                    guard case .preparing = state else { return false }
                    state = .ready
                    return true
                }
                // Cancelled meanwhile: the space goes back at once.
                if !kept { try? fileSystem.remove(path) }
            } catch {
                // (A full disk, typically: the rotation creates the segment itself, and reports.)
                try? fileSystem.remove(path)
                preparation.withLock { state in if case .preparing = state { state = .none } }
            }
        }
    }

    /// Turns the prepared file into the segment starting at `firstIndex`; nil if none is ready
    /// or it cannot be opened (then the caller creates the segment itself). A failure after that
    /// (a sync, the rename) is the log's failure, as for a segment it creates itself.
    private func takePreparedSegment(firstIndex: LogIndex) throws(FileSystemError) -> Segment? {
        let ready = preparation.withLock { state -> Bool in
            guard case .ready = state else { return false }
            state = .none
            return true
        }
        guard ready else { return nil }
        let prepared = joinPath(directory, Self.preparedName)
        let name = LogFormat.segmentName(firstIndex: firstIndex)
        guard let handle = try? fileSystem.open(prepared, options: []) else {
            try? fileSystem.remove(prepared)
            return nil
        }
        do throws(FileSystemError) {
            // The header is durable before the file takes a segment's name.
            try fileSystem.write(handle, LogFormat.encodeSegmentHeader(firstIndex: firstIndex), at: 0)
            try fileSystem.synchronize(handle)
            try fileSystem.rename(prepared, to: joinPath(directory, name))
            try fileSystem.synchronizeDirectory(directory)
        } catch {
            fileSystem.close(handle)
            throw error
        }
        let header = LogFormat.segmentHeaderSize
        return Segment(name: name, handle: handle, firstIndex: firstIndex, lastIndex: LogIndex(firstIndex.rawValue - 1),
                       dataEnd: header, offsets: [], terms: [], syncedEnd: header, lastMarker: header)
    }

    /// Stops a preparation under way (or drops a prepared file) and waits until its file is gone:
    /// before the writer creates a segment itself, so the two never hold a segment's space each
    /// on a disk with room for one, and after a full disk, to give the space back.
    private func cancelPreparation() {
        guard preparesSegments else { return }
        let wasReady = preparation.withLock { state -> Bool in
            switch state {
            case .preparing:
                state = .none
                return false
            case .ready:
                state = .none
                return true
            case .none, .closed:
                return false
            }
        }
        preparer.sync {}
        if wasReady { try? fileSystem.remove(joinPath(directory, Self.preparedName)) }
    }

    /// Opens the log of a data directory for explicit-index writes (Raft's log): recovers the
    /// segments (torn tails cut, damage refused as for a store) and the newest hard state. Entries
    /// at or below the newest valid checkpoint are kept but not read back; the caller owns the
    /// checkpoints.
    ///
    /// - Returns: the log and what recovery did.
    public static func open(in directory: DataDirectory, options: LogOptions) throws(StorageError) -> (WriteAheadLog, RecoveryReport) {
        let recovered = try Recovery.run(directory: directory, options: options) { (_, _) throws(StorageError) in } apply: { _ in }
        let log = try WriteAheadLog(directory: directory.logPath, fileSystem: directory.fileSystem, options: options,
                                    scans: recovered.scans, nextIndex: recovered.nextIndex, hardState: recovered.hardState,
                                    hardStateSequence: recovered.hardStateSequence)
        return (log, recovered.report)
    }

    // MARK: - Appending

    /// Queues an entry; `completion` runs on the writer thread once the entry is durable under the
    /// policy (or has failed), after the completions of all earlier entries.
    ///
    /// Completions run while the log's write lock is held (here and in `write`): one must not write
    /// to this log inline, close it, or wait for a thread that may be waiting to write to it; it
    /// may hand its result on (resume a continuation, schedule work on an event loop).
    ///
    /// - Returns: the index the entry will have if it succeeds (after a failure the index is given
    ///   to the next entry).
    /// - Throws: `StorageError` when the log refuses the entry at once (stopped, closed, over a limit).
    @discardableResult
    public func append(term: Term, payload: [UInt8], completion: @escaping @Sendable (Result<LogIndex, StorageError>) -> Void) throws(StorageError) -> LogIndex {
        guard payload.count <= options.limits.entrySizeMax else {
            throw .entryTooLarge(size: payload.count, limit: options.limits.entrySizeMax)
        }
        queueLock.lock()
        defer { queueLock.unlock() }
        try checkAccepting()
        guard queue.count < options.limits.appendQueueCountMax else { throw .overloaded(queued: queue.count) }
        precondition(indexMode != .explicit, "a log takes either append(term:payload:) or write(entries:hardState:), not both")
        indexMode = .assigned
        let index = nextIndex
        nextIndex = index.next
        queue.append(Pending(index: index, term: term, payload: payload, completion: completion))
        queuedBytes += payload.count
        queueLock.signal()
        return index
    }

    /// Writes entries whose indexes the caller chose (Raft's log), and optionally a hard state,
    /// in one durable step: `completion` runs once all of it is durable under the policy.
    ///
    /// The entries must be consecutive, and the first may be at most one past the last entry
    /// written or queued. If it is at or below it, the log from that index on is replaced
    /// (Raft §5.3: a follower drops a conflicting suffix); the replaced entries must not have been
    /// compacted.
    ///
    /// - Parameter inline: write and sync on the calling thread before returning, after anything
    ///   queued before, instead of handing the write to the writer thread; `completion` has run
    ///   by the time this returns (on the calling thread, unless the writer thread failed the
    ///   write first, after an earlier batch met a full disk or a failed sync, or wrote it while
    ///   the log was closing). For an owner that writes one group commit at a time from a loop
    ///   of its own: the caller waits for the disk, as Redis's loop waits in its fsync, and
    ///   nothing goes from thread to thread and back for each write. Needs fsync `always` (the
    ///   writer thread keeps `everysec`'s timer).
    /// - Throws: `StorageError` when the log refuses the write at once.
    public func write(entries: [LogEntry], hardState: [UInt8]?, inline: Bool = false,
                      completion: @escaping @Sendable (Result<LogIndex, StorageError>) -> Void) throws(StorageError) {
        if inline, options.fsyncPolicy != .always {
            throw .invalidConfiguration("inline writes need fsync always (the writer thread syncs everysec's writes)")
        }
        try enqueue(entries: entries, hardState: hardState, inline: inline, completion: completion)
        if inline { writeQueued() }
    }

    /// Queues an explicit-index write (for the writer thread, or for `writeQueued` at once).
    private func enqueue(entries: [LogEntry], hardState: [UInt8]?, inline: Bool,
                         completion: @escaping @Sendable (Result<LogIndex, StorageError>) -> Void) throws(StorageError) {
        for entry in entries where entry.payload.count > options.limits.entrySizeMax {
            throw .entryTooLarge(size: entry.payload.count, limit: options.limits.entrySizeMax)
        }
        if let hardState, hardState.count > LogFormat.hardStateSizeMax - 8 {
            throw .entryTooLarge(size: hardState.count, limit: LogFormat.hardStateSizeMax - 8)
        }
        for (offset, entry) in entries.enumerated() where offset > 0 {
            guard entry.index == entries[offset - 1].index.next else { throw .invalidConfiguration("entries written together must be consecutive") }
        }
        queueLock.lock()
        defer { queueLock.unlock() }
        try checkAccepting()
        guard queue.count + entries.count <= options.limits.appendQueueCountMax else { throw .overloaded(queued: queue.count) }
        precondition(indexMode != .assigned, "a log takes either append(term:payload:) or write(entries:hardState:), not both")
        indexMode = .explicit
        if let first = entries.first {
            guard first.index.rawValue >= 1, first.index <= nextIndex else {
                throw .invalidConfiguration("entry \(first.index) would leave a gap after \(LogIndex(nextIndex.rawValue - 1))")
            }
            let oldest = table.withLock { $0.segments[0].firstIndex }
            guard first.index >= oldest || first.index == nextIndex else {
                throw .invalidConfiguration("entry \(first.index) would replace entries already compacted (the log begins at \(oldest))")
            }
        }
        let replaces = entries.first.map { $0.index < nextIndex } ?? false
        if entries.isEmpty {
            var pending = Pending(entry: nil, replacesSuffix: false, hardState: hardState, index: LogIndex(nextIndex.rawValue - 1), completion: completion)
            pending.inline = inline
            queue.append(pending)
        } else {
            let ignore: @Sendable (Result<LogIndex, StorageError>) -> Void = { _ in }
            for (offset, entry) in entries.enumerated() {
                let isFirst = offset == 0
                let isLast = offset == entries.count - 1
                let item: (index: LogIndex, term: Term, payload: [UInt8]) = (entry.index, entry.term, entry.payload)
                // The hard state goes after the last entry: a commit index never becomes durable
                // before the entries it covers, even when the write spans batches or segments.
                var pending = Pending(entry: item, replacesSuffix: isFirst && replaces, hardState: isLast ? hardState : nil,
                                      index: entry.index, completion: isLast ? completion : ignore)
                pending.inline = inline
                queue.append(pending)
            }
            nextIndex = entries.last!.index.next
        }
        queuedBytes += entries.reduce(hardState?.count ?? 0) { $0 + $1.payload.count }
        // Not for an inline write, which its caller makes at once: the writer thread sleeps on.
        if !inline { queueLock.signal() }
    }

    /// Writes everything queued on the calling thread (inline writes), batch by batch.
    private func writeQueued() {
        writeLock.lock()
        defer { writeLock.unlock() }
        while true {
            let (batch, state) = takeBatch(forWriter: false)
            if batch.isEmpty { return }
            if case .stopped = state { return }
            if case .stopped = write(batch, buffer: &inlineBuffer) { return }
        }
    }

    /// Takes the next batch from the queue (at most a group commit's bytes, at least one item),
    /// with the run state it was taken under. The writer thread stops at an inline write while
    /// the log runs (its caller is about to write it), and takes everything once it closes.
    /// Call with `writeLock` held.
    private func takeBatch(forWriter: Bool) -> (batch: [Pending], state: RunState) {
        queueLock.lock()
        defer { queueLock.unlock() }
        let leavesInline: Bool
        if forWriter, case .running = runState { leavesInline = true } else { leavesInline = false }
        var batch: [Pending] = []
        var batchBytes = 0
        while let first = queue.first, !(leavesInline && first.inline),
              batch.isEmpty || batchBytes + first.payloadCount <= options.limits.groupCommitSizeMax {
            batch.append(queue.removeFirst())
            batchBytes += first.payloadCount
        }
        queuedBytes -= batchBytes
        return (batch, runState)
    }

    /// Drops every entry and continues the log after `index`: for a follower that installed a
    /// snapshot covering `index` (Raft §7). Segments are removed newest first, each removal synced,
    /// then a segment starting at `index + 1` is created, holding the current hard state.
    public func restart(after index: LogIndex, completion: @escaping @Sendable (Result<LogIndex, StorageError>) -> Void) throws(StorageError) {
        queueLock.lock()
        defer { queueLock.unlock() }
        try checkAccepting()
        precondition(indexMode != .assigned, "restart(after:) is for explicit-index logs")
        indexMode = .explicit
        var pending = Pending(entry: nil, replacesSuffix: false, hardState: nil, index: index, completion: completion)
        pending.restartAfter = index
        queue.append(pending)
        nextIndex = index.next
        queueLock.signal()
    }

    /// The newest hard state written or recovered.
    public var hardState: [UInt8]? { table.withLock { $0.hardState } }

    /// The term of an entry in the log, from memory; nil if it is not there (compacted or not yet written).
    public func term(at index: LogIndex) -> Term? {
        table.withLock { table -> Term? in
            guard let position = Self.segmentPosition(of: index, in: table.segments) else { return nil }
            let segment = table.segments[position]
            return Term(segment.terms[Int(index.rawValue - segment.firstIndex.rawValue)])
        }
    }

    /// The position of the segment holding `index`, if any.
    private static func segmentPosition(of index: LogIndex, in segments: [Segment]) -> Int? {
        guard let first = segments.first, let last = segments.last, index >= first.firstIndex, index <= last.lastIndex else { return nil }
        var low = 0
        var high = segments.count - 1
        while low < high {
            let middle = (low + high + 1) / 2
            if segments[middle].firstIndex <= index { low = middle } else { high = middle - 1 }
        }
        return index <= segments[low].lastIndex ? low : nil
    }

    /// Throws unless the log takes writes. Call with `queueLock` held.
    private func checkAccepting() throws(StorageError) {
        switch runState {
        case .running: return
        case .stopped(let reason): throw .stopped(reason: reason)
        case .closing: throw .closed
        }
    }

    /// Appends an entry and returns once it is durable under the policy.
    ///
    /// - Returns: the entry's index.
    public func append(term: Term, payload: [UInt8]) async throws(StorageError) -> LogIndex {
        let result: Result<LogIndex, StorageError> = await withCheckedContinuation { continuation in
            do throws(StorageError) {
                try append(term: term, payload: payload) { continuation.resume(returning: $0) }
            } catch {
                continuation.resume(returning: .failure(error))
            }
        }
        return try result.get()
    }

    /// Why the log stopped, if it has.
    public var stoppedReason: String? {
        queueLock.lock()
        defer { queueLock.unlock() }
        if case .stopped(let reason) = runState { return reason }
        return nil
    }

    // MARK: - Reading

    /// The index of the oldest entry still in the log (after compaction).
    public var firstIndex: LogIndex { table.withLock { $0.segments[0].firstIndex } }

    /// The index of the newest entry written (durable under the policy once its append returned).
    public var lastIndex: LogIndex { table.withLock { $0.segments[$0.segments.count - 1].lastIndex } }

    /// Bytes written to segments since the log was opened.
    public var bytesWritten: UInt64 { table.withLock { $0.bytesWritten } }

    /// Bytes the segments hold after `index`: the records of later entries, and any hard state
    /// and sync markers among them (what a restart would replay on top of a checkpoint at `index`).
    public func bytes(after index: LogIndex) -> UInt64 {
        table.withLock { table in
            var total: UInt64 = 0
            for segment in table.segments {
                let start: Int
                if segment.firstIndex > index {
                    start = LogFormat.segmentHeaderSize // all of it (a hard state record may precede its first entry)
                } else if segment.lastIndex > index {
                    start = Int(segment.offsets[Int(index.rawValue &+ 1 &- segment.firstIndex.rawValue)])
                } else {
                    continue
                }
                total += UInt64(max(0, segment.dataEnd - start))
            }
            return total
        }
    }

    /// fdatasync calls on segments since the log was opened.
    public var syncCount: UInt64 { table.withLock { $0.syncCount } }

    /// The names of the segment files, oldest first.
    public var segmentNames: [String] { table.withLock { $0.segments.map(\.name) } }

    /// Reads one entry.
    ///
    /// - Throws: `.entryUnavailable` if it was compacted or not yet written; `.fileSystem` or
    ///   `.corruption` if it cannot be read back intact.
    public func entry(at index: LogIndex) throws(StorageError) -> LogEntry {
        try table.withLock { table throws(StorageError) -> LogEntry in
            if table.isClosed { throw .closed }
            let first = table.segments[0].firstIndex
            let last = table.segments[table.segments.count - 1].lastIndex
            guard index >= first, index <= last else { throw .entryUnavailable(index, firstIndex: first, lastIndex: last) }
            var low = 0
            var high = table.segments.count - 1
            while low < high {
                let middle = (low + high + 1) / 2
                if table.segments[middle].firstIndex <= index { low = middle } else { high = middle - 1 }
            }
            let segment = table.segments[low]
            let position = Int(index.rawValue - segment.firstIndex.rawValue)
            let offset = Int(segment.offsets[position])
            let end = position + 1 < segment.offsets.count ? Int(segment.offsets[position + 1]) : segment.dataEnd
            let path = joinPath(directory, segment.name)
            let bytes: [UInt8]
            do throws(FileSystemError) { bytes = try fileSystem.readRange(segment.handle, offset: offset, count: end - offset, path: path) } catch { throw .fileSystem(error) }
            let read = bytes.withUnsafeBytes { LogFormat.readRecord($0, at: 0, payloadSizeMax: options.limits.entrySizeMax) }
            switch read {
            case .record(.entry, let foundIndex, let term, let payload, _) where foundIndex == index:
                return LogEntry(index: index, term: term, payload: Array(bytes[payload]))
            case .record, .endOfData, .invalid:
                throw .corruption(file: path, offset: offset, reason: "entry \(index) no longer reads back intact",
                                  remedy: "Run `keel verify \(parentDirectory(of: directory))` to see the extent of the damage.")
            }
        }
    }

    // MARK: - Compaction

    /// Removes segments all of whose entries are at or below `index`, oldest first; never the newest.
    ///
    /// - Returns: the names removed.
    @discardableResult
    public func removeSegments(through index: LogIndex) throws(StorageError) -> [String] {
        // Taken out of the table under its lock, removed after: unlinking a large file can take
        // milliseconds, and the writer (publishing each write) and readers wait for this lock.
        // Readers use a segment's handle only under the lock, so none holds these any more.
        let detached = try table.withLock { table throws(StorageError) -> [Segment] in
            if table.isClosed { throw .closed }
            var detached: [Segment] = []
            while table.segments.count > 1, table.segments[0].lastIndex <= index {
                detached.append(table.segments.removeFirst())
            }
            return detached
        }
        var removed: [String] = []
        var failure: FileSystemError?
        for segment in detached {
            do throws(FileSystemError) { try fileSystem.remove(joinPath(directory, segment.name)) } catch {
                failure = error
                break
            }
            fileSystem.close(segment.handle)
            removed.append(segment.name)
        }
        if let failure {
            // The ones not removed go back, oldest first, for the next compaction to try again.
            let kept = detached.dropFirst(removed.count)
            let closed = table.withLock { table -> Bool in
                if !table.isClosed { table.segments.insert(contentsOf: kept, at: 0) }
                return table.isClosed
            }
            if closed { for segment in kept { fileSystem.close(segment.handle) } }
            if !removed.isEmpty { try? fileSystem.synchronizeDirectory(directory) }
            throw .fileSystem(failure)
        }
        if !removed.isEmpty {
            do { try fileSystem.synchronizeDirectory(directory) } catch { throw .fileSystem(error) }
        }
        return removed
    }

    // MARK: - Closing

    /// Writes and syncs everything queued, stops the writer and closes the files.
    ///
    /// Must not be called from a completion, which runs on the writer thread it would wait for
    /// (or, with inline writes, holds the lock the writer thread needs to finish).
    public func close() {
        precondition(Thread.current !== writerThread, "close() from a completion on the log's writer thread would wait for itself")
        queueLock.lock()
        if closed {
            queueLock.unlock()
            return
        }
        closed = true
        if case .running = runState { runState = .closing }
        queueLock.signal()
        queueLock.unlock()
        writerDone.wait()
        // A preparation under way stops (at its next piece) before the log is closed, and no new one starts.
        preparation.withLock { $0 = .closed }
        preparer.sync {}
        table.withLock { table in
            for segment in table.segments { fileSystem.close(segment.handle) }
            table.isClosed = true
        }
    }

    deinit {
        precondition(closed, "close() a WriteAheadLog before releasing it")
    }

    // MARK: - The writer thread

    private func runWriter() {
        var buffer: [UInt8] = []
        buffer.reserveCapacity(options.limits.groupCommitSizeMax + 64 * 1024)
        var unsynced = false
        var lastSync = ContinuousClock.now
        let interval = Duration.milliseconds(options.everysecIntervalMilliseconds)
        defer { writerDone.signal() }
        while true {
            queueLock.lock()
            // (An inline write at the head is its caller's to write.)
            while queue.first.map({ $0.inline }) ?? true, case .running = runState {
                if options.fsyncPolicy == .everysec && unsynced {
                    let remaining = lastSync + interval - ContinuousClock.now
                    if remaining <= .zero { break }
                    let seconds = Double(remaining.components.seconds) + Double(remaining.components.attoseconds) / 1e18
                    _ = queueLock.wait(until: Date(timeIntervalSinceNow: seconds))
                } else {
                    queueLock.wait()
                }
            }
            queueLock.unlock()
            // Taken and written under `writeLock`: an inline write may have taken the queue first.
            writeLock.lock()
            defer { writeLock.unlock() }
            let (batch, state) = takeBatch(forWriter: true)

            if case .stopped = state { return }
            if batch.isEmpty {
                // Woken for the everysec timer, or to close.
                if unsynced {
                    guard syncNewest() else { return }
                    unsynced = false
                    lastSync = .now
                }
                if case .closing = state { return }
                continue
            }
            switch write(batch, buffer: &buffer) {
            case .durable:
                break
            case .written:
                unsynced = true
                if options.fsyncPolicy == .everysec && ContinuousClock.now - lastSync >= interval {
                    guard syncNewest() else { return }
                    unsynced = false
                    lastSync = .now
                }
            case .stopped:
                return
            case .noSpace:
                continue
            }
        }
    }

    private enum BatchOutcome { case durable, written, stopped, noSpace }

    /// A failure on the write path, and whether the log can go on after it.
    private enum WriteFailure: Error {
        /// ENOSPC from a write, a preallocation or a segment creation: none of the failed records
        /// was acknowledged or synced, and the log can go on.
        case noSpace(FileSystemError)
        /// Anything else, and every error from fdatasync: the log stops.
        case fatal(String)
    }

    /// Runs a write-like call: ENOSPC is recoverable, anything else fatal.
    private func attempt<T>(_ body: () throws(FileSystemError) -> T) throws(WriteFailure) -> T {
        do { return try body() } catch {
            throw error.kind == .noSpace ? .noSpace(error) : .fatal("\(error)")
        }
    }

    /// Runs a call whose failure always stops the log (fdatasync above all: never retried).
    private func attemptFatal<T>(_ body: () throws(FileSystemError) -> T) throws(WriteFailure) -> T {
        do { return try body() } catch { throw .fatal("\(error)") }
    }

    /// Writes a batch, completing its appends in order. Runs under `writeLock` (on the writer
    /// thread, or the caller's of an inline write).
    private func write(_ batch: [Pending], buffer: inout [UInt8]) -> BatchOutcome {
        var current = table.withLock { $0.segments[$0.segments.count - 1].withoutIndexes() }
        var completed = 0 // batch[..<completed] have been acknowledged
        var buffered = 0 // batch[completed..<completed + buffered] are in `buffer`
        var offsets: [UInt32] = []
        var terms: [UInt64] = []
        buffer.removeAll(keepingCapacity: true)
        do throws(WriteFailure) {
            for pending in batch {
                if let after = pending.restartAfter {
                    try flush(&buffer, offsets: &offsets, terms: &terms, into: &current)
                    try restartLog(after: after, current: &current)
                    rewriteHardState = writerHardState != nil
                }
                if pending.replacesSuffix, let entry = pending.entry {
                    try flush(&buffer, offsets: &offsets, terms: &terms, into: &current)
                    try replaceSuffix(from: entry.index, current: &current)
                    rewriteHardState = writerHardState != nil
                }
                // The current hard state again where it may have been cut away, before the entry;
                // a new one after the entry.
                var carried = rewriteHardState ? writerHardState : nil
                let fresh = pending.hardState
                var size = pending.entry.map { LogFormat.recordSize(payloadSize: $0.payload.count) } ?? 0
                size += carried.map { LogFormat.recordSize(payloadSize: $0.count + 8) } ?? 0
                size += fresh.map { LogFormat.recordSize(payloadSize: $0.count + 8) } ?? 0
                let marker = needsSyncMarker(current) ? LogFormat.syncMarkerSize : 0
                if current.dataEnd + buffer.count + marker + size > options.segmentSize, current.entryCount + offsets.count > 0 {
                    try flush(&buffer, offsets: &offsets, terms: &terms, into: &current)
                    try seal(&current)
                    for done in batch[completed..<(completed + buffered)] { done.completion(.success(done.index)) }
                    completed += buffered
                    buffered = 0
                    current = try startSegment(firstIndex: pending.entry?.index ?? current.lastIndex.next)
                    // Every segment carries the current hard state, so compaction never removes the last copy.
                    if fresh == nil { carried = writerHardState }
                }
                addSyncMarkerIfNeeded(&buffer, segment: &current)
                if let carried {
                    let payload = HardStateFile.join(sequence: writerHardStateSequence, state: carried)
                    LogFormat.appendRecord(type: .hardState, index: .zero, term: .zero, payload: payload, to: &buffer)
                    rewriteHardState = false
                }
                if let entry = pending.entry {
                    offsets.append(UInt32(current.dataEnd + buffer.count))
                    terms.append(entry.term.rawValue)
                    LogFormat.appendRecord(type: .entry, index: entry.index, term: entry.term, payload: entry.payload, to: &buffer)
                }
                if let fresh {
                    writerHardStateSequence += 1
                    let payload = HardStateFile.join(sequence: writerHardStateSequence, state: fresh)
                    LogFormat.appendRecord(type: .hardState, index: .zero, term: .zero, payload: payload, to: &buffer)
                    writerHardState = fresh
                    rewriteHardState = false
                }
                buffered += 1
            }
            try flush(&buffer, offsets: &offsets, terms: &terms, into: &current)
            if options.fsyncPolicy == .always { try synchronize(&current) }
        } catch {
            let failed = Array(batch[completed...])
            switch error {
            case .noSpace(let cause):
                recoverFromNoSpace(cause, failed: failed)
                return .noSpace
            case .fatal(let reason):
                stop(reason: reason, failed: failed)
                return .stopped
            }
        }
        for done in batch[completed...] { done.completion(.success(done.index)) }
        return options.fsyncPolicy == .always ? .durable : .written
    }

    /// Before segments are removed or cut: make what is written durable, then put the current hard
    /// state in the hard state file, so no crash in what follows can lose it or bring back an older one.
    private func secureHardState(_ current: inout Segment) throws(WriteFailure) {
        guard let state = writerHardState else { return }
        try synchronize(&current)
        let sequence = writerHardStateSequence
        // Nothing was removed or cut yet, and the hard state is in the log's records too: a full
        // disk here fails the write like any other (the file is replaced by a rename, so the old
        // one stays whole), instead of stopping the log.
        try attempt { () throws(FileSystemError) in
            try HardStateFile.write(logPath: directory, sequence: sequence, state: state, fileSystem: fileSystem)
        }
    }

    /// Removes every segment (newest first, each removal synced) and starts one after `index`.
    /// The caller has made a checkpoint covering `index` durable first, so a crash in between
    /// recovers from that checkpoint with an empty log; the hard state is in its file.
    private func restartLog(after index: LogIndex, current: inout Segment) throws(WriteFailure) {
        try secureHardState(&current)
        let segments = table.withLock { $0.segments }
        for segment in segments.reversed() {
            try attemptFatal { () throws(FileSystemError) in try fileSystem.remove(joinPath(directory, segment.name)) }
            try attemptFatal { () throws(FileSystemError) in try fileSystem.synchronizeDirectory(directory) }
        }
        // The old segments are gone, so there is no log to fall back to: on a full disk the new
        // one is made without its preallocation (it grows as records are written, and a later
        // ENOSPC there is the usual recoverable one). Found by `keel torture`: a follower that
        // installed a checkpoint onto a full disk stopped for good.
        let fresh = try attemptFatal { () throws(FileSystemError) -> Segment in
            do throws(FileSystemError) {
                return try Self.createSegment(directory: directory, firstIndex: index.next, fileSystem: fileSystem, size: options.segmentSize)
            } catch where error.kind == .noSpace {
                return try Self.createSegment(directory: directory, firstIndex: index.next, fileSystem: fileSystem,
                                              size: LogFormat.segmentHeaderSize)
            }
        }
        // Readers hold the table lock while they read, so the old handles close only once no
        // reader can reach them.
        table.withLock { $0.segments = [fresh] }
        for segment in segments { fileSystem.close(segment.handle) }
        current = fresh
    }

    /// Drops the log from `index` on (explicit-index writes; Raft §5.3). The hard state goes to
    /// its file first; then newer segments go, newest first, each removal synced, so a crash leaves
    /// a prefix of the old log (whose suffix was never committed); then the segment holding `index`
    /// is cut at that entry, the cut synced, and it becomes the newest. Runs under `writeLock`, in
    /// order with the writes.
    private func replaceSuffix(from index: LogIndex, current: inout Segment) throws(WriteFailure) {
        let segments = table.withLock { $0.segments }
        guard let position = Self.segmentPosition(of: index, in: segments) else {
            precondition(index == segments[segments.count - 1].lastIndex.next, "replacing entry \(index), which was compacted away")
            return
        }
        try secureHardState(&current)
        for segment in segments[(position + 1)...].reversed() {
            try attemptFatal { () throws(FileSystemError) in try fileSystem.remove(joinPath(directory, segment.name)) }
            try attemptFatal { () throws(FileSystemError) in try fileSystem.synchronizeDirectory(directory) }
            table.withLock { _ = $0.segments.removeLast() }
            fileSystem.close(segment.handle)
        }
        var target = segments[position]
        let keep = Int(index.rawValue - target.firstIndex.rawValue)
        let cut = Int(target.offsets[keep])
        // Readers stop seeing the replaced entries before the bytes go.
        table.withLock { table in
            let last = table.segments.count - 1
            table.segments[last].offsets.removeLast(table.segments[last].offsets.count - keep)
            table.segments[last].terms.removeLast(table.segments[last].terms.count - keep)
            table.segments[last].lastIndex = LogIndex(target.firstIndex.rawValue + UInt64(keep) - 1)
        }
        let oldHandle = target.handle
        if position < segments.count - 1 {
            // A sealed segment becomes the newest again: reopen it for writing.
            let path = joinPath(directory, target.name)
            target.handle = try attemptFatal { () throws(FileSystemError) -> OpenFile in try fileSystem.open(path, options: []) }
        }
        let handle = target.handle
        try attemptFatal { () throws(FileSystemError) in try fileSystem.truncate(handle, to: cut) }
        // The cut is durable before anything is written at it, so old bytes (and old sync markers)
        // can never reappear after newer records.
        try attemptFatal { () throws(FileSystemError) in try fileSystem.synchronize(handle) }
        target.offsets.removeLast(target.offsets.count - keep)
        target.terms.removeLast(target.terms.count - keep)
        target.lastIndex = LogIndex(target.firstIndex.rawValue + UInt64(keep) - 1)
        target.dataEnd = cut
        target.syncedEnd = min(target.syncedEnd, cut)
        target.lastMarker = min(target.lastMarker, cut)
        let replaced = target
        table.withLock { $0.segments[$0.segments.count - 1] = replaced }
        if oldHandle != handle { fileSystem.close(oldHandle) }
        current = target.withoutIndexes()
    }

    /// Whether a sync has moved the segment's synced end past what its last marker says.
    private func needsSyncMarker(_ segment: Segment) -> Bool {
        segment.syncedEnd > max(segment.lastMarker, LogFormat.segmentHeaderSize)
    }

    /// Puts a sync marker before the next record when a sync has moved the segment's synced end.
    private func addSyncMarkerIfNeeded(_ buffer: inout [UInt8], segment: inout Segment) {
        guard needsSyncMarker(segment) else { return }
        LogFormat.appendSyncMarker(syncedEnd: segment.syncedEnd, to: &buffer)
        segment.lastMarker = segment.syncedEnd
    }

    /// Writes the buffer at the segment's end and publishes the new records to readers (the
    /// writer's `segment` keeps only positions; the offsets and terms go to the table's copy).
    private func flush(_ buffer: inout [UInt8], offsets: inout [UInt32], terms: inout [UInt64], into segment: inout Segment) throws(WriteFailure) {
        guard !buffer.isEmpty else { return }
        let handle = segment.handle
        let at = segment.dataEnd
        try attempt { () throws(FileSystemError) in try fileSystem.write(handle, buffer, at: at) }
        segment.dataEnd += buffer.count
        segment.lastIndex = LogIndex(segment.lastIndex.rawValue + UInt64(offsets.count))
        let published = segment
        let written = UInt64(buffer.count)
        let hardState = writerHardState
        table.withLock { table in
            let newest = table.segments.count - 1
            table.segments[newest].dataEnd = published.dataEnd
            table.segments[newest].offsets.append(contentsOf: offsets)
            table.segments[newest].terms.append(contentsOf: terms)
            table.segments[newest].lastIndex = published.lastIndex
            table.segments[newest].lastMarker = published.lastMarker
            table.bytesWritten += written
            table.hardState = hardState
        }
        buffer.removeAll(keepingCapacity: true)
        offsets.removeAll(keepingCapacity: true)
        terms.removeAll(keepingCapacity: true)
    }

    /// fdatasync of the segment; on success its synced end moves to its data end.
    private func synchronize(_ segment: inout Segment) throws(WriteFailure) {
        let handle = segment.handle
        try attemptFatal { () throws(FileSystemError) in try fileSystem.synchronize(handle) }
        segment.syncedEnd = segment.dataEnd
        let syncedEnd = segment.syncedEnd
        table.withLock { table in
            table.syncCount += 1
            if table.segments[table.segments.count - 1].handle == handle { table.segments[table.segments.count - 1].syncedEnd = syncedEnd }
        }
    }

    /// Trims a full segment to its last record and syncs it: a sealed segment holds nothing but
    /// records, all durable.
    private func seal(_ segment: inout Segment) throws(WriteFailure) {
        let handle = segment.handle
        let size = segment.dataEnd
        try attemptFatal { () throws(FileSystemError) in try fileSystem.truncate(handle, to: size) }
        try synchronize(&segment)
    }

    /// Creates the next segment and makes it the current one.
    private func startSegment(firstIndex: LogIndex) throws(WriteFailure) -> Segment {
        let segment: Segment
        if let prepared = try attemptFatal({ () throws(FileSystemError) -> Segment? in try takePreparedSegment(firstIndex: firstIndex) }) {
            segment = prepared
        } else {
            cancelPreparation()
            segment = try attempt { () throws(FileSystemError) -> Segment in
                try Self.createSegment(directory: directory, firstIndex: firstIndex, fileSystem: fileSystem, size: options.segmentSize)
            }
        }
        table.withLock { $0.segments.append(segment) }
        prepareNextSegment()
        return segment
    }

    /// Creates a segment file: header, preallocation (zero-filled when asked), sync, directory sync. On ENOSPC the file is
    /// removed again (and the removal synced); if that cleanup fails the error is not ENOSPC, so
    /// the writer stops rather than leave a stray segment behind.
    static func createSegment(directory: String, firstIndex: LogIndex, fileSystem: any FileSystem, size: Int,
                              zeroFill: Bool = false) throws(FileSystemError) -> Segment {
        let name = LogFormat.segmentName(firstIndex: firstIndex)
        let path = joinPath(directory, name)
        let handle = try fileSystem.open(path, options: [.create, .truncate])
        do {
            try fileSystem.write(handle, LogFormat.encodeSegmentHeader(firstIndex: firstIndex), at: 0)
            try fileSystem.allocate(handle, offset: 0, length: size)
            if zeroFill, size > LogFormat.segmentHeaderSize {
                try fileSystem.zeroFill(handle, offset: LogFormat.segmentHeaderSize, length: size - LogFormat.segmentHeaderSize)
            }
            try fileSystem.synchronize(handle)
            try fileSystem.synchronizeDirectory(directory)
        } catch {
            fileSystem.close(handle)
            if error.kind == .noSpace {
                do {
                    try fileSystem.remove(path)
                    try fileSystem.synchronizeDirectory(directory)
                } catch let removal {
                    throw FileSystemError(kind: .other, errno: removal.errno, operation: removal.operation,
                                          path: "\(removal.path) (removing a segment after: \(error))")
                }
            }
            throw error
        }
        let header = LogFormat.segmentHeaderSize
        return Segment(name: name, handle: handle, firstIndex: firstIndex, lastIndex: LogIndex(firstIndex.rawValue - 1),
                       dataEnd: header, offsets: [], terms: [], syncedEnd: header, lastMarker: header)
    }

    /// Syncs the newest segment (everysec, never at close). Returns false if the log stopped.
    private func syncNewest() -> Bool {
        var newest = table.withLock { $0.segments[$0.segments.count - 1] }
        do {
            try synchronize(&newest)
            return true
        } catch {
            switch error {
            case .noSpace(let cause): stop(reason: "\(cause)", failed: [])
            case .fatal(let reason): stop(reason: reason, failed: [])
            }
            return false
        }
    }

    /// ENOSPC: fail the batch's rest and the queue, cut the segment back to its last published
    /// record, and go on. The table holds the records written and published, which may include
    /// the first records of a failed caller's batch (written before a rotation that failed): the
    /// log's `lastIndex` afterwards says which of a failed batch's entries are kept.
    private func recoverFromNoSpace(_ error: FileSystemError, failed: [Pending]) {
        // A prepared next segment holds a segment's worth of space: give it back (the next
        // successful rotation prepares again).
        cancelPreparation()
        let (newest, published) = table.withLock { ($0.segments[$0.segments.count - 1], $0.hardState) }
        // A hard state in the failed part was not written: fall back to the one that was, and
        // write it again with the next record (the failed part may have been a rewrite it owed).
        writerHardState = published
        rewriteHardState = published != nil
        queueLock.lock()
        let abandoned = Array(queue)
        queue.removeAll()
        queuedBytes = 0
        nextIndex = newest.lastIndex.next
        queueLock.unlock()
        do throws(FileSystemError) {
            try fileSystem.truncate(newest.handle, to: newest.dataEnd)
        } catch {
            stop(reason: "after a full disk (\(error)), cutting the log back to its last record failed: \(error)", failed: failed + abandoned)
            return
        }
        do throws(FileSystemError) {
            // Preallocate again if there is room; without it appends still work, only slower.
            try fileSystem.allocate(newest.handle, offset: 0, length: max(options.segmentSize, newest.dataEnd))
        } catch where error.kind == .noSpace {
            // Still full: the segment stays unpreallocated until a later rotation.
        } catch {
            stop(reason: "after a full disk, preallocating the segment again failed: \(error)", failed: failed + abandoned)
            return
        }
        for pending in failed + abandoned { pending.completion(.failure(.noSpace(error))) }
    }

    /// A fatal error: refuse everything from now on, fail what is waiting, and cut the newest
    /// segment back to its synced end. After a failed writeback Linux keeps the unsynced bytes
    /// readable but no longer dirty, so without the cut a restart of the process would read back
    /// and replay writes that were never durable, and a power loss later would lose them under
    /// newer, synced records.
    private func stop(reason: String, failed: [Pending]) {
        var why = reason
        let newest = table.withLock { $0.segments[$0.segments.count - 1] }
        do throws(FileSystemError) {
            if newest.syncedEnd < newest.dataEnd { try fileSystem.truncate(newest.handle, to: newest.syncedEnd) }
            table.withLock { table in
                let last = table.segments.count - 1
                let kept = table.segments[last].offsets.prefix { Int($0) < newest.syncedEnd }.count
                table.segments[last].offsets.removeLast(table.segments[last].offsets.count - kept)
                table.segments[last].terms.removeLast(table.segments[last].terms.count - kept)
                table.segments[last].lastIndex = LogIndex(table.segments[last].firstIndex.rawValue - 1 + UInt64(kept))
                table.segments[last].dataEnd = newest.syncedEnd
            }
        } catch {
            why += "; cutting the unsynced tail off also failed (\(error)): do not restart before checking the disk"
        }
        queueLock.lock()
        runState = .stopped(why)
        let abandoned = Array(queue)
        queue.removeAll()
        queuedBytes = 0
        queueLock.unlock()
        for pending in failed + abandoned { pending.completion(.failure(.stopped(reason: why))) }
    }
}
