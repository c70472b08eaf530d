// `keel inspect`, `keel verify` and `keel recover`: the operator's view of a data directory.

import ArgumentParser
import Foundation
import KeelCore
import KeelStorage

/// Prints progress on a terminal (stderr) for large directories; silent otherwise.
struct Progress {
    let enabled: Bool
    let label: String

    init(label: String) {
        self.label = label
        enabled = isatty(STDERR_FILENO) != 0
    }

    func callAsFunction(_ done: Int, _ total: Int) {
        guard enabled, total >= 64 * 1024 * 1024 else { return }
        let percent = total == 0 ? 100 : done * 100 / total
        FileHandle.standardError.write(Data("\r\(label): \(percent)% of \(formatBytes(total))".utf8))
        if done >= total { FileHandle.standardError.write(Data("\n".utf8)) }
    }
}

func formatBytes(_ count: Int) -> String {
    if count >= 1 << 30 { return String(format: "%.1f GiB", Double(count) / Double(1 << 30)) }
    if count >= 1 << 20 { return String(format: "%.1f MiB", Double(count) / Double(1 << 20)) }
    if count >= 1 << 10 { return String(format: "%.1f KiB", Double(count) / Double(1 << 10)) }
    return "\(count) B"
}

func describe(_ ending: SegmentEnding) -> String {
    switch ending {
    case .clean: "clean"
    case .tornTail(let offset, _): "torn tail at \(offset)"
    case .corrupt(let offset, _): "CORRUPT at \(offset)"
    case .badHeader: "BAD HEADER"
    }
}

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List a data directory's segments, index ranges, record counts, checkpoints and sizes.")

    @Argument(help: "The data directory.")
    var directory: String

    func run() throws {
        let inspection = try Inspector.inspect(path: directory, progress: Progress(label: "inspecting").callAsFunction)
        print("data directory \(directory)")
        print("log segments: \(inspection.segments.count)")
        for scan in inspection.segments {
            let range = scan.recordCount == 0 ? "empty" : "\(scan.firstIndex)...\(scan.lastIndex)"
            print("  \(scan.name)  entries \(range)  records \(scan.recordCount)  data \(formatBytes(scan.dataEnd))  file \(formatBytes(scan.fileSize))  \(describe(scan.ending))")
        }
        print("checkpoints: \(inspection.checkpoints.count)")
        for checkpoint in inspection.checkpoints {
            switch checkpoint.verdict {
            case .success(let metadata):
                let time = Date(timeIntervalSince1970: Double(metadata.wallTimeMilliseconds) / 1000)
                print("  \(checkpoint.file.name)  index \(metadata.index)  term \(metadata.term)  \(formatBytes(checkpoint.size))  taken \(time)  valid")
            case .failure(let problem):
                print("  \(checkpoint.file.name)  \(formatBytes(checkpoint.size))  INVALID: \(problem.reason)")
            }
        }
        for stray in inspection.strayFiles { print("  \(stray)  unfinished (removed at next start)") }
        print(inspection.isClean ? "status: clean" : "status: \(inspection.problems.count) problem(s); run `keel verify \(directory)` for details")
    }
}

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Check every CRC in a data directory. Exit status 0 only when everything is clean.")

    @Argument(help: "The data directory.")
    var directory: String

    func run() throws {
        let inspection = try Inspector.inspect(path: directory, progress: Progress(label: "verifying").callAsFunction)
        let records = inspection.segments.reduce(0) { $0 + $1.recordCount }
        if inspection.isClean {
            print("clean: \(inspection.segments.count) segments, \(records) records, \(inspection.checkpoints.count) checkpoints verified")
            return
        }
        for problem in inspection.problems { print("problem: \(problem)") }
        print("\(inspection.problems.count) problem(s). `keel recover \(directory) --truncate-after-corruption` drops the log from the first damage on (it prints what it will drop first).")
        throw ExitCode(1)
    }
}

struct Recover: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Cut a data directory back to a chosen index, or to just before its first damage.",
        discussion: "Prints what it will drop, then asks for confirmation (or pass --yes). Stop the server first: recover takes the directory's lock.")

    @Argument(help: "The data directory.")
    var directory: String

    @Option(name: .customLong("to-index"), help: "Keep entries up to and including this index; drop later entries and checkpoints.")
    var toIndex: UInt64?

    @Flag(name: .customLong("truncate-after-corruption"), help: "Drop the log from its first damaged record on, and remove invalid checkpoints.")
    var truncateAfterCorruption = false

    @Flag(help: "Do not ask for confirmation.")
    var yes = false

    @Flag(name: .customLong("dry-run"), help: "Print what would be dropped and change nothing.")
    var dryRun = false

    func validate() throws {
        if (toIndex == nil) == (!truncateAfterCorruption) {
            throw ValidationError("give exactly one of --to-index N and --truncate-after-corruption")
        }
    }

    func run() throws {
        guard FileManager.default.fileExists(atPath: directory) else {
            throw StorageError.fileSystem(FileSystemError(kind: .notFound, errno: 2, operation: "open data directory", path: directory))
        }
        // The lock is held from planning to the end, so nothing writes between the two.
        let locked = try DataDirectory(path: directory, fileSystem: POSIXFileSystem())
        defer { locked.unlock() }
        let inspection = try Inspector.inspect(path: directory, progress: Progress(label: "reading").callAsFunction)
        let plan: RepairPlan
        if let toIndex {
            plan = try Repair.planTruncation(after: LogIndex(toIndex), inspection: inspection)
        } else {
            plan = Repair.planCorruptionTruncation(inspection: inspection)
        }
        print("plan for \(directory):")
        print(plan.description.split(separator: "\n").map { "  " + $0 }.joined(separator: "\n"))
        if plan.isEmpty || dryRun { return }
        if !yes {
            guard isatty(STDIN_FILENO) != 0 else {
                print("refusing to change the directory without confirmation: pass --yes")
                throw ExitCode(2)
            }
            print("proceed? [y/N] ", terminator: "")
            guard let answer = readLine(), answer.lowercased() == "y" || answer.lowercased() == "yes" else {
                print("nothing changed")
                throw ExitCode(2)
            }
        }
        try Repair.execute(plan, directory: locked)
        print("done; if this was interrupted, run the same command again")
    }
}
