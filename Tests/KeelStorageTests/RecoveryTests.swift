import Foundation
import KeelCore
import Testing
@testable import KeelStorage

/// Named faults: one test per row of docs/recovery.md's decision table.
@Suite("Recovery")
struct RecoveryTests {
    /// A store with `count` acknowledged sets, closed.
    func populated(_ fs: SimulatedFileSystem, count: Int, options: StoreOptions = smallOptions()) async throws -> [Command] {
        let store = try openStore(fs, options: options)
        var commands: [Command] = []
        for i in 0..<count {
            let command = Command.set("s\(i % 13)", "value-\(i)")
            _ = try await store.execute(command.encoded)
            commands.append(command)
        }
        store.close()
        return commands
    }

    func segmentPaths(_ fs: SimulatedFileSystem) throws -> [String] {
        try fs.contentsOfDirectory("/data/log").filter { $0.hasSuffix(".seg") }.sorted().map { "/data/log/" + $0 }
    }

    @Test("a clean restart restores every entry and reports no torn tail")
    func cleanRestart() async throws {
        let fs = SimulatedFileSystem(seed: 1)
        let commands = try await populated(fs, count: 120)
        let store = try openStore(fs)
        defer { store.close() }
        #expect(contents(store) == model(of: commands))
        #expect(store.recoveryReport.entriesReplayed == 120)
        #expect(store.recoveryReport.tornTail == nil && store.recoveryReport.bytesTruncated == 0)
    }

    @Test("torn write at the tail: the partial record is cut off and reported, everything acknowledged stays")
    func tornWriteAtTail() async throws {
        let fs = SimulatedFileSystem(seed: 2)
        let commands = try await populated(fs, count: 30)
        let newest = try segmentPaths(fs).last!
        let scan = SegmentScanner.scan(fs.contents(of: newest)!, name: String(newest.split(separator: "/").last!), isNewest: true, limits: Limits())
        var partial: [UInt8] = []
        LogFormat.appendRecord(type: .entry, index: scan.lastIndex.next, term: Term(1), payload: [UInt8](repeating: 5, count: 300), to: &partial)
        fs.overwrite(path: newest, offset: scan.dataEnd, bytes: Array(partial.prefix(150)))

        let store = try openStore(fs)
        #expect(contents(store) == model(of: commands))
        #expect(store.recoveryReport.tornTail?.offset == scan.dataEnd)
        #expect(store.recoveryReport.bytesTruncated == 150)
        _ = try await store.execute(Command.set("after", "tear").encoded)
        store.close()
        let inspection = try Inspector.inspect(path: "/data", fileSystem: fs)
        #expect(inspection.isClean, "the cut is made on disk: \(inspection.problems)")
    }

    @Test("bit flip in the middle of the log: recovery refuses to start and names the file, the offset and the remedy")
    func bitFlipInTheMiddle() async throws {
        let fs = SimulatedFileSystem(seed: 3)
        _ = try await populated(fs, count: 400)
        let paths = try segmentPaths(fs)
        #expect(paths.count >= 4)
        let target = paths[paths.count / 2]
        let offset = LogFormat.segmentHeaderSize + LogFormat.recordHeaderSize + 3
        fs.corrupt(path: target, offset: offset)
        do {
            let store = try openStore(fs)
            store.close()
            Issue.record("recovery started on a corrupt log")
        } catch {
            guard case .corruption(let file, let at, let reason, let remedy) = error else {
                Issue.record("expected .corruption, got \(error)")
                return
            }
            #expect(file == target && at == LogFormat.segmentHeaderSize)
            #expect(reason.contains("checksum mismatch"))
            #expect(remedy.contains("keel verify /data") && remedy.contains("keel recover /data --truncate-after-corruption"))
        }
    }

    @Test("bit flip in the last record: it is indistinguishable from a torn write, so it is cut and reported")
    func bitFlipAtTheTail() async throws {
        let fs = SimulatedFileSystem(seed: 4)
        let commands = try await populated(fs, count: 20)
        let newest = try segmentPaths(fs).last!
        let scan = SegmentScanner.scan(fs.contents(of: newest)!, name: String(newest.split(separator: "/").last!), isNewest: true, limits: Limits())
        fs.corrupt(path: newest, offset: scan.dataEnd - 2)
        let store = try openStore(fs)
        defer { store.close() }
        #expect(store.recoveryReport.tornTail != nil)
        #expect(store.appliedIndex == LogIndex(19))
        #expect(contents(store) == model(of: commands.dropLast()))
    }

    @Test("a segment missing from the middle of the log is corruption")
    func missingSegment() async throws {
        let fs = SimulatedFileSystem(seed: 5)
        _ = try await populated(fs, count: 400)
        let paths = try segmentPaths(fs)
        #expect(paths.count >= 4)
        try fs.remove(paths[1])
        #expect {
            try openStore(fs)
        } throws: { error in
            guard let error = error as? StorageError, case .corruption(_, _, let reason, _) = error else { return false }
            return reason.contains("a segment is missing")
        }
    }

    @Test("a newest segment whose header never reached the disk is removed, and the log goes on")
    func unfinishedSegment() async throws {
        let fs = SimulatedFileSystem(seed: 6)
        let commands = try await populated(fs, count: 40)
        let last = try segmentPaths(fs).last!
        let lastIndex = SegmentScanner.scan(fs.contents(of: last)!, name: String(last.split(separator: "/").last!), isNewest: true, limits: Limits()).lastIndex
        let name = LogFormat.segmentName(firstIndex: lastIndex.next)
        let handle = try fs.open("/data/log/" + name, options: [.create])
        try fs.write(handle, [UInt8](repeating: 0, count: 10), at: 0)
        fs.close(handle)
        try fs.synchronizeDirectory("/data/log")

        let store = try openStore(fs)
        defer { store.close() }
        #expect(store.recoveryReport.removedSegments == [name])
        #expect(contents(store) == model(of: commands))
        _ = try await store.execute(Command.set("next", "1").encoded)
        #expect(store.appliedIndex == lastIndex.next)
    }

    @Test("corrupt newest checkpoint: recovery falls back to the older one and the log after it, losing nothing")
    func corruptNewestCheckpoint() async throws {
        let fs = SimulatedFileSystem(seed: 7)
        let store = try openStore(fs)
        var commands: [Command] = []
        for round in 0..<3 {
            for i in 0..<60 {
                let command = Command.add("n\(i % 5)", Int64(round * 100 + i))
                _ = try await store.execute(command.encoded)
                commands.append(command)
            }
            _ = try await store.checkpoint()
        }
        store.close()
        let checkpoints = try CheckpointStore(directory: "/data/checkpoints", fileSystem: fs).list()
        #expect(checkpoints.count == 2)
        fs.corrupt(path: "/data/checkpoints/" + checkpoints[0].name, offset: CheckpointFormat.headerSize + 5)

        let reopened = try openStore(fs)
        defer { reopened.close() }
        #expect(reopened.recoveryReport.checkpoint?.index == checkpoints[1].index)
        #expect(reopened.recoveryReport.rejectedCheckpoints.first?.reason == "body checksum mismatch")
        #expect(contents(reopened) == model(of: commands))
    }

    @Test("a truncated checkpoint is rejected by its trailer")
    func truncatedCheckpoint() async throws {
        let fs = SimulatedFileSystem(seed: 8)
        let store = try openStore(fs)
        for i in 0..<10 { _ = try await store.execute(Command.set("s\(i)", "v").encoded) }
        let metadata = try await store.checkpoint()
        store.close()
        let path = "/data/checkpoints/" + CheckpointFormat.fileName(index: metadata.index, term: metadata.term)
        let handle = try fs.open(path, options: [])
        try fs.truncate(handle, to: try fs.size(of: handle) - 3)
        fs.close(handle)
        let reopened = try openStore(fs)
        defer { reopened.close() }
        #expect(reopened.recoveryReport.checkpoint == nil)
        #expect(reopened.recoveryReport.rejectedCheckpoints.first?.reason.contains("trailer") == true)
        #expect(reopened.appliedIndex == LogIndex(10))
    }

    @Test("when every checkpoint is damaged and the log was compacted, recovery refuses with what is missing")
    func allCheckpointsDamaged() async throws {
        let fs = SimulatedFileSystem(seed: 9)
        let store = try openStore(fs)
        for round in 0..<3 {
            for i in 0..<80 { _ = try await store.execute(Command.set("s\(i)", "\(round)").encoded) }
            _ = try await store.checkpoint()
        }
        store.close()
        for file in try CheckpointStore(directory: "/data/checkpoints", fileSystem: fs).list() {
            fs.corrupt(path: "/data/checkpoints/" + file.name, offset: 20)
        }
        #expect {
            try openStore(fs)
        } throws: { error in
            guard let error = error as? StorageError, case .unrecoverable(let reason, _) = error else { return false }
            return reason.contains("no checkpoint could be loaded") && reason.contains("missing")
        }
    }

    @Test("a temporary checkpoint left by a crash is removed at start")
    func strayTemporaryCheckpoint() async throws {
        let fs = SimulatedFileSystem(seed: 10)
        _ = try await populated(fs, count: 5)
        let handle = try fs.open("/data/checkpoints/00000000000000000003-00000000000000000001.ckpt.tmp", options: [.create])
        try fs.write(handle, [1, 2, 3], at: 0)
        fs.close(handle)
        let store = try openStore(fs)
        defer { store.close() }
        #expect(try fs.contentsOfDirectory("/data/checkpoints").isEmpty)
    }

    @Test("checkpoints: the newest two are kept and segments the older one covers are removed")
    func compaction() async throws {
        let fs = SimulatedFileSystem(seed: 11)
        let store = try openStore(fs)
        defer { store.close() }
        var checkpointIndexes: [LogIndex] = []
        for round in 0..<4 {
            for i in 0..<100 { _ = try await store.execute(Command.set("s\(i)", "\(round)").encoded) }
            checkpointIndexes.append(try await store.checkpoint().index)
        }
        let kept = try CheckpointStore(directory: "/data/checkpoints", fileSystem: fs).list().map(\.index)
        #expect(kept == [checkpointIndexes[3], checkpointIndexes[2]])
        #expect(store.log.firstIndex <= checkpointIndexes[2].next, "the older checkpoint can still be continued")
        #expect(store.log.firstIndex > LogIndex(100), "segments the older checkpoint covers are gone")
    }

    @Test("retained log entries keep extra segments before the compaction point")
    func retention() async throws {
        let fs = SimulatedFileSystem(seed: 12)
        var options = smallOptions()
        options.retainedLogEntries = 150
        let store = try openStore(fs, options: options)
        defer { store.close() }
        var indexes: [LogIndex] = []
        for _ in 0..<3 {
            for i in 0..<100 { _ = try await store.execute(Command.set("s\(i)", "x").encoded) }
            indexes.append(try await store.checkpoint().index)
        }
        #expect(store.log.firstIndex <= LogIndex(indexes[1].rawValue - 150 + 1))
    }

    @Test("a second store on the same data directory gets a clear error")
    func directoryLock() async throws {
        let fs = SimulatedFileSystem(seed: 13)
        let store = try openStore(fs)
        defer { store.close() }
        #expect(throws: StorageError.directoryLocked(path: "/data")) { try openStore(fs) }
    }

    @Test("the lock is a real flock: a second open of a directory on disk fails while the first holds it")
    func realDirectoryLock() throws {
        let path = temporaryDirectory("lock")
        defer { try? FileManager.default.removeItem(atPath: path) }
        let store = try MapStore(path: path, options: smallOptions(), logger: quietLogger)
        #expect(throws: StorageError.directoryLocked(path: path)) {
            try MapStore(path: path, options: smallOptions(), logger: quietLogger)
        }
        store.close()
        let again = try MapStore(path: path, options: smallOptions(), logger: quietLogger)
        again.close()
    }

    @Test("point-in-time recovery: the state at a chosen index, from the newest checkpoint at or below it")
    func pointInTime() async throws {
        let fs = SimulatedFileSystem(seed: 14)
        let store = try openStore(fs)
        var commands: [Command] = []
        for i in 0..<150 {
            let command = Command.add("n\(i % 4)", Int64(i))
            _ = try await store.execute(command.encoded)
            commands.append(command)
            if i == 60 || i == 110 { _ = try await store.checkpoint() }
        }
        store.close()
        for target in [61, 90, 110, 111, 150] {
            let state = try MapStore.state(at: LogIndex(UInt64(target)), path: "/data", options: smallOptions(), fileSystem: fs)
            var expected: [String: String] = [:]
            for command in commands.prefix(target) { command.apply(to: &expected) }
            let got = Dictionary(uniqueKeysWithValues: state.pairs.map { (String(decoding: $0.key, as: UTF8.self), "#\(MapStateMachine.decodeNumber($0.value)!)") })
            #expect(got == expected, "index \(target)")
        }
        #expect(throws: StorageError.self) { try MapStore.state(at: LogIndex(151), path: "/data", options: smallOptions(), fileSystem: fs) }
        // Before the older checkpoint the log was compacted away: a clear error, not a wrong state.
        #expect {
            try MapStore.state(at: LogIndex(30), path: "/data", options: smallOptions(), fileSystem: fs)
        } throws: { error in
            guard let error = error as? StorageError, case .unrecoverable(let reason, _) = error else { return false }
            return reason.contains("missing")
        }
    }

    @Test("with fsync `everysec`, a checkpoint newer than the surviving log is used and the log continues after it")
    func checkpointNewerThanLog() async throws {
        let fs = SimulatedFileSystem(seed: 15)
        let store = try openStore(fs, options: smallOptions(segmentSize: 1 << 20, policy: .never))
        var commands: [Command] = []
        for i in 0..<20 {
            let command = Command.set("s\(i)", "v")
            _ = try await store.execute(command.encoded)
            commands.append(command)
        }
        _ = try await store.checkpoint()
        fs.crash() // the log's unsynced writes are lost, the checkpoint was synced
        store.close()
        fs.restart()
        let reopened = try openStore(fs, options: smallOptions(segmentSize: 1 << 20, policy: .never))
        defer { reopened.close() }
        #expect(contents(reopened) == model(of: commands))
        _ = try await reopened.execute(Command.set("later", "1").encoded)
        #expect(reopened.appliedIndex == LogIndex(21))
    }
}

@Suite("Store behaviour")
struct StoreTests {
    @Test("bit flips on read are detected, never served: in a segment recovery refuses, in a checkpoint it falls back")
    func bitFlipsOnRead() async throws {
        let fs = SimulatedFileSystem(seed: 21)
        let store = try openStore(fs)
        var commands: [Command] = []
        for round in 0..<3 {
            for i in 0..<100 {
                let command = Command.set("s\(i % 9)", "\(round)-\(i)")
                _ = try await store.execute(command.encoded)
                commands.append(command)
            }
            _ = try await store.checkpoint()
        }
        store.close()
        let newest = try CheckpointStore(directory: "/data/checkpoints", fileSystem: fs).list()[0]
        fs.flipBitOnRead(path: "/data/checkpoints/" + newest.name, offset: CheckpointFormat.headerSize + 40)
        let reopened = try openStore(fs)
        #expect(reopened.recoveryReport.rejectedCheckpoints.count == 1)
        #expect(contents(reopened) == model(of: commands))
        let segments = try fs.contentsOfDirectory("/data/log").sorted()
        reopened.close()
        fs.flipBitOnRead(path: "/data/log/" + segments[0], offset: LogFormat.segmentHeaderSize + 30)
        #expect(throws: StorageError.self) { try openStore(fs) }
    }

    @Test("fsync `everysec` acknowledges before syncing and syncs within the interval")
    func everysec() async throws {
        let simulated = SimulatedFileSystem(seed: 22)
        let fs = GatedFileSystem(simulated)
        var options = smallOptions(segmentSize: 1 << 20, policy: .everysec)
        options.log.everysecIntervalMilliseconds = 20
        let store = try openStore(fs, options: options)
        defer { store.close() }
        let syncsBefore = store.log.syncCount
        fs.armGate() // the periodic sync will wait here until released
        _ = try await store.execute(Command.set("s1", "a").encoded)
        #expect(store.appliedIndex == LogIndex(1), "acknowledged and applied without a sync")
        fs.entered.wait() // the interval passed and the writer thread began the periodic sync
        #expect(store.log.syncCount == syncsBefore)
        fs.release.signal()
        var polls = 0
        while store.log.syncCount == syncsBefore && polls < 10_000 {
            try await Task.sleep(for: .milliseconds(1))
            polls += 1
        }
        #expect(store.log.syncCount > syncsBefore)
        _ = try await store.execute(Command.set("s2", "b").encoded)
        #expect(contents(store) == ["s1": "a", "s2": "b"])
    }

    @Test("a checkpoint starts by itself once enough log bytes have accumulated")
    func automaticCheckpoint() async throws {
        let fs = SimulatedFileSystem(seed: 23)
        var options = smallOptions()
        options.checkpointLogBytes = 3000
        let store = try openStore(fs, options: options)
        defer { store.close() }
        for i in 0..<100 { _ = try await store.execute(Command.set("s\(i % 5)", "\(i)").encoded) }
        var polls = 0
        while store.lastCheckpoint == nil && polls < 10_000 {
            try await Task.sleep(for: .milliseconds(1))
            polls += 1
        }
        let checkpoint = try #require(store.lastCheckpoint)
        #expect(checkpoint.index > LogIndex(0) && checkpoint.index <= LogIndex(100))
        #expect(try CheckpointStore(directory: "/data/checkpoints", fileSystem: fs).list().first?.index == checkpoint.index)
    }

    /// Sets `count` new keys (from `first`) with 200-byte values, so that checkpoints grow with the
    /// log; returns the checkpoint indexes seen after each write, in order.
    func setDistinct(_ store: MapStore, from first: Int, count: Int) async throws -> [UInt64] {
        var seen: [UInt64] = []
        for i in first..<(first + count) {
            _ = try await store.execute(Command.set("key\(i)", String(repeating: "v", count: 200)).encoded)
            if let index = store.lastCheckpoint?.index.rawValue, index != seen.last { seen.append(index) }
        }
        return seen
    }

    /// Waits for the running checkpoint, if any, and returns the newest one's index.
    func settledCheckpoint(_ store: MapStore) async throws -> UInt64? {
        var last = store.lastCheckpoint?.index.rawValue
        for _ in 0..<50 {
            try await Task.sleep(for: .milliseconds(10))
            let now = store.lastCheckpoint?.index.rawValue
            if now == last { break }
            last = now
        }
        return last
    }

    @Test("with checkpointLogGrowthPercent, an automatic checkpoint waits until the log has grown by that share of the last one")
    func checkpointWaitsForGrowth() async throws {
        var taken: [UInt64: [UInt64]] = [:]
        for percent in [UInt64(100), 0] {
            var options = smallOptions(segmentSize: 1 << 20)
            options.checkpointLogBytes = 4000
            options.checkpointLogGrowthPercent = percent
            let store = try openStore(SimulatedFileSystem(seed: 31), options: options)
            taken[percent] = try await setDistinct(store, from: 0, count: 400)
            store.close()
        }
        let growing = taken[100]!, fixed = taken[0]!
        #expect(growing.count >= 3, "growth 100: \(growing)")
        for (a, b) in zip(growing, growing.dropFirst()) {
            #expect(b - a >= a / 2, "a checkpoint at \(b) came \(b - a) entries after one holding \(a): \(growing)")
        }
        #expect(fixed.count > growing.count, "growth 0: \(fixed); growth 100: \(growing)")
        #expect(zip(fixed, fixed.dropFirst()).contains { a, b in b - a < a / 2 }, "growth 0: \(fixed)")
    }

    @Test("the log held after the checkpoint when the store opens counts toward checkpointLogBytes, and only that log")
    func heldLogCountsAtOpen() async throws {
        var options = smallOptions(segmentSize: 1 << 20)
        options.checkpointLogBytes = 20_000
        // 60 entries of about 250 bytes, reopened, 30 more: past 20 KB in all, so a checkpoint.
        let fs = SimulatedFileSystem(seed: 32)
        var store = try openStore(fs, options: options)
        #expect(try await setDistinct(store, from: 0, count: 60).isEmpty, "15 KB is under the trigger")
        store.close()
        store = try openStore(fs, options: options)
        _ = try await setDistinct(store, from: 60, count: 30)
        #expect(try await settledCheckpoint(store) != nil, "about 22 KB since the start of the log, 15 KB of it from before reopening")
        store.close()
        // 60 entries, a checkpoint, 10, reopened, 30: 10 KB since the checkpoint (the log before it
        // is still held: one checkpoint compacts nothing), so none.
        let other = SimulatedFileSystem(seed: 33)
        store = try openStore(other, options: options)
        _ = try await setDistinct(store, from: 0, count: 60)
        let checkpoint = try await store.checkpoint()
        _ = try await setDistinct(store, from: 60, count: 10)
        store.close()
        store = try openStore(other, options: options)
        _ = try await setDistinct(store, from: 70, count: 30)
        #expect(try await settledCheckpoint(store) == checkpoint.index.rawValue, "10 KB since the checkpoint at \(checkpoint.index)")
        store.close()
    }

    @Test("a write refused for lack of space is not applied, and is absent after a restart")
    func noSpaceIsNotApplied() async throws {
        let fs = SimulatedFileSystem(seed: 24)
        let store = try openStore(fs, options: smallOptions(segmentSize: 4096))
        var commands: [Command] = []
        for i in 0..<20 {
            let command = Command.set("s\(i)", String(repeating: "v", count: 100))
            _ = try await store.execute(command.encoded)
            commands.append(command)
        }
        fs.setCapacity(0)
        var refused = 0
        for i in 0..<40 {
            do {
                let command = Command.set("full\(i)", String(repeating: "w", count: 100))
                _ = try await store.execute(command.encoded)
                commands.append(command)
            } catch {
                guard case .noSpace = error else {
                    Issue.record("expected .noSpace, got \(error)")
                    break
                }
                refused += 1
            }
        }
        #expect(refused > 0)
        #expect(contents(store) == model(of: commands), "only acknowledged writes are applied")
        fs.setCapacity(nil)
        store.close()
        let reopened = try openStore(fs, options: smallOptions(segmentSize: 4096))
        defer { reopened.close() }
        #expect(contents(reopened) == model(of: commands))
    }
}

@Suite("Faults found in review")
struct ReviewFaultTests {
    @Test("ENOSPC from fdatasync is a failed fsync: fatal, nothing applied, nothing replayed")
    func noSpaceFromFdatasyncIsFatal() async throws {
        let fs = SimulatedFileSystem(seed: 31)
        let store = try openStore(fs)
        for i in 0..<5 { _ = try await store.execute(Command.set("s\(i)", "v").encoded) }
        fs.failNextSyncs(1, kind: .noSpace)
        do {
            _ = try await store.execute(Command.set("lost", "x").encoded)
            Issue.record("a write whose fdatasync failed was acknowledged")
        } catch {
            guard case .stopped = error else {
                Issue.record("expected .stopped, got \(error)")
                return
            }
        }
        await #expect(throws: StorageError.self) { try await store.execute(Command.set("after", "y").encoded) }
        #expect(contents(store)["lost"] == nil)
        store.close()
        // A restart of the process alone (no machine crash): the page cache still held the bytes.
        let reopened = try openStore(fs)
        defer { reopened.close() }
        #expect(contents(reopened)["lost"] == nil, "a write that failed must not come back")
        #expect(reopened.appliedIndex == LogIndex(5))
    }

    @Test("after a failed fsync, restarting the process does not replay the failed writes from the page cache")
    func failedFsyncNotReplayed() async throws {
        let fs = SimulatedFileSystem(seed: 32)
        let store = try openStore(fs)
        var commands: [Command] = []
        for i in 0..<8 {
            let command = Command.set("s\(i)", "v\(i)")
            _ = try await store.execute(command.encoded)
            commands.append(command)
        }
        fs.failNextSyncs()
        await #expect(throws: StorageError.self) { try await store.execute(Command.set("failed", "x").encoded) }
        store.close()
        let reopened = try openStore(fs)
        #expect(contents(reopened) == model(of: commands))
        // Later synced writes must not sit behind a hole that a power loss would open.
        _ = try await reopened.execute(Command.set("later", "y").encoded)
        reopened.close()
        fs.crash()
        fs.restart()
        let afterPowerLoss = try openStore(fs)
        defer { afterPowerLoss.close() }
        var expected = model(of: commands)
        expected["later"] = "y"
        #expect(contents(afterPowerLoss) == expected)
    }

    @Test("checkpoint() called while one runs returns a checkpoint taken after the call")
    func laterCheckpointCallersGetANewerOne() async throws {
        let simulated = SimulatedFileSystem(seed: 33)
        let fs = GatedFileSystem(simulated)
        let store = try openStore(fs)
        defer { store.close() }
        for i in 0..<10 { _ = try await store.execute(Command.set("s\(i)", "v").encoded) }
        fs.armGate() // the first checkpoint's fdatasync waits here
        let first = Task { try await store.checkpoint() }
        try await fs.waitUntilEntered()
        // Writes acknowledged while the first checkpoint runs...
        for i in 10..<15 { _ = try await store.execute(Command.set("s\(i)", "v").encoded) }
        // ...must be in a checkpoint asked for after them.
        let second = Task { try await store.checkpoint() }
        try await Task.sleep(for: .milliseconds(20))
        fs.release.signal()
        let (a, b) = (try await first.value, try await second.value)
        #expect(a.index == LogIndex(10))
        #expect(b.index == LogIndex(15))
    }

    @Test("damage in a segment the newest checkpoint covers is reported and the start goes on, losing nothing")
    func damageInCoveredSegment() async throws {
        let fs = SimulatedFileSystem(seed: 34)
        let store = try openStore(fs)
        var commands: [Command] = []
        for round in 0..<3 {
            for i in 0..<120 {
                let command = Command.add("n\(i % 4)", Int64(round + i))
                _ = try await store.execute(command.encoded)
                commands.append(command)
            }
            _ = try await store.checkpoint()
        }
        for i in 0..<30 {
            let command = Command.set("s\(i)", "tail")
            _ = try await store.execute(command.encoded)
            commands.append(command)
        }
        store.close()
        let segments = try fs.contentsOfDirectory("/data/log").sorted()
        #expect(segments.count >= 3)
        fs.corrupt(path: "/data/log/" + segments[0], offset: LogFormat.segmentHeaderSize + 40)

        let inspection = try Inspector.inspect(path: "/data", fileSystem: fs)
        #expect(!inspection.isClean)
        let plan = Repair.planCorruptionTruncation(inspection: inspection)
        #expect(plan.truncate == nil && plan.droppedEntries == nil, "covered damage costs no entries: \(plan)")
        #expect(plan.removeSegments.contains(segments[0]))

        let reopened = try openStore(fs)
        defer { reopened.close() }
        #expect(contents(reopened) == model(of: commands))
        #expect(reopened.recoveryReport.warnings.contains { $0.contains("covers") })
        #expect(reopened.recoveryReport.removedSegments.contains(segments[0]))
    }

    @Test("after falling back from a damaged checkpoint, pruning never keeps the damaged one in place of a valid one")
    func pruningKeepsValidCheckpoints() async throws {
        let fs = SimulatedFileSystem(seed: 35)
        let store = try openStore(fs)
        for round in 0..<2 {
            for i in 0..<50 { _ = try await store.execute(Command.set("s\(i)", "\(round)").encoded) }
            _ = try await store.checkpoint()
        }
        store.close()
        let damaged = try CheckpointStore(directory: "/data/checkpoints", fileSystem: fs).list()[0]
        fs.corrupt(path: "/data/checkpoints/" + damaged.name, offset: CheckpointFormat.headerSize + 1)
        let reopened = try openStore(fs)
        defer { reopened.close() }
        for i in 0..<50 { _ = try await reopened.execute(Command.set("s\(i)", "new").encoded) }
        let newest = try await reopened.checkpoint()
        let checkpoints = CheckpointStore(directory: "/data/checkpoints", fileSystem: fs)
        let kept = try checkpoints.list()
        #expect(!kept.contains { $0.name == damaged.name }, "the damaged checkpoint is removed, not kept")
        for file in kept {
            guard case .success = try checkpoints.load(file) else {
                Issue.record("kept an invalid checkpoint \(file.name)")
                continue
            }
        }
        #expect(kept.first?.index == newest.index && kept.count == 2)
    }

    @Test("a file named like segment 0 is not a segment, and does not trap inspection or recovery")
    func segmentZeroIsIgnored() async throws {
        let fs = SimulatedFileSystem(seed: 36)
        _ = try await { () async throws in
            let store = try openStore(fs)
            _ = try await store.execute(Command.set("a", "1").encoded)
            store.close()
        }()
        let handle = try fs.open("/data/log/00000000000000000000.seg", options: [.create])
        try fs.write(handle, LogFormat.encodeSegmentHeader(firstIndex: .zero), at: 0)
        fs.close(handle)
        _ = try Inspector.inspect(path: "/data", fileSystem: fs)
        let store = try openStore(fs)
        defer { store.close() }
        #expect(contents(store) == ["a": "1"])
    }
}
