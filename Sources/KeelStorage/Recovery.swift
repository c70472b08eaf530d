// Recovery: from what is on disk back to the exact state (DESIGN.md contract 4).
//
//   1. Remove temporary checkpoint files left by a crash.
//   2. Load the newest checkpoint that verifies; if it does not, fall back to the older one
//      (compaction keeps the log the older one needs, so the fallback loses nothing).
//   3. Read every segment, checking every record; apply only the entries after the checkpoint's
//      index, in order, each once.
//   4. The newest segment may end in a torn tail (a write in flight at the crash, never
//      acknowledged): it is cut off and the cut is synced. A newest segment whose header never made
//      it to disk is removed. Damage anywhere else, or followed by valid records, is corruption:
//      recovery refuses to start and names the file, the offset and the command to run.
//   5. A report says what was used, replayed and cut, and how long it took.
//
// docs/recovery.md has the decision table; each row has a named test.

import KeelCore

/// What recovery did.
public struct RecoveryReport: Sendable, CustomStringConvertible {
    /// The checkpoint loaded, if any.
    public var checkpoint: CheckpointMetadata?
    /// Checkpoints that failed verification, with the reason.
    public var rejectedCheckpoints: [(name: String, reason: String)] = []
    /// Entries applied from the log.
    public var entriesReplayed = 0
    /// Bytes of log read.
    public var bytesRead = 0
    /// The last index in the state after recovery.
    public var lastIndex = LogIndex.zero
    /// Bytes cut off a torn tail.
    public var bytesTruncated = 0
    /// Where the torn tail was, and why it did not parse.
    public var tornTail: (file: String, offset: Int, reason: String)?
    /// Segment files removed: a header that never reached the disk, damage in a segment the
    /// checkpoint covers, or a log the checkpoint outran.
    public var removedSegments: [String] = []
    /// Things the operator should know that did not stop the start.
    public var warnings: [String] = []
    /// Wall-clock duration in nanoseconds.
    public var durationNanoseconds: UInt64 = 0

    public var description: String {
        var parts: [String] = []
        if let checkpoint {
            parts.append("loaded checkpoint at index \(checkpoint.index) (term \(checkpoint.term))")
        } else {
            parts.append("no checkpoint")
        }
        for rejected in rejectedCheckpoints { parts.append("rejected checkpoint \(rejected.name): \(rejected.reason)") }
        parts.append("replayed \(entriesReplayed) entries (\(bytesRead) bytes of log read)")
        parts.append("last index \(lastIndex)")
        if let tornTail {
            parts.append("truncated a torn tail of \(bytesTruncated) bytes in \(tornTail.file) at offset \(tornTail.offset) (\(tornTail.reason))")
        } else {
            parts.append("no torn tail")
        }
        if !removedSegments.isEmpty { parts.append("removed segments \(removedSegments.joined(separator: ", "))") }
        for warning in warnings { parts.append("warning: \(warning)") }
        parts.append("took \(durationNanoseconds / 1_000_000) ms")
        return "recovery: " + parts.joined(separator: "; ")
    }
}

/// The outcome of recovery: the report, and what the log needs to open.
struct RecoveredLog {
    var report: RecoveryReport
    var scans: [SegmentScan]
    var nextIndex: LogIndex
    /// The newest hard state (the highest sequence number in the log's records and the hard state file).
    var hardState: [UInt8]?
    var hardStateSequence: UInt64 = 0
}

/// Reads a whole segment, refusing a file larger than any segment Keel writes.
func readSegment(directory: DataDirectory, name: String, limits: Limits) throws(StorageError) -> [UInt8] {
    let path = joinPath(directory.logPath, name)
    return try readSegmentFile(path, fileSystem: directory.fileSystem, limits: limits)
}

func readSegmentFile(_ path: String, fileSystem: any FileSystem, limits: Limits) throws(StorageError) -> [UInt8] {
    let sizeMax = limits.segmentSizeMax + limits.entrySizeMax + 4096
    do {
        let handle = try fileSystem.open(path, options: [.readOnly])
        defer { fileSystem.close(handle) }
        let size = try fileSystem.size(of: handle)
        guard size <= sizeMax else {
            throw StorageError.corruption(file: path, offset: 0, reason: "the file has \(size) bytes, more than any segment holds (\(sizeMax))",
                                          remedy: "Check what wrote this file; `keel inspect` lists the log.")
        }
        return try fileSystem.readAll(handle, path: path)
    } catch let error as StorageError {
        throw error
    } catch let error as FileSystemError {
        throw .fileSystem(error)
    } catch {
        preconditionFailure("unexpected error \(error)")
    }
}

/// Recovers a data directory into a state machine.
public enum Recovery {
    /// Restores the newest valid checkpoint and replays the log after it.
    ///
    /// - Parameters:
    ///   - directory: the opened data directory.
    ///   - options: segment size and limits (for re-preallocation and record bounds).
    ///   - stopAt: replay only up to this index (point-in-time recovery); the files are then left
    ///     exactly as they are, and no log is opened.
    ///   - restore: loads a checkpoint body into the state machine.
    ///   - apply: applies one entry.
    static func run(
        directory: DataDirectory,
        options: LogOptions,
        stopAt: LogIndex? = nil,
        restore: (CheckpointMetadata, [UInt8]) throws(StorageError) -> Void,
        apply: (LogEntry) throws(StorageError) -> Void
    ) throws(StorageError) -> RecoveredLog {
        let started = ContinuousClock.now
        let fileSystem = directory.fileSystem
        let repair = stopAt == nil
        var report = RecoveryReport()
        let checkpoints = CheckpointStore(directory: directory.checkpointsPath, fileSystem: fileSystem, limits: options.limits)
        if repair { try checkpoints.removeStrayTemporaryFiles() }
        let segmentNames = try DataDirectory.segmentNames(logPath: directory.logPath, fileSystem: fileSystem)
        let logFirstIndex = segmentNames.first.flatMap(LogFormat.firstIndex(fromSegmentName:))
        let remedyVerify = "Run `keel verify \(directory.path)` to see every problem, and `keel recover \(directory.path) --truncate-after-corruption` to drop everything from the damage on (it prints what it will drop first)."

        // 2. The newest checkpoint that verifies.
        var candidates = try checkpoints.list()
        if let stopAt { candidates = candidates.filter { $0.index <= stopAt } }
        var loaded: CheckpointMetadata?
        for candidate in candidates {
            switch try checkpoints.load(candidate) {
            case .failure(let problem):
                report.rejectedCheckpoints.append((candidate.name, problem.reason))
            case .success(let (metadata, body)):
                try restore(metadata, body)
                loaded = metadata
            }
            if loaded != nil { break }
        }
        report.checkpoint = loaded
        let base = loaded?.index ?? .zero
        if let first = logFirstIndex, first > base.next {
            let what = loaded.map { "the newest usable checkpoint covers up to index \($0.index)" } ?? "no checkpoint could be loaded"
            throw .unrecoverable(
                reason: "\(what), but the log begins at index \(first): entries \(base.next)...\(LogIndex(first.rawValue - 1)) are missing"
                    + (report.rejectedCheckpoints.isEmpty ? "" : " (rejected: " + report.rejectedCheckpoints.map { "\($0.name): \($0.reason)" }.joined(separator: "; ") + ")"),
                remedy: "Restore the data directory from a backup, or rebuild this node from a peer; `keel inspect \(directory.path)` lists what is present.")
        }

        // 3. Segments wholly covered by the loaded checkpoint are not needed to rebuild the state,
        // only to fall back to an older checkpoint: damage in them is reported, and they are
        // dropped instead of stopping the start.
        let firstIndexes = segmentNames.map { LogFormat.firstIndex(fromSegmentName: $0) ?? LogIndex(1) }
        var coveredCount = 0
        while coveredCount + 1 < segmentNames.count, firstIndexes[coveredCount + 1] <= base.next { coveredCount += 1 }
        var scans: [SegmentScan] = []
        var expected: LogIndex?
        var coveredDamage: String?
        for position in 0..<coveredCount {
            let name = segmentNames[position]
            let bytes = try readSegment(directory: directory, name: name, limits: options.limits)
            report.bytesRead += bytes.count
            let scan = SegmentScanner.scan(bytes, name: name, isNewest: false, limits: options.limits)
            if let expected, scan.firstIndex != expected {
                coveredDamage = "log/\(name) at offset 0: the previous segment ended at \(LogIndex(expected.rawValue - 1))"
            } else if case .corrupt(let offset, let reason) = scan.ending {
                coveredDamage = "log/\(name) at offset \(offset): \(reason)"
            } else if case .badHeader(let reason) = scan.ending {
                coveredDamage = "log/\(name) at offset 0: \(reason)"
            } else if case .tornTail(let offset, let reason) = scan.ending {
                coveredDamage = "log/\(name) at offset \(offset): \(reason)"
            }
            if coveredDamage != nil { break }
            expected = scan.lastIndex.next
            scans.append(scan)
        }
        if let coveredDamage {
            let names = Array(segmentNames[..<coveredCount])
            report.warnings.append("damage in a log segment that the checkpoint at index \(base) covers (\(coveredDamage)); "
                + "nothing is lost, but falling back to an older checkpoint is no longer possible; removed \(names.joined(separator: ", "))")
            if repair {
                do {
                    for name in names { try fileSystem.remove(joinPath(directory.logPath, name)) }
                    try fileSystem.synchronizeDirectory(directory.logPath)
                } catch { throw .fileSystem(error) }
                report.removedSegments.append(contentsOf: names)
            }
            scans = []
            expected = nil
        }

        // 4. The segments the state needs, in order.
        var lastIndex = base
        for position in coveredCount..<segmentNames.count {
            let name = segmentNames[position]
            let isNewest = position == segmentNames.count - 1
            let path = joinPath(directory.logPath, name)
            let bytes = try readSegment(directory: directory, name: name, limits: options.limits)
            report.bytesRead += bytes.count
            var scan = try SegmentScanner.scan(bytes, name: name, isNewest: isNewest, limits: options.limits) { (entry: LogEntry) throws(StorageError) in
                guard entry.index > base else { return }
                if let stopAt, entry.index > stopAt { return }
                try apply(entry)
                report.entriesReplayed += 1
                lastIndex = entry.index
            }
            if let expected, scan.firstIndex != expected {
                throw .corruption(file: path, offset: 0, reason: "the segment begins at index \(scan.firstIndex) but the previous one ended at \(LogIndex(expected.rawValue - 1)): a segment is missing", remedy: remedyVerify)
            }
            switch scan.ending {
            case .clean:
                break
            case .corrupt(let offset, let reason):
                throw .corruption(file: path, offset: offset, reason: reason, remedy: remedyVerify)
            case .badHeader(let reason):
                let later = bytes.withUnsafeBytes { SegmentScanner.firstValidRecord($0, after: 0, limits: options.limits) }
                guard isNewest, later == nil else {
                    throw .corruption(file: path, offset: 0, reason: reason, remedy: remedyVerify)
                }
                // A segment being created at the crash: it never held an acknowledged record.
                if repair {
                    do {
                        try fileSystem.remove(path)
                        try fileSystem.synchronizeDirectory(directory.logPath)
                    } catch { throw .fileSystem(error) }
                    report.removedSegments.append(name)
                }
                continue
            case .tornTail(let offset, let reason):
                let nonZeroEnd = (bytes.lastIndex(where: { $0 != 0 }) ?? (offset - 1)) + 1
                report.bytesTruncated = max(0, nonZeroEnd - offset)
                report.tornTail = (path, offset, reason)
                if repair {
                    do {
                        let handle = try fileSystem.open(path, options: [])
                        defer { fileSystem.close(handle) }
                        try fileSystem.truncate(handle, to: offset)
                        do {
                            try fileSystem.allocate(handle, offset: 0, length: max(options.segmentSize, offset))
                        } catch where error.kind == .noSpace {
                            // A full disk must not stop the start: the segment grows as it is written.
                            report.warnings.append("could not preallocate \(path) again: the disk is full")
                        }
                        try fileSystem.synchronize(handle)
                    } catch { throw .fileSystem(error) }
                    scan.fileSize = max(options.segmentSize, offset)
                    scan.dataEnd = min(scan.dataEnd, offset)
                    scan.ending = .clean
                }
            }
            expected = scan.lastIndex.next
            scans.append(scan)
        }
        let logLastIndex = scans.last?.lastIndex
        if let stopAt {
            let reached = max(lastIndex, base)
            guard reached == stopAt else {
                throw .unrecoverable(reason: "point-in-time recovery to index \(stopAt) is not possible: the log and checkpoints reach only index \(reached)",
                                     remedy: "Choose an index at or below \(reached); `keel inspect \(directory.path)` shows the ranges.")
            }
        }
        // The checkpoint may cover more than the log kept (fsync `everysec` or `never`): the
        // checkpoint is durable, so the log simply continues after it in a fresh segment.
        var nextIndex = max(logLastIndex ?? base, base).next
        var newest: (sequence: UInt64, state: [UInt8])? = try HardStateFile.read(logPath: directory.logPath, fileSystem: fileSystem)
        for scan in scans {
            guard let payload = scan.hardState, let record = HardStateFile.split(payload) else { continue }
            if newest == nil || record.sequence > newest!.sequence { newest = record }
        }
        if repair, let logLastIndex, logLastIndex < base {
            if let newest {
                // The segments about to go may hold the only copy of the hard state.
                do { try HardStateFile.write(logPath: directory.logPath, sequence: newest.sequence, state: newest.state, fileSystem: fileSystem) } catch {
                    throw .fileSystem(error)
                }
            }
            do {
                for scan in scans.reversed() { try fileSystem.remove(joinPath(directory.logPath, scan.name)) }
                try fileSystem.synchronizeDirectory(directory.logPath)
            } catch { throw .fileSystem(error) }
            report.removedSegments.append(contentsOf: scans.map(\.name))
            scans = []
            nextIndex = base.next
        }
        report.lastIndex = LogIndex(nextIndex.rawValue - 1)
        if stopAt != nil { report.lastIndex = stopAt! }
        let elapsed = ContinuousClock.now - started
        report.durationNanoseconds = UInt64(elapsed.components.seconds) * 1_000_000_000 + UInt64(elapsed.components.attoseconds / 1_000_000_000)
        return RecoveredLog(report: report, scans: scans, nextIndex: nextIndex, hardState: newest?.state, hardStateSequence: newest?.sequence ?? 0)
    }
}
