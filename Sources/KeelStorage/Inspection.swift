// What the operator commands (`keel inspect`, `keel verify`, `keel recover`) see and do.
//
// Inspection reads a data directory without taking its lock or changing anything: every segment
// and checkpoint is checked and each problem is named with its file and offset. The repair plans
// say exactly what they will drop before anything is dropped, and they are carried out in an order
// that a crash cannot turn into a different result: checkpoints that would undo the repair go
// first, then log segments from the newest back, then the cut in the segment that keeps its head.

import KeelCore

/// A problem found by inspection.
public struct InspectionProblem: Sendable, Equatable, CustomStringConvertible {
    /// The file, relative to the data directory (`log/000…1.seg`, `checkpoints/…`).
    public var file: String
    /// The byte offset in it.
    public var offset: Int
    /// What is wrong.
    public var reason: String

    public var description: String { "\(file) at offset \(offset): \(reason)" }
}

/// A checkpoint file and whether it verifies.
public struct CheckpointInspection: Sendable {
    public var file: CheckpointFile
    public var size: Int
    /// The metadata if it verifies, otherwise why not.
    public var verdict: Result<CheckpointMetadata, FormatProblem>
}

/// Everything inspection found in a data directory.
public struct DirectoryInspection: Sendable {
    /// The data directory.
    public var path: String
    /// The segments, oldest first.
    public var segments: [SegmentScan] = []
    /// The checkpoints, newest first.
    public var checkpoints: [CheckpointInspection] = []
    /// Temporary checkpoint files left by a crash.
    public var strayFiles: [String] = []
    /// Every problem, in file order.
    public var problems: [InspectionProblem] = []

    /// Whether nothing at all is wrong.
    public var isClean: Bool { problems.isEmpty }

    /// The index of the newest checkpoint that verifies.
    public var newestValidCheckpointIndex: LogIndex? {
        checkpoints.compactMap { try? $0.verdict.get() }.map(\.index).max()
    }

    /// How many segments, from the oldest, the newest valid checkpoint covers wholly (recovery
    /// does not need them, and drops them if they are damaged).
    public var coveredSegmentCount: Int {
        guard let base = newestValidCheckpointIndex else { return 0 }
        var count = 0
        while count + 1 < segments.count, segments[count + 1].firstIndex <= base.next { count += 1 }
        return count
    }

    /// The first point of damage in the log from segment `start` on: the segment's position in
    /// `segments`, the offset, and the last index that is intact before it.
    public func firstLogDamage(from start: Int = 0) -> (segment: Int, offset: Int, lastIntactIndex: LogIndex)? {
        var expected: LogIndex?
        for (position, scan) in segments.enumerated() where position >= start {
            if let expected, scan.firstIndex != expected { return (position, 0, LogIndex(expected.rawValue - 1)) }
            switch scan.ending {
            case .clean: break
            case .tornTail(let offset, _), .corrupt(let offset, _): return (position, offset, scan.lastIndex)
            case .badHeader: return (position, 0, LogIndex(scan.firstIndex.rawValue - 1))
            }
            expected = scan.lastIndex.next
        }
        return nil
    }
}

/// Reads data directories for the operator commands.
public enum Inspector {
    /// Checks every segment and checkpoint of a data directory, changing nothing.
    ///
    /// - Parameter progress: called with (bytes done, bytes in all) after each file.
    public static func inspect(
        path: String, fileSystem: any FileSystem = POSIXFileSystem(), limits: Limits = Limits(),
        progress: (Int, Int) -> Void = { _, _ in }
    ) throws(StorageError) -> DirectoryInspection {
        let layout = DataDirectory.layout(path)
        guard fileSystem.exists(path) else {
            throw .fileSystem(FileSystemError(kind: .notFound, errno: 2, operation: "open data directory", path: path))
        }
        var result = DirectoryInspection(path: path)
        let names = fileSystem.exists(layout.log) ? try DataDirectory.segmentNames(logPath: layout.log, fileSystem: fileSystem) : []
        let store = CheckpointStore(directory: layout.checkpoints, fileSystem: fileSystem, limits: limits)
        let checkpointFiles = fileSystem.exists(layout.checkpoints) ? try store.list() : []
        result.strayFiles = fileSystem.exists(layout.checkpoints) ? try store.strayTemporaryFiles() : []

        var sizes: [String: Int] = [:]
        var total = 0
        do {
            for name in names {
                let handle = try fileSystem.open(joinPath(layout.log, name), options: [.readOnly])
                sizes["log/" + name] = try fileSystem.size(of: handle)
                fileSystem.close(handle)
            }
            for file in checkpointFiles {
                let handle = try fileSystem.open(joinPath(layout.checkpoints, file.name), options: [.readOnly])
                sizes["checkpoints/" + file.name] = try fileSystem.size(of: handle)
                fileSystem.close(handle)
            }
        } catch { throw .fileSystem(error) }
        total = sizes.values.reduce(0, +)
        var done = 0

        var expected: LogIndex?
        for (position, name) in names.enumerated() {
            let filePath = joinPath(layout.log, name)
            let bytes = try readSegmentFile(filePath, fileSystem: fileSystem, limits: limits)
            let scan = SegmentScanner.scan(bytes, name: name, isNewest: position == names.count - 1, limits: limits)
            let relative = "log/" + name
            if let expected, scan.firstIndex != expected {
                result.problems.append(InspectionProblem(file: relative, offset: 0, reason: "the segment begins at index \(scan.firstIndex) but the previous one ended at \(LogIndex(expected.rawValue - 1)): entries are missing"))
            }
            switch scan.ending {
            case .clean: break
            case .tornTail(let offset, let reason):
                result.problems.append(InspectionProblem(file: relative, offset: offset, reason: "torn tail (\(reason)); the next start truncates it, as it was never acknowledged"))
            case .corrupt(let offset, let reason):
                result.problems.append(InspectionProblem(file: relative, offset: offset, reason: reason))
            case .badHeader(let reason):
                result.problems.append(InspectionProblem(file: relative, offset: 0, reason: reason))
            }
            expected = scan.lastIndex.next
            result.segments.append(scan)
            done += bytes.count
            progress(done, total)
        }
        for file in checkpointFiles {
            let verdict: Result<CheckpointMetadata, FormatProblem>
            switch try store.load(file) {
            case .success(let (metadata, _)): verdict = .success(metadata)
            case .failure(let problem): verdict = .failure(problem)
            }
            if case .failure(let problem) = verdict {
                result.problems.append(InspectionProblem(file: "checkpoints/" + file.name, offset: 0, reason: problem.reason))
            }
            let size = sizes["checkpoints/" + file.name] ?? 0
            result.checkpoints.append(CheckpointInspection(file: file, size: size, verdict: verdict))
            done += size
            progress(done, total)
        }
        for stray in result.strayFiles {
            result.problems.append(InspectionProblem(file: "checkpoints/" + stray, offset: 0, reason: "an unfinished checkpoint left by a crash; the next start removes it"))
        }
        if let first = result.segments.first, first.firstIndex.rawValue > 1 {
            let base = result.checkpoints.compactMap { try? $0.verdict.get() }.map(\.index).max() ?? .zero
            if first.firstIndex > base.next {
                result.problems.append(InspectionProblem(file: "log/" + first.name, offset: 0, reason: "the log begins at index \(first.firstIndex) but no valid checkpoint covers index \(LogIndex(first.firstIndex.rawValue - 1))"))
            }
        }
        return result
    }
}

/// A repair an operator asked for, worked out before anything is changed.
public struct RepairPlan: Sendable, CustomStringConvertible {
    /// Checkpoint files to remove (relative to the data directory).
    public var removeCheckpoints: [String] = []
    /// Segment files to remove, newest first.
    public var removeSegments: [String] = []
    /// A segment to cut, and the size to cut it to.
    public var truncate: (segment: String, size: Int, droppedBytes: Int)?
    /// The first and last index of the entries dropped, if any.
    public var droppedEntries: ClosedRange<UInt64>?
    /// The last index the log keeps.
    public var keptLastIndex: LogIndex = .zero

    /// Whether the plan changes nothing.
    public var isEmpty: Bool { removeCheckpoints.isEmpty && removeSegments.isEmpty && truncate == nil }

    public var description: String {
        if isEmpty { return "nothing to drop" }
        var lines: [String] = []
        if let droppedEntries {
            lines.append("drop log entries \(droppedEntries.lowerBound)...\(droppedEntries.upperBound) (\(droppedEntries.count) entries); the log will end at index \(keptLastIndex)")
        }
        if let truncate { lines.append("cut log/\(truncate.segment) to \(truncate.size) bytes (dropping \(truncate.droppedBytes) bytes)") }
        for name in removeSegments { lines.append("remove log/\(name)") }
        for name in removeCheckpoints { lines.append("remove checkpoints/\(name)") }
        return lines.joined(separator: "\n")
    }
}

/// Builds and carries out the operator's repairs.
public enum Repair {
    /// The plan that makes `index` the last entry: later entries and later checkpoints go.
    public static func planTruncation(after index: LogIndex, inspection: DirectoryInspection) throws(StorageError) -> RepairPlan {
        var plan = RepairPlan()
        let validCheckpoints = inspection.checkpoints.compactMap { try? $0.verdict.get() }
        let logLast = inspection.segments.last.map(\.lastIndex) ?? .zero
        let base = validCheckpoints.filter { $0.index <= index }.map(\.index).max() ?? .zero
        let logFirst = inspection.segments.first?.firstIndex ?? LogIndex(1)
        guard index <= max(logLast, base) else {
            throw .unrecoverable(reason: "index \(index) is past the end of the log (\(logLast))", remedy: "Choose an index at or below \(logLast).")
        }
        guard logFirst <= base.next || index == base else {
            throw .unrecoverable(reason: "the state at index \(index) cannot be rebuilt: the log begins at \(logFirst) and the newest valid checkpoint at or below \(index) is at \(base)",
                                 remedy: "Choose an index at or above the newest checkpoint's; `keel inspect` lists them.")
        }
        if let damage = inspection.firstLogDamage(from: inspection.coveredSegmentCount), damage.lastIntactIndex < index {
            throw .unrecoverable(reason: "the log is damaged at log/\(inspection.segments[damage.segment].name) offset \(damage.offset), before index \(index)",
                                 remedy: "Run `keel recover \(inspection.path) --truncate-after-corruption` first.")
        }
        plan.removeCheckpoints = inspection.checkpoints.filter { $0.file.index > index }.map(\.file.name)
        for scan in inspection.segments.reversed() {
            if scan.firstIndex > index {
                plan.removeSegments.append(scan.name)
            } else if scan.lastIndex > index {
                let keep = Int(index.rawValue - scan.firstIndex.rawValue) + 1
                let size = keep < scan.offsets.count ? Int(scan.offsets[keep]) : scan.dataEnd
                plan.truncate = (scan.name, size, scan.fileSize - size)
            }
        }
        if logLast > index { plan.droppedEntries = (index.rawValue + 1)...logLast.rawValue }
        plan.keptLastIndex = index
        return plan
    }

    /// The plan that drops the log from its first damage on (and invalid checkpoints). Damage in
    /// segments the newest valid checkpoint covers costs nothing: those segments are dropped and
    /// the rest of the log is kept.
    public static func planCorruptionTruncation(inspection: DirectoryInspection) -> RepairPlan {
        var plan = RepairPlan()
        plan.removeCheckpoints = inspection.checkpoints.filter {
            if case .failure = $0.verdict { return true } else { return false }
        }.map(\.file.name)
        plan.keptLastIndex = inspection.segments.last?.lastIndex ?? .zero
        let covered = inspection.coveredSegmentCount
        var head: [String] = []
        if covered > 0, let damage = inspection.firstLogDamage(from: 0), damage.segment < covered {
            head = inspection.segments[..<covered].map(\.name)
        }
        var tail: [String] = [] // newest first, so an interrupted repair leaves a prefix of the log
        if let damage = inspection.firstLogDamage(from: covered) {
            let damaged = inspection.segments[damage.segment]
            tail = inspection.segments[(damage.segment + 1)...].reversed().map(\.name)
            if damage.offset <= LogFormat.segmentHeaderSize {
                tail.append(damaged.name)
            } else {
                plan.truncate = (damaged.name, damage.offset, damaged.fileSize - damage.offset)
            }
            plan.keptLastIndex = damage.lastIntactIndex
            let lastDropped = max(inspection.segments.last?.lastIndex ?? .zero, damaged.lastIndex)
            if lastDropped > plan.keptLastIndex { plan.droppedEntries = (plan.keptLastIndex.rawValue + 1)...lastDropped.rawValue }
        }
        plan.removeSegments = tail + head
        return plan
    }

    /// Carries out a plan on a directory whose lock the caller holds (and held while planning).
    public static func execute(_ plan: RepairPlan, directory: DataDirectory) throws(StorageError) {
        let fileSystem = directory.fileSystem
        do {
            if !plan.removeCheckpoints.isEmpty {
                for name in plan.removeCheckpoints where fileSystem.exists(joinPath(directory.checkpointsPath, name)) {
                    try fileSystem.remove(joinPath(directory.checkpointsPath, name))
                }
                try fileSystem.synchronizeDirectory(directory.checkpointsPath)
            }
            for name in plan.removeSegments where fileSystem.exists(joinPath(directory.logPath, name)) {
                try fileSystem.remove(joinPath(directory.logPath, name))
                try fileSystem.synchronizeDirectory(directory.logPath)
            }
            if let truncate = plan.truncate {
                let handle = try fileSystem.open(joinPath(directory.logPath, truncate.segment), options: [])
                defer { fileSystem.close(handle) }
                try fileSystem.truncate(handle, to: truncate.size)
                try fileSystem.synchronize(handle)
            }
        } catch { throw .fileSystem(error) }
    }
}
