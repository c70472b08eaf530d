import Foundation
import KeelCore
import Testing
@testable import KeelStorage

/// Crash at every write, sync and rename of a workload with appends, rotations, checkpoints and
/// log deletion; recovery must succeed with a state that contains every acknowledged command and
/// is the state after some prefix of the commands.
@Suite("Crash at every step")
struct CrashTests {
    struct Run {
        var acknowledged: [Command] = []
        var attempted: [Command] = []
    }

    static func command(_ i: Int) -> Command {
        switch i % 5 {
        case 0, 1: .set("s\(i % 7)", "value-\(i)-" + String(repeating: "x", count: 150))
        case 2: .add("n\(i % 3)", Int64(i))
        case 3: .delete("s\((i * 3) % 7)")
        default: .add("n\(i % 3)", -1)
        }
    }

    /// Appends 48 commands one at a time with a checkpoint after every 8th; stops at the first failure.
    static func workload(_ fs: SimulatedFileSystem) async -> Run {
        var run = Run()
        let store: MapStore
        do { store = try openStore(fs, options: smallOptions(segmentSize: 4096)) } catch { return run }
        defer { store.close() }
        for i in 0..<48 {
            let command = command(i)
            run.attempted.append(command)
            do { _ = try await store.execute(command.encoded) } catch { return run }
            run.acknowledged.append(command)
            if i % 8 == 7 {
                do { _ = try await store.checkpoint() } catch { return run }
            }
        }
        return run
    }

    static func check(_ fs: SimulatedFileSystem, _ run: Run, context: String) async throws {
        let store = try openStore(fs)
        let state = contents(store)
        let allowed = [model(of: run.acknowledged), model(of: run.attempted)]
        #expect(allowed.contains(state), "\(context): recovered \(state), acknowledged \(run.acknowledged.count) of \(run.attempted.count)")
        // The recovered store takes writes, and recovering again gives the same state.
        _ = try await store.execute(Command.set("after", "crash").encoded)
        store.close()
        let again = try openStore(fs)
        var expected = state
        expected["after"] = "crash"
        #expect(contents(again) == expected, "\(context): second recovery")
        again.close()
    }

    static func mutationCount() async throws -> Int {
        let fs = SimulatedFileSystem(seed: 0)
        let run = await workload(fs)
        #expect(run.acknowledged.count == 48)
        let mutations = fs.counters.mutations
        // The workload must rotate segments and compact the log, or the crash points miss them.
        let store = try openStore(fs)
        defer { store.close() }
        #expect(store.log.firstIndex > LogIndex(1), "the workload rotates segments and removes those the checkpoints cover")
        return mutations
    }

    @Test("crash after every mutation, dropping everything unsynced", arguments: [SimulatedFileSystem.CrashMode.dropUnsynced])
    func crashDroppingUnsynced(mode: SimulatedFileSystem.CrashMode) async throws {
        try await crashEverywhere(mode: mode)
    }

    @Test("crash after every mutation, keeping a random prefix of unsynced writes (torn at 512 bytes)")
    func crashKeepingRandomPrefix() async throws {
        try await crashEverywhere(mode: .keepRandomPrefix)
    }

    func crashEverywhere(mode: SimulatedFileSystem.CrashMode) async throws {
        let total = try await Self.mutationCount()
        #expect(total > 150, "the workload should exercise rotations, checkpoints and compaction")
        for step in 1...total {
            let fs = SimulatedFileSystem(seed: UInt64(step))
            fs.crash(afterMutations: step)
            let run = await Self.workload(fs)
            fs.crash()
            fs.restart(mode: mode)
            try await Self.check(fs, run, context: "crash after mutation \(step) of \(total), \(mode)")
        }
    }

    @Test("concurrent appenders with automatic checkpoints, crashed at seeded random points: each appender's acknowledged writes survive, in order")
    func concurrentWithCheckpoints() async throws {
        for seed in UInt64(1)...12 {
            var random = SeededRandom(seed: seed)
            let fs = SimulatedFileSystem(seed: seed)
            var options = smallOptions(segmentSize: 4096)
            options.checkpointLogBytes = 6000
            fs.crash(afterMutations: 200 + Int(random.next() % 600))
            let acknowledged = AcknowledgedCounts(tasks: 6)
            if let store = try? openStore(fs, options: options) {
                await withTaskGroup(of: Void.self) { group in
                    for task in 0..<6 {
                        group.addTask {
                            for n in 0..<400 {
                                do {
                                    _ = try await store.execute(Command.set("t\(task)-\(n)", "x").encoded)
                                    acknowledged.record(task: task, count: n + 1)
                                } catch { return }
                            }
                        }
                    }
                }
                store.close()
            }
            fs.crash()
            fs.restart(mode: .keepRandomPrefix)
            let store = try openStore(fs, options: options)
            let state = contents(store)
            store.close()
            for task in 0..<6 {
                var present = 0
                while state["t\(task)-\(present)"] != nil { present += 1 }
                #expect(present >= acknowledged.count(task: task), "seed \(seed) task \(task): \(present) present, \(acknowledged.count(task: task)) acknowledged")
                #expect(!state.keys.contains { $0.hasPrefix("t\(task)-") && Int($0.dropFirst("t\(task)-".count))! >= present }, "seed \(seed) task \(task): a gap")
            }
        }
    }
}

final class AcknowledgedCounts: @unchecked Sendable {
    // @unchecked Sendable: `counts` is only touched under `lock`.
    private let lock = NSLock()
    private var counts: [Int]
    init(tasks: Int) { counts = Array(repeating: 0, count: tasks) }
    func record(task: Int, count: Int) { lock.withLock { counts[task] = max(counts[task], count) } }
    func count(task: Int) -> Int { lock.withLock { counts[task] } }
}
