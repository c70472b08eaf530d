import Foundation
import KeelCore
import Testing
@testable import KeelStorage

/// Tests that run the real executables: SIGKILL of a writer with fsync `always`, and the operator
/// commands against real data directories.
@Suite("Real processes", .serialized)
struct ProcessTests {
    @Test("a writer SIGKILLed at random moments 30 times keeps every acknowledged record, in order")
    func sigkillLoop() throws {
        let directory = temporaryDirectory("sigkill")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let seed = UInt64(ProcessInfo.processInfo.environment["KEEL_SIGKILL_SEED"] ?? "") ?? 2026
        var random = SeededRandom(seed: seed)
        let appenders = 4
        var acknowledged = [Int](repeating: 0, count: appenders) // per appender: how many acknowledged
        var totalAcknowledged = 0
        for round in 0..<30 {
            let outputPath = directory + "-out-\(round)"
            #expect(FileManager.default.createFile(atPath: outputPath, contents: nil))
            defer { try? FileManager.default.removeItem(atPath: outputPath) }
            let output = try #require(FileHandle(forWritingAtPath: outputPath))
            let process = Process()
            process.executableURL = URL(fileURLWithPath: productsDirectory() + "/keel-crash-writer")
            process.arguments = ["write", directory, String(appenders)]
            process.standardOutput = output
            process.standardError = output
            try process.run()
            // The kill lands at a seeded random moment: during recovery, appends, rotations or checkpoints.
            usleep(UInt32(30_000 + random.next() % 400_000))
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            try output.close()
            let printed = try String(contentsOfFile: outputPath, encoding: .utf8)
            #expect(process.terminationReason == .uncaughtSignal, "round \(round): the writer ended on its own: \(printed)")
            for line in printed.split(separator: "\n") {
                let parts = line.split(separator: " ")
                guard parts.count == 3, parts[0] == "ack", let task = Int(parts[1]), let n = Int(parts[2]) else { continue }
                acknowledged[task] = max(acknowledged[task], n + 1)
                totalAcknowledged += 1
            }
            let check = try run("keel-crash-writer", ["check", directory, String(appenders)])
            #expect(check.status == 0, "round \(round) (seed \(seed)): \(check.output)")
            for line in check.output.split(separator: "\n") where line.hasPrefix("task ") {
                let parts = line.split(separator: " ")
                guard parts.count >= 6, let task = Int(parts[1]), let keys = Int(parts[3]) else { continue }
                #expect(keys >= acknowledged[task], "round \(round) (seed \(seed)): task \(task) has \(keys) records, \(acknowledged[task]) were acknowledged")
            }
        }
        #expect(totalAcknowledged > 1000, "the writer should have made progress between kills")
    }

    /// A data directory on disk with `count` sets, small segments and one checkpoint.
    func makeDirectory(_ name: String, count: Int) async throws -> (String, [Command]) {
        let path = temporaryDirectory(name)
        let store = try MapStore(path: path, options: smallOptions(segmentSize: 4096), logger: quietLogger)
        var commands: [Command] = []
        for i in 0..<count {
            let command = Command.add("n\(i % 5)", Int64(i))
            _ = try await store.execute(command.encoded)
            commands.append(command)
            if i == count / 3 { _ = try await store.checkpoint() }
        }
        store.close()
        return (path, commands)
    }

    func flipByte(_ path: String, at offset: UInt64) throws {
        let handle = try #require(FileHandle(forUpdatingAtPath: path))
        try handle.seek(toOffset: offset)
        let byte = try #require(try handle.read(upToCount: 1))
        try handle.seek(toOffset: offset)
        try handle.write(contentsOf: Data([byte[0] ^ 0x40]))
        try handle.close()
    }

    @Test("keel inspect and keel verify report a clean directory, and verify exits 0")
    func inspectAndVerifyClean() async throws {
        let (path, _) = try await makeDirectory("inspect", count: 300)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let inspect = try run("keel", ["inspect", path])
        #expect(inspect.status == 0)
        #expect(inspect.output.contains("log segments:") && inspect.output.contains("checkpoints: 1") && inspect.output.contains("status: clean"))
        #expect(inspect.output.contains("entries 1..."), "index ranges are listed: \(inspect.output)")
        let verify = try run("keel", ["verify", path])
        #expect(verify.status == 0, "\(verify.output)")
        #expect(verify.output.contains("clean: ") && verify.output.contains("300 records"))
    }

    @Test("keel verify names a damaged record's file and offset and exits non-zero; keel recover --truncate-after-corruption repairs it after showing the plan")
    func verifyAndRepairCorruption() async throws {
        let (path, commands) = try await makeDirectory("corrupt", count: 300)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let segments = try FileManager.default.contentsOfDirectory(atPath: path + "/log").sorted()
        let damaged = segments[segments.count / 2]
        let segmentBytes = try Array(Data(contentsOf: URL(fileURLWithPath: path + "/log/" + damaged)))
        let record = Int(SegmentScanner.scan(segmentBytes, name: damaged, isNewest: false, limits: Limits()).offsets[2])
        try flipByte(path + "/log/" + damaged, at: UInt64(record + 10))

        let verify = try run("keel", ["verify", path])
        #expect(verify.status == 1)
        #expect(verify.output.contains("log/\(damaged) at offset \(record)"), "\(verify.output)")
        #expect(throws: StorageError.self) { try MapStore(path: path, options: smallOptions(segmentSize: 4096), logger: quietLogger) }

        let refused = try run("keel", ["recover", path, "--truncate-after-corruption"])
        #expect(refused.status == 2 && refused.output.contains("pass --yes"))
        #expect(refused.output.contains("cut log/\(damaged) to \(record) bytes"), "the plan is printed first: \(refused.output)")
        #expect(try run("keel", ["verify", path]).status == 1, "nothing changed without confirmation")

        let repaired = try run("keel", ["recover", path, "--truncate-after-corruption", "--yes"])
        #expect(repaired.status == 0, "\(repaired.output)")
        #expect(try run("keel", ["verify", path]).status == 0)
        let store = try MapStore(path: path, options: smallOptions(segmentSize: 4096), logger: quietLogger)
        defer { store.close() }
        let kept = Int(store.appliedIndex.rawValue)
        #expect(kept > 0 && kept < 300)
        #expect(contents(store) == model(of: commands.prefix(kept)))
    }

    @Test("keel recover --to-index cuts the log and later checkpoints back to that index")
    func recoverToIndex() async throws {
        let (path, commands) = try await makeDirectory("pitr", count: 300)
        defer { try? FileManager.default.removeItem(atPath: path) }
        let dry = try run("keel", ["recover", path, "--to-index", "50", "--dry-run"])
        #expect(dry.status == 0 && dry.output.contains("drop log entries 51...300 (250 entries)"), "\(dry.output)")
        #expect(dry.output.contains("remove checkpoints/00000000000000000101-"), "the checkpoint after 50 goes: \(dry.output)")
        let result = try run("keel", ["recover", path, "--to-index", "50", "--yes"])
        #expect(result.status == 0, "\(result.output)")
        let store = try MapStore(path: path, options: smallOptions(segmentSize: 4096), logger: quietLogger)
        defer { store.close() }
        #expect(store.appliedIndex == LogIndex(50))
        #expect(contents(store) == model(of: commands.prefix(50)))
    }

    @Test("the operator commands refuse bad arguments and missing directories with a clear message")
    func badArguments() throws {
        let neither = try run("keel", ["recover", "/nonexistent"])
        #expect(neither.status != 0 && neither.output.contains("exactly one of --to-index"))
        let missing = try run("keel", ["verify", "/nonexistent/keel-data"])
        #expect(missing.status != 0 && missing.output.contains("no such file or directory"))
        let notNumber = try run("keel", ["recover", "/tmp", "--to-index", "abc"])
        #expect(notNumber.status != 0)
    }
}

@Suite("Operator commands and the lock")
struct OperatorLockTests {
    @Test("keel recover refuses a directory another process holds, and changes nothing")
    func recoverNeedsTheLock() async throws {
        let path = temporaryDirectory("locked")
        defer { try? FileManager.default.removeItem(atPath: path) }
        let store = try MapStore(path: path, options: smallOptions(), logger: quietLogger)
        _ = try await store.execute(Command.set("a", "1").encoded)
        let result = try run("keel", ["recover", path, "--to-index", "0", "--yes"])
        #expect(result.status != 0 && result.output.contains("in use by another process"), "\(result.output)")
        #expect(contents(store) == ["a": "1"])
        store.close()
    }
}
