// The write-ahead log: many appenders, one writer thread, group commit.
//
// Appenders enqueue under `queueLock` and are given the next index there, so index order is queue
// order. The writer thread takes everything queued (up to `Limits.groupCommitSizeMax` bytes),
// encodes it into one buffer, writes it with one pwrite, makes it durable with one fdatasync
// (policy `always`), and only then calls the appenders' completions, in index order. Appends that
// arrive while a sync runs wait in the queue and share the next one: that is group commit.
//
// Failure rules (DESIGN.md contract 3):
// - A failed fdatasync, or any write error but ENOSPC, stops the log for good: the batch and
//   everything queued fail, nothing more is acknowledged, and every later append is refused with
//   `StorageError.stopped`, whose message says why. The sync is never retried.
// - ENOSPC fails the writes it hit and everything queued behind them, truncates the segment back to
//   its last complete record, and leaves the log running: reads work, and later appends are tried
//   again (and succeed once space is freed).
//
// Rotation: when the next record would pass `segmentSize`, the current segment is synced, trimmed
// to its last record and synced again (it is now sealed: nothing invalid may ever be found in it),
// then the next segment is created with its header, preallocated, synced, and the directory synced.

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
    }
}

/// A durable, append-only sequence of entries in segment files, written by one thread.
public final class WriteAheadLog: @unchecked Sendable {
    // @unchecked Sendable: the mutable state is split in two, each part guarded:
    // `queueLock` guards `queue`, `nextIndex` and `runState`; `segments` (a Mutex) guards the
    // segment table that readers and compaction use. The current segment's file is written only by
    // the writer thread, and a segment's handle is closed only under `segments` by compaction,
    // which never touches the newest segment.

    /// An append waiting for the writer.
    private struct Pending {
        let index: LogIndex
        let term: Term
        let payload: [UInt8]
        let completion: @Sendable (Result<LogIndex, StorageError>) -> Void
    }

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
    }

    private struct Table {
        var segments: [Segment]
        var bytesWritten: UInt64 = 0
        var syncCount: UInt64 = 0
    }

    /// The directory holding the segments.
    public let directory: String
    /// The settings.
    public let options: LogOptions
    private let fileSystem: any FileSystem

    private let queueLock = NSCondition()
    private var queue = Deque<Pending>()
    private var queuedBytes = 0
    private var nextIndex: LogIndex
    private var runState = RunState.running
    private let writerDone = DispatchSemaphore(value: 0)
    private var closed = false

    private let table: Mutex<Table>

    /// Opens the log over segments that recovery has already checked (and repaired), or creates
    /// the first segment at `nextIndex` when there are none.
    ///
    /// - Parameters:
    ///   - directory: the `log` directory.
    ///   - scans: the segments, oldest first, each ending clean.
    ///   - nextIndex: the index the next append gets.
    init(directory: String, fileSystem: any FileSystem, options: LogOptions, scans: [SegmentScan], nextIndex: LogIndex) throws(StorageError) {
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
                segments.append(Segment(name: scan.name, handle: handle, firstIndex: scan.firstIndex, lastIndex: scan.lastIndex, dataEnd: scan.dataEnd, offsets: scan.offsets))
            }
            if let newest = segments.last {
                precondition(newest.lastIndex.next == nextIndex, "the log must continue from its newest segment")
            } else {
                segments.append(try Self.createSegment(directory: directory, firstIndex: nextIndex, fileSystem: fileSystem, size: options.segmentSize))
            }
        } catch {
            for segment in segments { fileSystem.close(segment.handle) }
            throw .fileSystem(error)
        }
        table = Mutex(Table(segments: segments))
        let thread = Thread { [self] in self.runWriter() }
        thread.name = "keel-log-writer"
        thread.start()
    }

    // MARK: - Appending

    /// Queues an entry; `completion` runs on the writer thread once the entry is durable under the
    /// policy (or has failed), after the completions of all earlier entries.
    ///
    /// - Returns: the index the entry will have.
    /// - Throws: `StorageError` when the log refuses the entry at once (stopped, closed, over a limit).
    @discardableResult
    public func append(term: Term, payload: [UInt8], completion: @escaping @Sendable (Result<LogIndex, StorageError>) -> Void) throws(StorageError) -> LogIndex {
        guard payload.count <= options.limits.entrySizeMax else {
            throw .entryTooLarge(size: payload.count, limit: options.limits.entrySizeMax)
        }
        queueLock.lock()
        defer { queueLock.unlock() }
        switch runState {
        case .running: break
        case .stopped(let reason): throw .stopped(reason: reason)
        case .closing: throw .closed
        }
        guard queue.count < options.limits.appendQueueCountMax else { throw .overloaded(queued: queue.count) }
        let index = nextIndex
        nextIndex = index.next
        queue.append(Pending(index: index, term: term, payload: payload, completion: completion))
        queuedBytes += payload.count
        queueLock.signal()
        return index
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
            case .record(_, let foundIndex, let term, let payload, _) where foundIndex == index:
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
        let removed = try table.withLock { table throws(StorageError) -> [String] in
            var names: [String] = []
            while table.segments.count > 1, table.segments[0].lastIndex <= index {
                let segment = table.segments[0]
                do throws(FileSystemError) { try fileSystem.remove(joinPath(directory, segment.name)) } catch { throw .fileSystem(error) }
                fileSystem.close(segment.handle)
                table.segments.removeFirst()
                names.append(segment.name)
            }
            return names
        }
        if !removed.isEmpty {
            do { try fileSystem.synchronizeDirectory(directory) } catch { throw .fileSystem(error) }
        }
        return removed
    }

    // MARK: - Closing

    /// Writes and syncs everything queued, stops the writer and closes the files.
    public func close() {
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
        table.withLock { table in
            for segment in table.segments { fileSystem.close(segment.handle) }
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
            while queue.isEmpty, case .running = runState {
                if options.fsyncPolicy == .everysec && unsynced {
                    let remaining = lastSync + interval - ContinuousClock.now
                    if remaining <= .zero { break }
                    let seconds = Double(remaining.components.seconds) + Double(remaining.components.attoseconds) / 1e18
                    _ = queueLock.wait(until: Date(timeIntervalSinceNow: seconds))
                } else {
                    queueLock.wait()
                }
            }
            let state = runState
            var batch: [Pending] = []
            var batchBytes = 0
            while let first = queue.first, batch.isEmpty || batchBytes + first.payload.count <= options.limits.groupCommitSizeMax {
                batch.append(queue.removeFirst())
                batchBytes += first.payload.count
            }
            queuedBytes -= batchBytes
            queueLock.unlock()

            if case .stopped = state { return }
            if batch.isEmpty {
                // Woken for the everysec timer, or to close.
                if unsynced {
                    guard syncCurrent() else { return }
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
                    guard syncCurrent() else { return }
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

    /// Writes a batch, completing its appends in order. Runs on the writer thread.
    private func write(_ batch: [Pending], buffer: inout [UInt8]) -> BatchOutcome {
        var current = table.withLock { $0.segments[$0.segments.count - 1] }
        var completed = 0 // batch[..<completed] have been acknowledged
        var buffered = 0 // batch[completed..<completed + buffered] are in `buffer`
        var offsets: [UInt32] = []
        buffer.removeAll(keepingCapacity: true)
        do {
            for pending in batch {
                let size = LogFormat.recordSize(payloadSize: pending.payload.count)
                if current.dataEnd + buffer.count + size > options.segmentSize, current.offsets.count + offsets.count > 0 {
                    try flush(&buffer, offsets: &offsets, into: &current)
                    try seal(current)
                    for done in batch[completed..<(completed + buffered)] { done.completion(.success(done.index)) }
                    completed += buffered
                    buffered = 0
                    current = try startSegment(firstIndex: pending.index)
                }
                offsets.append(UInt32(current.dataEnd + buffer.count))
                LogFormat.appendRecord(type: .entry, index: pending.index, term: pending.term, payload: pending.payload, to: &buffer)
                buffered += 1
            }
            try flush(&buffer, offsets: &offsets, into: &current)
            if options.fsyncPolicy == .always {
                try fileSystem.synchronize(current.handle)
                table.withLock { $0.syncCount += 1 }
            }
        } catch {
            let failed = Array(batch[completed...])
            if error.kind == .noSpace {
                recoverFromNoSpace(current, error: error, failed: failed)
                return .noSpace
            }
            stop(reason: "\(error)", failed: failed)
            return .stopped
        }
        for done in batch[completed...] { done.completion(.success(done.index)) }
        return options.fsyncPolicy == .always ? .durable : .written
    }

    /// Writes the buffer at the segment's end and publishes the new records to readers.
    private func flush(_ buffer: inout [UInt8], offsets: inout [UInt32], into segment: inout Segment) throws(FileSystemError) {
        guard !buffer.isEmpty else { return }
        try fileSystem.write(segment.handle, buffer, at: segment.dataEnd)
        segment.dataEnd += buffer.count
        segment.offsets.append(contentsOf: offsets)
        segment.lastIndex = LogIndex(segment.lastIndex.rawValue + UInt64(offsets.count))
        let published = segment
        let written = UInt64(buffer.count)
        table.withLock { table in
            table.segments[table.segments.count - 1].dataEnd = published.dataEnd
            table.segments[table.segments.count - 1].offsets.append(contentsOf: offsets)
            table.segments[table.segments.count - 1].lastIndex = published.lastIndex
            table.bytesWritten += written
        }
        buffer.removeAll(keepingCapacity: true)
        offsets.removeAll(keepingCapacity: true)
    }

    /// Syncs a full segment and trims it to its last record, so it holds nothing but records.
    private func seal(_ segment: Segment) throws(FileSystemError) {
        try fileSystem.truncate(segment.handle, to: segment.dataEnd)
        try fileSystem.synchronize(segment.handle)
        table.withLock { $0.syncCount += 1 }
    }

    /// Creates the next segment and makes it the current one.
    private func startSegment(firstIndex: LogIndex) throws(FileSystemError) -> Segment {
        let segment = try Self.createSegment(directory: directory, firstIndex: firstIndex, fileSystem: fileSystem, size: options.segmentSize)
        table.withLock { $0.segments.append(segment) }
        return segment
    }

    /// Creates a segment file: header, preallocation, sync, directory sync. On failure nothing is left behind.
    static func createSegment(directory: String, firstIndex: LogIndex, fileSystem: any FileSystem, size: Int) throws(FileSystemError) -> Segment {
        let name = LogFormat.segmentName(firstIndex: firstIndex)
        let path = joinPath(directory, name)
        let handle = try fileSystem.open(path, options: [.create, .truncate])
        do {
            try fileSystem.write(handle, LogFormat.encodeSegmentHeader(firstIndex: firstIndex), at: 0)
            try fileSystem.allocate(handle, offset: 0, length: size)
            try fileSystem.synchronize(handle)
            try fileSystem.synchronizeDirectory(directory)
        } catch {
            fileSystem.close(handle)
            if error.kind == .noSpace {
                // The segment never held a record; removing it gives the space back. If even that
                // fails, recovery discards a newest segment without records anyway.
                do { try fileSystem.remove(path) } catch let removal {
                    throw FileSystemError(kind: error.kind, errno: error.errno, operation: error.operation,
                                          path: "\(error.path) (and removing it failed: \(removal))")
                }
            }
            throw error
        }
        return Segment(name: name, handle: handle, firstIndex: firstIndex, lastIndex: LogIndex(firstIndex.rawValue - 1),
                       dataEnd: LogFormat.segmentHeaderSize, offsets: [])
    }

    /// Syncs the current segment (everysec, never at close). Returns false if the log stopped.
    private func syncCurrent() -> Bool {
        let handle = table.withLock { $0.segments[$0.segments.count - 1].handle }
        do {
            try fileSystem.synchronize(handle)
            table.withLock { $0.syncCount += 1 }
            return true
        } catch {
            stop(reason: "\(error)", failed: [])
            return false
        }
    }

    /// ENOSPC: fail the batch's rest and the queue, cut the segment back to its last record.
    private func recoverFromNoSpace(_ current: Segment, error: FileSystemError, failed: [Pending]) {
        let published = table.withLock { $0.segments[$0.segments.count - 1] }
        var abandoned: [Pending] = []
        queueLock.lock()
        abandoned = Array(queue)
        queue.removeAll()
        queuedBytes = 0
        nextIndex = published.lastIndex.next
        queueLock.unlock()
        do {
            try fileSystem.truncate(published.handle, to: published.dataEnd)
            try fileSystem.synchronize(published.handle)
        } catch let cleanup {
            stop(reason: "after a full disk (\(error)), cutting the log back to its last record failed: \(cleanup)", failed: failed + abandoned)
            return
        }
        for pending in failed + abandoned { pending.completion(.failure(.noSpace(error))) }
    }

    /// A fatal error: refuse everything from now on and fail what is waiting.
    private func stop(reason: String, failed: [Pending]) {
        queueLock.lock()
        runState = .stopped(reason)
        let abandoned = Array(queue)
        queue.removeAll()
        queuedBytes = 0
        queueLock.unlock()
        for pending in failed + abandoned { pending.completion(.failure(.stopped(reason: reason))) }
    }
}
