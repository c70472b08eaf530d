import Foundation
import KeelCore
import Synchronization
import Testing
@testable import KeelStorage

struct EmptyCheckpoint: CheckpointSource {
    func writeCheckpoint(to sink: inout CheckpointSink) throws(StorageError) {}
}

/// The log as Raft uses it: the caller chooses indexes, may replace an uncommitted suffix, and
/// persists its hard state in the same durable step.
@Suite("Write-ahead log with explicit indexes (Raft's log)")
struct ExplicitIndexLogTests {
    static func entries(_ range: ClosedRange<UInt64>, term: UInt64, tag: String = "") -> [LogEntry] {
        range.map { LogEntry(index: LogIndex($0), term: Term(term), payload: Array("\(tag)\($0)@\(term)".utf8) + [UInt8](repeating: 0, count: 60)) }
    }

    static func open(_ fs: any FileSystem, segmentSize: Int = 4096, prepareSegments: Bool? = nil) throws -> (DataDirectory, WriteAheadLog, RecoveryReport) {
        let directory = try DataDirectory(path: "/raft", fileSystem: fs)
        do {
            var options = LogOptions(segmentSize: segmentSize)
            options.prepareSegments = prepareSegments
            let (log, report) = try WriteAheadLog.open(in: directory, options: options)
            return (directory, log, report)
        } catch {
            directory.unlock()
            throw error
        }
    }

    /// Closes the log and opens it again from what the file system holds (a clean restart).
    static func reopen(_ fs: any FileSystem, _ directory: inout DataDirectory, _ log: inout WriteAheadLog) throws {
        log.close()
        directory.unlock()
        (directory, log, _) = try open(fs)
    }

    static func write(_ log: WriteAheadLog, _ entries: [LogEntry], hardState: [UInt8]? = nil, inline: Bool = false) async throws {
        if inline {
            // Written, synced and completed before the call returns, on this thread.
            let caller = pthread_self()
            let outcome = Mutex<(result: Result<LogIndex, StorageError>, onCaller: Bool)?>(nil)
            try log.write(entries: entries, hardState: hardState, inline: true) { result in
                outcome.withLock { $0 = (result, pthread_equal(pthread_self(), caller) != 0) }
            }
            let done = try #require(outcome.withLock { $0 }, "an inline write completes before it returns")
            #expect(done.onCaller, "an inline write completes on the caller's thread")
            _ = try done.result.get()
            return
        }
        let result: Result<LogIndex, StorageError> = await withCheckedContinuation { continuation in
            do throws(StorageError) {
                try log.write(entries: entries, hardState: hardState) { continuation.resume(returning: $0) }
            } catch {
                continuation.resume(returning: .failure(error))
            }
        }
        _ = try result.get()
    }

    /// The whole log as (index, term, payload), read back.
    static func contents(_ log: WriteAheadLog) throws -> [LogEntry] {
        guard log.lastIndex >= log.firstIndex else { return [] }
        return try (log.firstIndex.rawValue...log.lastIndex.rawValue).map { try log.entry(at: LogIndex($0)) }
    }

    @Test("the next segment is prepared ahead (zero-filled, synced) and a rotation takes it; a prepared file left by a crash is removed")
    func preparedSegments() async throws {
        let fs = SimulatedFileSystem(seed: 47)
        var (directory, log, _) = try Self.open(fs, prepareSegments: true)
        let prepared = "/raft/log/" + WriteAheadLog.preparedName
        func waitPrepared() async throws {
            for _ in 0..<500 where !log.nextSegmentIsPrepared { try await Task.sleep(for: .milliseconds(2)) }
            #expect(log.nextSegmentIsPrepared)
        }
        var written: [LogEntry] = []
        var index: UInt64 = 1
        for rotation in 0..<4 {
            try await waitPrepared()
            let renamesBefore = fs.counters.renames
            let segmentsBefore = log.segmentNames.count
            // Enough to fill the newest 4 KiB segment and start the next.
            let batch = Self.entries(index...(index + 39), term: 1, tag: "r\(rotation)-")
            for entry in batch { try await Self.write(log, [entry]) }
            written += batch
            index += 40
            #expect(log.segmentNames.count > segmentsBefore, "rotated")
            #expect(fs.counters.renames > renamesBefore, "the rotation took the prepared segment (renamed it)")
        }
        #expect(try Self.contents(log) == written)
        try await waitPrepared()
        #expect(fs.exists(prepared))
        log.close()
        directory.unlock()
        // A crash leaves a prepared file (possibly half written): the next open removes it, and
        // the log is whole.
        fs.crash()
        fs.restart(mode: .dropUnsynced)
        // (Its directory entry was never synced, so it may be gone; leave a damaged one instead.)
        let stale = try fs.open(prepared, options: [.create, .truncate])
        try fs.write(stale, Array(repeating: 0xAB, count: 100), at: 0)
        try fs.synchronize(stale)
        fs.close(stale)
        try fs.synchronizeDirectory("/raft/log")
        (directory, log, _) = try Self.open(fs, prepareSegments: true)
        #expect(try Self.contents(log) == written)
        #expect(fs.contents(of: prepared).map { !$0.contains(0xAB) } ?? true, "the damaged prepared file is gone (or prepared again)")
        #expect(log.segmentNames.allSatisfy { LogFormat.firstIndex(fromSegmentName: $0) != nil }, "\(log.segmentNames)")
        try await waitPrepared()
        log.close()
        directory.unlock()
    }

    @Test("a full disk gives back the prepared segment's space; writes go on once there is room")
    func preparedSegmentOnFullDisk() async throws {
        let fs = SimulatedFileSystem(seed: 48)
        let (directory, log, _) = try Self.open(fs, prepareSegments: true)
        defer {
            log.close()
            directory.unlock()
        }
        for _ in 0..<500 where !log.nextSegmentIsPrepared { try await Task.sleep(for: .milliseconds(2)) }
        #expect(log.nextSegmentIsPrepared)
        let prepared = "/raft/log/" + WriteAheadLog.preparedName
        #expect(fs.exists(prepared))
        fs.setCapacity(fs.usedBytes + 100)
        // A record larger than a segment grows the newest one past the capacity.
        let big = LogEntry(index: LogIndex(1), term: Term(1), payload: [UInt8](repeating: 3, count: 6000))
        await #expect(throws: StorageError.self) { try await Self.write(log, [big]) }
        #expect(!fs.exists(prepared), "the prepared segment's space was given back")
        fs.setCapacity(nil)
        try await Self.write(log, [big])
        #expect(try Self.contents(log) == [big])
    }

    @Test("on a real disk: a new log's first segment and the prepared next one are zero-filled files of the segment size; rotations take the prepared one")
    func preparedSegmentsOnDisk() async throws {
        let path = NSTemporaryDirectory() + "keel-prepared-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: path) }
        let fs = POSIXFileSystem()
        let directory = try DataDirectory(path: path, fileSystem: fs)
        let log: WriteAheadLog
        do { (log, _) = try WriteAheadLog.open(in: directory, options: LogOptions(segmentSize: 256 << 10)) } catch {
            directory.unlock()
            throw error
        }
        let prepared = path + "/log/" + WriteAheadLog.preparedName
        for _ in 0..<2000 where !log.nextSegmentIsPrepared { try await Task.sleep(for: .milliseconds(1)) }
        #expect(log.nextSegmentIsPrepared, "prepared on a real file system by default")
        let bytes = try #require(FileManager.default.contents(atPath: prepared))
        #expect(bytes.count == 256 << 10 && bytes.allSatisfy { $0 == 0 })
        let first = try #require(FileManager.default.contents(atPath: path + "/log/" + log.segmentNames[0]))
        #expect(first.count == 256 << 10 && first[LogFormat.segmentHeaderSize...].allSatisfy { $0 == 0 }, "the first segment is zero-filled")
        var written: [LogEntry] = []
        var index: UInt64 = 1
        while log.segmentNames.count < 4 {
            for _ in 0..<2000 where !log.nextSegmentIsPrepared { try await Task.sleep(for: .milliseconds(1)) }
            let batch = Self.entries(index...(index + 99), term: 1).map { LogEntry(index: $0.index, term: $0.term, payload: $0.payload + [UInt8](repeating: 7, count: 900)) }
            try await Self.write(log, batch)
            written += batch
            index += 100
        }
        #expect(try Self.contents(log) == written)
        #expect(log.segmentNames.allSatisfy { LogFormat.firstIndex(fromSegmentName: $0) != nil })
        log.close()
        directory.unlock()
    }

    @Test("entries, their terms and the hard state come back after a restart")
    func roundTrip() async throws {
        let fs = SimulatedFileSystem(seed: 41)
        var (directory, log, _) = try Self.open(fs)
        try await Self.write(log, Self.entries(1...50, term: 1), hardState: [1, 2, 3])
        try await Self.write(log, Self.entries(51...60, term: 2), hardState: [4, 5, 6])
        try ExplicitIndexLogTests.reopen(fs, &directory, &log)
        defer {
            log.close()
            directory.unlock()
        }
        #expect(log.lastIndex == LogIndex(60))
        #expect(log.hardState == [4, 5, 6])
        #expect(log.term(at: LogIndex(50)) == Term(1) && log.term(at: LogIndex(51)) == Term(2))
        #expect(try Self.contents(log) == Self.entries(1...50, term: 1) + Self.entries(51...60, term: 2))
    }

    @Test("a write at or below the last index replaces the suffix, within the newest segment and across segments")
    func replaceSuffix() async throws {
        let fs = SimulatedFileSystem(seed: 42)
        var (directory, log, _) = try Self.open(fs)
        try await Self.write(log, Self.entries(1...200, term: 1), hardState: [1])
        #expect(log.segmentNames.count > 3)
        try await Self.write(log, Self.entries(195...196, term: 2)) // within the newest segment
        #expect(log.lastIndex == LogIndex(196))
        try await Self.write(log, Self.entries(20...25, term: 3), hardState: [3]) // reaches back into an older segment
        var expected = Self.entries(1...19, term: 1) + Self.entries(20...25, term: 3)
        #expect(try Self.contents(log) == expected)
        try await Self.write(log, Self.entries(26...30, term: 3))
        expected += Self.entries(26...30, term: 3)
        try ExplicitIndexLogTests.reopen(fs, &directory, &log)
        defer {
            log.close()
            directory.unlock()
        }
        #expect(try Self.contents(log) == expected)
        #expect(log.hardState == [3])
        #expect(try Inspector.inspect(path: "/raft", fileSystem: fs).isClean)
    }

    @Test("a suffix replacement on a full disk: the hard-state file it writes first does not fit; the write fails noSpace, nothing changes, and it succeeds once there is room (the log stopped for good before)")
    func replaceOnFullDisk() async throws {
        let fs = SimulatedFileSystem(seed: 48)
        var (directory, log, _) = try Self.open(fs)
        try await Self.write(log, Self.entries(1...10, term: 1), hardState: [1])
        // The segment's preallocated space still takes records; a new file does not fit.
        fs.setCapacity(fs.usedBytes)
        var refusal: StorageError?
        do { try await Self.write(log, Self.entries(6...7, term: 2), hardState: [2]) } catch let error as StorageError { refusal = error }
        if case .noSpace = refusal {} else { Issue.record("expected noSpace, got \(String(describing: refusal))") }
        #expect(try Self.contents(log) == Self.entries(1...10, term: 1))
        #expect(log.hardState == [1])
        fs.setCapacity(nil)
        try await Self.write(log, Self.entries(6...7, term: 2), hardState: [2])
        let expected = Self.entries(1...5, term: 1) + Self.entries(6...7, term: 2)
        #expect(try Self.contents(log) == expected)
        try ExplicitIndexLogTests.reopen(fs, &directory, &log)
        defer {
            log.close()
            directory.unlock()
        }
        #expect(try Self.contents(log) == expected)
        #expect(log.hardState == [2])
    }

    @Test("the hard state survives rotation and the removal of the segments that first held it")
    func hardStateSurvivesCompaction() async throws {
        let fs = SimulatedFileSystem(seed: 43)
        var (directory, log, _) = try Self.open(fs)
        try await Self.write(log, Self.entries(1...5, term: 1), hardState: [9, 9])
        try await Self.write(log, Self.entries(6...300, term: 1))
        // The caller checkpoints before compacting (recovery refuses a log that starts after its checkpoint).
        _ = try CheckpointStore(directory: directory.checkpointsPath, fileSystem: fs)
            .write(EmptyCheckpoint(), metadata: CheckpointMetadata(index: LogIndex(250), term: Term(1), wallTimeMilliseconds: 0))
        try log.removeSegments(through: LogIndex(250))
        try ExplicitIndexLogTests.reopen(fs, &directory, &log)
        defer {
            log.close()
            directory.unlock()
        }
        #expect(log.hardState == [9, 9])
        #expect(log.firstIndex > LogIndex(5))
    }

    @Test("writes that leave a gap, are not consecutive, or mix with assigned indexes are refused")
    func refusedWrites() async throws {
        let fs = SimulatedFileSystem(seed: 44)
        let (directory, log, _) = try Self.open(fs)
        defer {
            log.close()
            directory.unlock()
        }
        try await Self.write(log, Self.entries(1...3, term: 1))
        await #expect(throws: StorageError.self) { try await Self.write(log, Self.entries(5...6, term: 1)) }
        let broken = [LogEntry(index: LogIndex(4), term: Term(1), payload: [1]), LogEntry(index: LogIndex(6), term: Term(1), payload: [2])]
        await #expect(throws: StorageError.self) { try await Self.write(log, broken) }
        await #expect(throws: StorageError.self) { try await Self.write(log, [], hardState: [UInt8](repeating: 0, count: LogFormat.hardStateSizeMax + 1)) }
    }

    /// The log as it may be after a crash: everything acknowledged; of a write in flight that
    /// replaces the suffix from index i, any prefix of the old log down to i - 1 (the replaced
    /// segments go newest first; for Raft the replaced entries were never committed, since they
    /// conflict with the leader's log), then the cut and any prefix of the new entries.
    static func allowed(before: [LogEntry], inFlight: [LogEntry]?) -> [[LogEntry]] {
        guard let inFlight, let first = inFlight.first else { return [before] }
        let kept = before.filter { $0.index < first.index }
        var results: [[LogEntry]] = []
        for count in kept.count...before.count { results.append(Array(before.prefix(count))) }
        for count in 0...inFlight.count { results.append(kept + inFlight.prefix(count)) }
        return results
    }

    @Test("crash after every mutation of a workload with replacements: recovery holds every acknowledged write (writes queued for the writer thread, and inline)",
          arguments: [false, true])
    func crashEverywhere(inline: Bool) async throws {
        // The workload: appends, and suffix replacements reaching back across segments.
        let plan: [(ClosedRange<UInt64>, UInt64)] = [(1...40, 1), (41...80, 1), (70...75, 2), (76...120, 2), (30...35, 3), (36...90, 3), (91...95, 4)]
        func run(_ fs: SimulatedFileSystem) async -> (acknowledged: [LogEntry], inFlight: [LogEntry]?, hardState: [UInt8]?) {
            var model: [LogEntry] = []
            var hardState: [UInt8]?
            guard let (directory, log, _) = try? Self.open(fs) else { return ([], nil, nil) }
            defer {
                log.close()
                directory.unlock()
            }
            for (range, term) in plan {
                let batch = Self.entries(range, term: term)
                do { try await Self.write(log, batch, hardState: [UInt8(term)], inline: inline) } catch { return (model, batch, hardState) }
                model = model.filter { $0.index < batch[0].index } + batch
                hardState = [UInt8(term)]
            }
            return (model, nil, hardState)
        }
        let clean = SimulatedFileSystem(seed: 0)
        _ = await run(clean)
        let total = clean.counters.mutations
        #expect(total > 60)
        for step in 1...total {
            for mode in [SimulatedFileSystem.CrashMode.dropUnsynced, .keepRandomPrefix] {
                let fs = SimulatedFileSystem(seed: UInt64(step))
                fs.crash(afterMutations: step)
                let outcome = await run(fs)
                fs.crash()
                fs.restart(mode: mode)
                let (directory, log, _) = try Self.open(fs)
                let recovered = try Self.contents(log)
                let candidates = Self.allowed(before: outcome.acknowledged, inFlight: outcome.inFlight)
                #expect(candidates.contains(recovered), "crash after mutation \(step) of \(total), \(mode): recovered \(recovered.count) entries up to \(recovered.last?.index.rawValue ?? 0)")
                // The hard state is the last acknowledged one, or the one in flight; never older, never lost.
                var allowedStates: [[UInt8]?] = [outcome.hardState]
                if let inFlight = outcome.inFlight { allowedStates.append([UInt8(inFlight[0].term.rawValue)]) }
                #expect(allowedStates.contains(log.hardState), "crash after mutation \(step), \(mode): hard state \(String(describing: log.hardState)), allowed \(allowedStates)")
                log.close()
                directory.unlock()
            }
        }
    }

    @Test("inline writes: in queue order with writes queued for the writer thread, rotating segments, replacing a suffix; refused without fsync always")
    func inlineWrites() async throws {
        let fs = SimulatedFileSystem(seed: 61)
        var (directory, log, _) = try Self.open(fs)
        // Queued for the writer thread, then inline at once: the inline call writes what was
        // queued before it too, in order, before it returns.
        let queued = Self.entries(1...30, term: 1, tag: "q")
        let queuedDone = Mutex<Result<LogIndex, StorageError>?>(nil)
        try log.write(entries: queued, hardState: [1]) { result in queuedDone.withLock { $0 = result } }
        let inline = Self.entries(31...60, term: 1, tag: "i")
        try await Self.write(log, inline, hardState: [2], inline: true)
        #expect(try queuedDone.withLock { $0 }?.get() == LogIndex(30), "the write queued before is done")
        // Many more, each its own group commit: 4 KiB segments rotate under inline writes.
        let segmentsBefore = log.segmentNames.count
        var written = queued + inline
        for index in UInt64(61)...160 {
            let entry = Self.entries(index...index, term: 1)
            try await Self.write(log, entry, inline: true)
            written += entry
        }
        #expect(log.segmentNames.count > segmentsBefore + 1, "rotated")
        // A conflicting suffix replaced inline (back across a segment boundary).
        let replacement = Self.entries(90...95, term: 2, tag: "r")
        try await Self.write(log, replacement, hardState: [3], inline: true)
        written = written.filter { $0.index < LogIndex(90) } + replacement
        #expect(try Self.contents(log) == written)
        #expect(log.hardState == [3])
        // What an inline write acknowledged is durable: a crash that drops everything unsynced keeps it.
        log.close()
        directory.unlock()
        fs.crash()
        fs.restart(mode: .dropUnsynced)
        (directory, log, _) = try Self.open(fs)
        #expect(try Self.contents(log) == written)
        #expect(log.hardState == [3])
        log.close()
        directory.unlock()

        // The writer thread syncs everysec's and never's writes: an inline one is refused.
        let lazy = SimulatedFileSystem(seed: 62)
        let lazyDirectory = try DataDirectory(path: "/raft", fileSystem: lazy)
        let (lazyLog, _) = try WriteAheadLog.open(in: lazyDirectory, options: LogOptions(fsyncPolicy: .everysec, segmentSize: 4096))
        #expect(throws: StorageError.invalidConfiguration("inline writes need fsync always (the writer thread syncs everysec's writes)")) {
            try lazyLog.write(entries: Self.entries(1...1, term: 1), hardState: nil, inline: true) { _ in }
        }
        #expect(lazyLog.lastIndex < LogIndex(1), "nothing was queued")
        lazyLog.close()
        lazyDirectory.unlock()
    }

    @Test("an inline write that meets a full disk fails before it returns, and the log goes on; a failed sync stops it")
    func inlineWriteFailures() async throws {
        let fs = SimulatedFileSystem(seed: 63)
        let (directory, log, _) = try Self.open(fs)
        defer {
            log.close()
            directory.unlock()
        }
        try await Self.write(log, Self.entries(1...5, term: 1), inline: true)
        fs.setCapacity(fs.usedBytes + 100)
        let big = LogEntry(index: LogIndex(6), term: Term(1), payload: [UInt8](repeating: 3, count: 6000))
        await #expect(throws: StorageError.self) { try await Self.write(log, [big], inline: true) }
        fs.setCapacity(nil)
        try await Self.write(log, [big], inline: true)
        fs.failNextSyncs(1)
        await #expect(throws: StorageError.self) { try await Self.write(log, Self.entries(7...7, term: 1), inline: true) }
        #expect(throws: StorageError.self) { try log.write(entries: Self.entries(7...7, term: 1), hardState: nil, inline: true) { _ in } }
        #expect(try Self.contents(log).map(\.index) == (1...6).map { LogIndex(UInt64($0)) })
    }
}

@Suite("Write-ahead log restart after a snapshot")
struct RestartAfterSnapshotTests {
    /// Entries 1...100 (hard state [7]), then a checkpoint at index 500.
    static func writeAndCheckpoint(_ log: WriteAheadLog, _ directory: DataDirectory, _ fs: SimulatedFileSystem) async throws {
        try await ExplicitIndexLogTests.write(log, ExplicitIndexLogTests.entries(1...100, term: 1), hardState: [7])
        _ = try CheckpointStore(directory: directory.checkpointsPath, fileSystem: fs)
            .write(EmptyCheckpoint(), metadata: CheckpointMetadata(index: LogIndex(500), term: Term(3), wallTimeMilliseconds: 0))
    }

    /// `restart(after:)`, waited for.
    static func restart(_ log: WriteAheadLog, after index: LogIndex) async throws {
        let done: Result<LogIndex, StorageError> = await withCheckedContinuation { continuation in
            do throws(StorageError) { try log.restart(after: index) { continuation.resume(returning: $0) } } catch {
                continuation.resume(returning: .failure(error))
            }
        }
        _ = try done.get()
    }

    @Test("restart(after:) drops every entry and continues after the snapshot's index, keeping the hard state")
    func restartAfterSnapshot() async throws {
        let fs = SimulatedFileSystem(seed: 45)
        var (directory, log, _) = try ExplicitIndexLogTests.open(fs)
        try await Self.writeAndCheckpoint(log, directory, fs)
        try await Self.restart(log, after: LogIndex(500))
        try await ExplicitIndexLogTests.write(log, ExplicitIndexLogTests.entries(501...510, term: 3))
        #expect(log.firstIndex == LogIndex(501) && log.lastIndex == LogIndex(510))
        try ExplicitIndexLogTests.reopen(fs, &directory, &log)
        defer {
            log.close()
            directory.unlock()
        }
        #expect(try ExplicitIndexLogTests.contents(log) == ExplicitIndexLogTests.entries(501...510, term: 3))
        #expect(log.hardState == [7])
    }

    @Test("restart(after:) on a full disk: the new segment is made without its preallocation, and the log goes on (it stopped for good before)")
    func restartOnFullDisk() async throws {
        let fs = SimulatedFileSystem(seed: 46)
        var (directory, log, _) = try ExplicitIndexLogTests.open(fs)
        try await Self.writeAndCheckpoint(log, directory, fs)
        // The space the old segments free is taken before the new one is preallocated.
        fs.failNextAllocations(1)
        try await Self.restart(log, after: LogIndex(500))
        try await ExplicitIndexLogTests.write(log, ExplicitIndexLogTests.entries(501...510, term: 3))
        try ExplicitIndexLogTests.reopen(fs, &directory, &log)
        defer {
            log.close()
            directory.unlock()
        }
        #expect(try ExplicitIndexLogTests.contents(log) == ExplicitIndexLogTests.entries(501...510, term: 3))
        #expect(log.hardState == [7])
    }
}
