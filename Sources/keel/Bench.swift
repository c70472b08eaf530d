// `keel bench`: the storage engine's benchmarks, each beside the machine's own limit measured in
// the same run (fdatasync calls per second, sequential read bandwidth), so that the figures are
// ratios and not lone numbers from a noisy machine.

import ArgumentParser
import Foundation
import KeelCore
import KeelSimulation
import KeelStorage
import Logging

struct Bench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Benchmarks of the storage engine, the Raft core and the node (build with -c release).",
        subcommands: [AppendBench.self, RecoveryBench.self, CheckpointBench.self, RaftBench.self, NodeBench.self, FailoverBench.self])
}

/// Refuses a benchmark option outside its range with a clear message.
func require(_ condition: Bool, _ message: String) throws {
    if !condition { throw ValidationError(message) }
}

/// A state machine that only counts, so a benchmark measures the log and not a data structure.
struct CountingMachine: DurableStateMachine {
    struct Snapshot: CheckpointSource {
        let count: UInt64
        func writeCheckpoint(to sink: inout CheckpointSink) throws(StorageError) { try sink.write(count) }
    }
    var count: UInt64 = 0
    init() {}
    init(checkpoint body: [UInt8], limits: Limits) throws(StorageError) {
        var reader = ByteReader(body)
        do { count = try reader.readUInt64() } catch { throw .unrecoverable(reason: "\(error)", remedy: "") }
    }
    mutating func apply(_ entry: LogEntry) -> UInt64 {
        count += 1
        return count
    }
    func snapshot() -> Snapshot { Snapshot(count: count) }
}

let silent = Logger(label: "keel.bench") { _ in SwiftLogNoOpLogHandler() }

func freshDirectory(_ base: String, _ name: String) -> String {
    let path = base + "/" + name
    try? FileManager.default.removeItem(atPath: path)
    return path
}

func secondsIn(_ duration: Duration) -> Double {
    Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
}

/// Runs `operation` in a loop from `count` concurrent tasks for `seconds`; returns the elapsed
/// seconds and every operation's latency in milliseconds, sorted.
func measureConcurrently(_ count: Int, seconds: Double,
                         _ operation: @escaping @Sendable () async throws -> Void) async throws -> (elapsed: Double, latencies: [Double]) {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    let started = ContinuousClock.now
    let latencies = try await withThrowingTaskGroup(of: [Double].self) { tasks in
        for _ in 0..<count {
            tasks.addTask {
                var samples: [Double] = []
                while ContinuousClock.now < deadline {
                    let begin = ContinuousClock.now
                    try await operation()
                    samples.append(secondsIn(ContinuousClock.now - begin) * 1000)
                }
                return samples
            }
        }
        var all: [Double] = []
        for try await samples in tasks { all += samples }
        return all.sorted()
    }
    return (secondsIn(ContinuousClock.now - started), latencies)
}

func percentile(_ sorted: [Double], _ p: Double) -> Double {
    guard !sorted.isEmpty else { return 0 }
    return sorted[min(sorted.count - 1, Int(Double(sorted.count) * p))]
}

/// fdatasync calls per second on one thread, each after a 128-byte append into a file whose
/// blocks are already written (so no sync has to allocate or convert an extent): the most
/// synced appends per second one writer can get from this disk.
func measureFdatasync(directory: String, seconds limit: Double) -> Double {
    let path = directory + "/fdatasync-probe"
    let fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0o644)
    defer {
        close(fd)
        unlink(path)
    }
    let size = 64 << 20
    let zeros = [UInt8](repeating: 0, count: 1 << 20)
    for offset in stride(from: 0, to: size, by: zeros.count) {
        _ = zeros.withUnsafeBytes { pwrite(fd, $0.baseAddress, zeros.count, off_t(offset)) }
    }
    fdatasync(fd)
    let record = [UInt8](repeating: 0x5a, count: 128)
    var count = 0
    var offset = 0
    let start = ContinuousClock.now
    while secondsIn(ContinuousClock.now - start) < limit {
        _ = record.withUnsafeBytes { pwrite(fd, $0.baseAddress, 128, off_t(offset)) }
        fdatasync(fd)
        offset = (offset + 128) % size
        count += 1
    }
    return Double(count) / secondsIn(ContinuousClock.now - start)
}

/// Empties the page cache (needs root); returns whether it could.
func dropPageCache() -> Bool {
    sync()
    let fd = open("/proc/sys/vm/drop_caches", O_WRONLY)
    guard fd >= 0 else { return false }
    defer { close(fd) }
    return write(fd, "3\n", 2) == 2
}

/// Sequential read bandwidth in MB/s of the given files (1 MiB reads).
func measureRead(_ paths: [String]) -> Double {
    var buffer = [UInt8](repeating: 0, count: 1 << 20)
    var total = 0
    let start = ContinuousClock.now
    for path in paths {
        let fd = open(path, O_RDONLY)
        while true {
            let n = buffer.withUnsafeMutableBytes { read(fd, $0.baseAddress, 1 << 20) }
            if n <= 0 { break }
            total += n
        }
        close(fd)
    }
    return Double(total) / 1e6 / secondsIn(ContinuousClock.now - start)
}

struct AppendBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "append",
        abstract: "Appends per second and latency with 1, 8 and 64 appenders, fsync always, beside fdatasync/s.")

    @Option(help: "A directory on the disk to measure.") var directory = "./keel-bench"
    @Option(help: "Seconds per measurement.") var seconds: Double = 5
    @Option(help: "Record payload bytes.") var size = 100
    @Option(help: "Appender counts, comma-separated.") var appenders = "1,8,64"

    func validate() throws {
        try require(seconds > 0 && seconds <= 3600, "--seconds must be between 0 and 3600")
        try require((0...(1 << 20)).contains(size), "--size must be between 0 and 1048576 bytes")
        let counts = appenders.split(separator: ",").map { Int($0) }
        try require(!counts.isEmpty && counts.allSatisfy { $0 != nil && (1...4096).contains($0!) }, "--appenders takes counts from 1 to 4096, comma-separated")
    }

    func run() async throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let syncs = measureFdatasync(directory: directory, seconds: seconds)
        print(String(format: "disk: %.0f fdatasync/s on one thread (128-byte appends into written blocks)", syncs))
        print("appenders  appends/s  p50 ms  p99 ms  appends per fdatasync  vs disk fdatasync/s")
        for count in appenders.split(separator: ",").compactMap({ Int($0) }) {
            let path = freshDirectory(directory, "append-\(count)")
            var options = StoreOptions()
            options.checkpointLogBytes = 0
            let store = try DurableStore<CountingMachine>(path: path, options: options, logger: silent)
            let payload = [UInt8](repeating: 0x61, count: size)
            let syncsBefore = store.log.syncCount
            let (elapsed, latencies) = try await measureConcurrently(count, seconds: seconds) { _ = try await store.execute(payload) }
            let syncsUsed = store.log.syncCount - syncsBefore
            store.close()
            try? FileManager.default.removeItem(atPath: path)
            let rate = Double(latencies.count) / elapsed
            print(String(format: "%9d  %9.0f  %6.2f  %6.2f  %21.1f  %18.2fx", count, rate, percentile(latencies, 0.5), percentile(latencies, 0.99),
                         Double(latencies.count) / Double(max(1, syncsUsed)), rate / syncs))
        }
    }
}


/// Sets `keys` keys ("key:0", "key:1", …) to values of `valueSize` bytes, 512 in flight at a time.
func populate(_ store: DurableStore<MapStateMachine>, keys: Int, valueSize: Int) async throws {
    try await withThrowingTaskGroup(of: Void.self) { group in
        var next = 0
        func add(_ group: inout ThrowingTaskGroup<Void, any Error>, _ i: Int) {
            let key = Array("key:\(i)".utf8)
            let value = [UInt8](repeating: UInt8(truncatingIfNeeded: i), count: valueSize)
            group.addTask { _ = try await store.execute(MapStateMachine.set(key, value)) }
        }
        while next < min(keys, 512) {
            add(&group, next)
            next += 1
        }
        while try await group.next() != nil {
            if next < keys {
                add(&group, next)
                next += 1
            }
        }
    }
}

struct RaftBench: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "raft",
        abstract: "Committed proposals per second of a 3-node Raft cluster in memory on one thread (the core's ceiling).",
        discussion: "bench/raft-allocations.sh runs it under valgrind to count heap allocations per committed entry.")

    @Option(help: "Entries to commit.") var entries = 500_000
    @Option(help: "Proposals per batch.") var batch = 64
    @Option(help: "Bytes per proposal.") var size = 100
    @Option(help: "Nodes.") var nodes = 3

    func validate() throws {
        try require(entries >= 1 && entries <= 100_000_000, "--entries must be between 1 and 100000000")
        try require(batch >= 1 && batch <= 65_536, "--batch must be between 1 and 65536")
        try require((0...(1 << 20)).contains(size), "--size must be between 0 and 1048576 bytes")
        try require((1...9).contains(nodes), "--nodes must be between 1 and 9")
    }

    func run() throws {
        let started = ContinuousClock.now
        let committed = try RaftBenchmark.run(nodes: nodes, entries: entries, size: size, batch: batch)
        let elapsed = secondsIn(ContinuousClock.now - started)
        print(String(format: "raft core: %d nodes, %d entries of %d bytes committed in %.2f s: %.0f entries/s (batches of %d, one thread, no I/O)",
                     nodes, committed, size, elapsed, Double(committed) / elapsed, batch))
    }
}

struct RecoveryBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "recovery",
        abstract: "Replay MB/s of a large log and checkpoint load time for many keys, beside sequential read bandwidth.")

    @Option(help: "A directory on the disk to measure.") var directory = "./keel-bench"
    @Option(help: "Log size to write and replay, in MiB.") var logMegabytes = 1024
    @Option(help: "Keys in the checkpoint.") var keys = 1_000_000
    @Option(help: "Value bytes per key.") var valueSize = 100

    func validate() throws {
        try require(logMegabytes >= 1 && logMegabytes <= 1 << 20, "--log-megabytes must be between 1 and 1048576")
        try require(keys >= 1 && keys <= 100_000_000, "--keys must be between 1 and 100000000")
        try require((0...(1 << 20)).contains(valueSize), "--value-size must be between 0 and 1048576 bytes")
    }

    func run() async throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        // 1. A log of the requested size, written without fsync (the write is not what is measured).
        let logPath = freshDirectory(directory, "recovery-log")
        var options = StoreOptions()
        options.checkpointLogBytes = 0
        options.log.fsyncPolicy = .never
        do {
            let store = try DurableStore<CountingMachine>(path: logPath, options: options, logger: silent)
            let payload = [UInt8](repeating: 0x62, count: 100)
            let target = UInt64(logMegabytes) << 20
            while store.log.bytesWritten < target {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for _ in 0..<256 { group.addTask { _ = try await store.execute(payload) } }
                    try await group.waitForAll()
                }
            }
            store.close()
        }
        // Segments only (not the prepared next one, which is zeros).
        let segments = try FileManager.default.contentsOfDirectory(atPath: logPath + "/log").filter { LogFormat.firstIndex(fromSegmentName: $0) != nil }
            .sorted().map { logPath + "/log/" + $0 }
        let logBytes = segments.reduce(0) { $0 + ((try? FileManager.default.attributesOfItem(atPath: $1)[.size] as? Int) ?? 0) }
        func replayOnce() throws -> (seconds: Double, entries: Int) {
            let started = ContinuousClock.now
            let store = try DurableStore<CountingMachine>(path: logPath, options: options, logger: silent)
            let elapsed = secondsIn(ContinuousClock.now - started)
            let replayed = store.recoveryReport.entriesReplayed
            store.close()
            return (elapsed, replayed)
        }
        print(String(format: "log: %.0f MB in %d segments", Double(logBytes) / 1e6, segments.count))
        for cold in [true, false] {
            if cold && !dropPageCache() {
                print("cold: cannot drop the page cache (needs root); skipped")
                continue
            }
            let readBandwidth = measureRead(segments)
            if cold { _ = dropPageCache() }
            let (replay, replayed) = try replayOnce()
            let replayRate = Double(logBytes) / 1e6 / replay
            print((cold ? "cold" : "warm") + String(format: " cache: sequential read %.0f MB/s; replay %.2f s, %.0f MB/s, %.0f entries/s: %.2fx the read bandwidth",
                         readBandwidth, replay, replayRate, Double(replayed) / replay, replayRate / readBandwidth))
        }
        try? FileManager.default.removeItem(atPath: logPath)

        // 2. A checkpoint of `keys` keys with values of `valueSize` bytes.
        let checkpointPath = freshDirectory(directory, "recovery-checkpoint")
        do {
            let store = try DurableStore<MapStateMachine>(path: checkpointPath, options: options, logger: silent)
            try await populate(store, keys: keys, valueSize: valueSize)
            _ = try await store.checkpoint()
            store.close()
        }
        // Drop the log so the load is the checkpoint alone.
        let checkpointFiles = try FileManager.default.contentsOfDirectory(atPath: checkpointPath + "/checkpoints").map { checkpointPath + "/checkpoints/" + $0 }
        for name in try FileManager.default.contentsOfDirectory(atPath: checkpointPath + "/log") {
            try FileManager.default.removeItem(atPath: checkpointPath + "/log/" + name)
        }
        let checkpointBytes = checkpointFiles.reduce(0) { $0 + ((try? FileManager.default.attributesOfItem(atPath: $1)[.size] as? Int) ?? 0) }
        let cold = dropPageCache()
        let checkpointRead = measureRead(checkpointFiles)
        if cold { _ = dropPageCache() }
        let loadStart = ContinuousClock.now
        let loaded = try DurableStore<MapStateMachine>(path: checkpointPath, options: options, logger: silent)
        let load = secondsIn(ContinuousClock.now - loadStart)
        let count = loaded.read { $0.pairs.count }
        loaded.close()
        print("checkpoint (\(cold ? "cold" : "warm") cache): " + String(format: "%d keys, %.0f MB; load %.2f s (%.0f MB/s); reading the file alone %.0f MB/s (%.3f s)",
                     count, Double(checkpointBytes) / 1e6, load, Double(checkpointBytes) / 1e6 / load, checkpointRead, Double(checkpointBytes) / 1e6 / checkpointRead))
        try? FileManager.default.removeItem(atPath: checkpointPath)
    }
}

struct CheckpointBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "checkpoint",
        abstract: "Duration of a checkpoint of many keys, and p99 append latency while it runs against without it.")

    @Option(help: "A directory on the disk to measure.") var directory = "./keel-bench"
    @Option(help: "Keys in the state.") var keys = 1_000_000
    @Option(help: "Value bytes per key.") var valueSize = 100
    @Option(help: "Concurrent appenders during the measurement.") var appenders = 8

    func validate() throws {
        try require(keys >= 1 && keys <= 100_000_000, "--keys must be between 1 and 100000000")
        try require((0...(1 << 20)).contains(valueSize), "--value-size must be between 0 and 1048576 bytes")
        try require((1...4096).contains(appenders), "--appenders must be between 1 and 4096")
    }

    func run() async throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let path = freshDirectory(directory, "checkpoint")
        var options = StoreOptions()
        options.checkpointLogBytes = 0
        options.log.fsyncPolicy = .never
        do {
            let store = try DurableStore<MapStateMachine>(path: path, options: options, logger: silent)
            try await populate(store, keys: keys, valueSize: valueSize)
            store.close()
        }
        options.log.fsyncPolicy = .always
        let store = try DurableStore<MapStateMachine>(path: path, options: options, logger: silent)
        defer { store.close() }

        /// Appends from `appenders` tasks until `work` returns; returns the sorted latencies in ms.
        func appendWindow(while work: @escaping @Sendable () async throws -> Void) async throws -> [Double] {
            let stop = StopSignal()
            return try await withThrowingTaskGroup(of: [Double].self) { group in
                for task in 0..<appenders {
                    group.addTask {
                        var samples: [Double] = []
                        var n = 0
                        while !stop.isSet {
                            let begin = ContinuousClock.now
                            _ = try await store.execute(MapStateMachine.set(Array("bench:\(task):\(n % 1000)".utf8), [UInt8](repeating: 1, count: 100)))
                            samples.append(secondsIn(ContinuousClock.now - begin) * 1000)
                            n += 1
                        }
                        return samples
                    }
                }
                try await work()
                stop.set()
                var all: [Double] = []
                for try await samples in group { all += samples }
                return all.sorted()
            }
        }

        let quiet = try await appendWindow { try await Task.sleep(for: .seconds(3)) }
        let timing = Timing()
        let busy = try await appendWindow {
            let begin = ContinuousClock.now
            _ = try await store.checkpoint()
            timing.record(secondsIn(ContinuousClock.now - begin))
        }
        print(String(format: "checkpoint of %d keys (%d-byte values): %.2f s, taken while %d appenders ran", keys, valueSize, timing.value, appenders))
        print(String(format: "append latency without a checkpoint: p50 %.2f ms, p99 %.2f ms (%d appends)", percentile(quiet, 0.5), percentile(quiet, 0.99), quiet.count))
        print(String(format: "append latency during the checkpoint: p50 %.2f ms, p99 %.2f ms (%d appends); p99 ratio %.2fx",
                     percentile(busy, 0.5), percentile(busy, 0.99), busy.count, percentile(busy, 0.99) / max(0.0001, percentile(quiet, 0.99))))
        try? FileManager.default.removeItem(atPath: path)
    }
}

/// Tells the benchmark's appenders to stop.
final class StopSignal: @unchecked Sendable {
    // @unchecked Sendable: `value` is only touched under `lock`.
    private let lock = NSLock()
    private var value = false
    var isSet: Bool { lock.withLock { value } }
    func set() { lock.withLock { value = true } }
}

final class Timing: @unchecked Sendable {
    // @unchecked Sendable: `seconds` is only touched under `lock`.
    private let lock = NSLock()
    private var seconds = 0.0
    func record(_ value: Double) { lock.withLock { seconds = value } }
    var value: Double { lock.withLock { seconds } }
}
