import Foundation
import KeelTorture
import Testing

/// The built `keel` executable (beside this test bundle, or KEEL_PRODUCTS_DIR).
func keelExecutable() -> String {
    if let override = ProcessInfo.processInfo.environment["KEEL_PRODUCTS_DIR"] { return override + "/keel" }
    var url = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
    while url.path != "/" {
        url.deleteLastPathComponent()
        if FileManager.default.isExecutableFile(atPath: url.appendingPathComponent("keel").path) { return url.appendingPathComponent("keel").path }
    }
    return FileManager.default.currentDirectoryPath + "/.build/debug/keel"
}

/// Runs `keel` with `arguments` on a thread of its own (never on the test pool); its status and output.
func runKeel(_ arguments: [String]) async -> (status: Int32, output: String) {
    await withCheckedContinuation { continuation in
        Thread.detachNewThread {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: keelExecutable())
            process.arguments = arguments
            let pipe = Pipe()
            process.standardOutput = pipe
            process.standardError = pipe
            do { try process.run() } catch {
                continuation.resume(returning: (-1, "\(error)"))
                return
            }
            let output = pipe.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            continuation.resume(returning: (process.terminationStatus, String(decoding: output, as: UTF8.self)))
        }
    }
}

@Suite("keel torture on real processes", .serialized)
struct TortureProcessTests {
    static func scratch() throws -> String {
        let path = NSTemporaryDirectory() + "keel-torture-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
        return path
    }

    @Test("a short torture of three keel serve processes meets every fault kind and passes; its history checks again")
    func shortRun() async throws {
        let directory = try Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/history.json"
        let (status, output) = await runKeel(["torture", "--nodes", "3", "--duration", "60", "--seed", "20261127", "--fault-interval", "1",
                                              "--history", path, "--work-dir", directory + "/run"])
        #expect(status == 0, "\(output)")
        let history = try TortureHistory.decode(try Data(contentsOf: URL(fileURLWithPath: path)))
        // Every kind was injected (the full disk needs a tmpfs mount: root only, else reported skipped).
        let root = geteuid() == 0
        var kinds = Set(TortureFaultKind.allCases)
        if !root {
            kinds.remove(.disk)
            #expect(history.skippedFaults.contains { $0.hasPrefix("disk:") })
        }
        #expect(Set(history.faults.map(\.kind)).isSuperset(of: kinds), "\(history.faults.map(\.kind))")
        // …and took effect: each wiped node came back a voter and caught up; a filled disk was met.
        for fault in history.faults where fault.kind == .wipe { #expect(fault.detail.contains("a voter again and caught up"), "\(fault.detail)") }
        if root {
            #expect(history.faults.contains { $0.kind == .disk && !$0.detail.contains("logged 0 full-disk") }, "\(history.faults.filter { $0.kind == .disk })")
        }
        // Load ran and was recorded, and all three nodes reported one state at the end.
        let succeeded = history.operations.filter { $0.outcome == .ok && $0.client >= 0 }
        #expect(succeeded.count > 2000)
        #expect(Set(succeeded.map(\.kind)) == Set(TortureOperationKind.allCases))
        #expect(history.final?.nodes.count == 3)
        #expect(Set(history.final?.nodes.map(\.digest) ?? []).count == 1)
        let report = TortureChecker.check(history)
        #expect(report.passed, "\(report.rendered())")
        #expect(output.contains("PASS"))
        let again = await runKeel(["torture", "check", path])
        #expect(again.status == 0, "\(again.output)")
        #expect(again.output.contains("PASS"))
    }

    @Test("keel torture check reports a planted stale read and a planted lost write, and exits 1")
    func plantedViolations() async throws {
        let directory = try Self.scratch()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        var operations = TortureCheckerTests.clean
        operations.append(TortureCheckerTests.op(11, client: 0, .read, 40, 41, result: 11)) // stale
        let history = TortureCheckerTests.history(operations, adds: []) // a:0:1 acknowledged, then lost
        let path = directory + "/planted.json"
        try history.encoded().write(to: URL(fileURLWithPath: path))
        let (status, output) = await runKeel(["torture", "check", path])
        #expect(status == 1, "\(output)")
        #expect(output.contains("VIOLATION (linearizability): key r0:0"))
        #expect(output.contains("VIOLATION (lost write): a:0:1"))
        // Not a history at all: exit 2.
        try Data("{}".utf8).write(to: URL(fileURLWithPath: path))
        #expect(await runKeel(["torture", "check", path]).status == 2)
    }
}
