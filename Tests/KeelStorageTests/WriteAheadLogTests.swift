import Foundation
import KeelCore
import Testing
@testable import KeelStorage

@Suite("Write-ahead log")
struct WriteAheadLogTests {
    func openLog(_ fs: any FileSystem, options: LogOptions = LogOptions(segmentSize: 4096)) throws -> WriteAheadLog {
        try fs.createDirectory("/log")
        return try WriteAheadLog(directory: "/log", fileSystem: fs, options: options, scans: [], nextIndex: LogIndex(1))
    }

    @Test("appends get consecutive indexes and read back intact across rotations")
    func appendAndReadBack() async throws {
        let fs = SimulatedFileSystem(seed: 3)
        let log = try openLog(fs)
        defer { log.close() }
        for i in 1...200 {
            let index = try await log.append(term: Term(2), payload: Array("entry \(i)".utf8) + [UInt8](repeating: 0, count: 80))
            #expect(index == LogIndex(UInt64(i)))
        }
        #expect(log.segmentNames.count > 3)
        for i in 1...200 {
            let entry = try log.entry(at: LogIndex(UInt64(i)))
            #expect(entry.term == Term(2) && entry.payload.starts(with: Array("entry \(i)".utf8)))
        }
        #expect(throws: StorageError.self) { try log.entry(at: LogIndex(201)) }
    }

    @Test("bytes(after:) counts the records after an index, across segments")
    func bytesAfterIndex() async throws {
        let log = try openLog(SimulatedFileSystem(seed: 4))
        defer { log.close() }
        for i in 1...200 {
            _ = try await log.append(term: Term(1), payload: [UInt8](repeating: UInt8(i & 0xFF), count: 100 + i % 7))
        }
        #expect(log.segmentNames.count > 3)
        #expect(log.bytes(after: LogIndex(200)) == 0)
        #expect(log.bytes(after: LogIndex(500)) == 0)
        #expect(log.bytes(after: .zero) <= log.bytesWritten && log.bytes(after: .zero) >= 200 * 100)
        for i in 0..<200 {
            // Each entry's record holds at least its payload, so the count falls by at least that.
            let step = Int64(log.bytes(after: LogIndex(UInt64(i)))) - Int64(log.bytes(after: LogIndex(UInt64(i + 1))))
            #expect(step >= Int64(100 + (i + 1) % 7), "entry \(i + 1)")
        }
    }

    @Test("a sealed segment is trimmed to its last record; only the newest is preallocated")
    func sealedSegmentsAreTrimmed() async throws {
        let fs = SimulatedFileSystem(seed: 3)
        let log = try openLog(fs)
        for _ in 1...100 { _ = try await log.append(term: Term(1), payload: [UInt8](repeating: 7, count: 100)) }
        let names = log.segmentNames
        log.close()
        for name in names.dropLast() {
            let bytes = fs.contents(of: "/log/" + name)!
            let scan = SegmentScanner.scan(bytes, name: name, isNewest: false, limits: Limits())
            #expect(scan.ending == .clean && scan.dataEnd == bytes.count && bytes.count <= 4096)
        }
        #expect(fs.contents(of: "/log/" + names.last!)!.count == 4096)
    }

    @Test("group commit: appends queued while a sync runs share the next one")
    func groupCommit() async throws {
        let simulated = SimulatedFileSystem(seed: 5)
        let fs = GatedFileSystem(simulated)
        let log = try openLog(fs, options: LogOptions(segmentSize: 1 << 20))
        defer { log.close() }
        let syncsBefore = log.syncCount
        fs.armGate()
        let acknowledged = Counter()
        // Enqueued synchronously: nothing here waits on a task that needs the (small) cooperative pool.
        try log.append(term: Term(1), payload: [1]) { result in
            if case .success = result { acknowledged.increment() }
        }
        fs.entered.wait() // the writer thread is inside the first fdatasync
        for i in 0..<49 {
            try log.append(term: Term(1), payload: [UInt8(i)]) { result in
                if case .success = result { acknowledged.increment() }
            }
        }
        #expect(acknowledged.value == 0, "nothing may be acknowledged before its sync")
        fs.release.signal()
        _ = try await log.append(term: Term(1), payload: [0xFF])
        #expect(acknowledged.value == 50)
        // One sync for the first append, one for the 49 that queued behind it, and one for the
        // last unless it joined them: without group commit this would be 51.
        #expect(log.syncCount - syncsBefore <= 3)
    }

    @Test("a failed fsync stops the log: nothing more is acknowledged and every later write is refused with the reason")
    func fsyncFailureIsFatal() async throws {
        let fs = SimulatedFileSystem(seed: 5)
        let log = try openLog(fs)
        defer { log.close() }
        _ = try await log.append(term: Term(1), payload: [1])
        fs.failNextSyncs()
        await #expect(throws: StorageError.self) { try await log.append(term: Term(1), payload: [2]) }
        // The next sync would succeed, but the log must not retry or go on.
        do {
            _ = try await log.append(term: Term(1), payload: [3])
            Issue.record("the log accepted a write after a failed fsync")
        } catch {
            guard case .stopped(let reason) = error else {
                Issue.record("expected .stopped, got \(error)")
                return
            }
            #expect(reason.contains("fdatasync") && reason.contains("input/output error"))
        }
        #expect(log.stoppedReason != nil)
        #expect(try log.entry(at: LogIndex(1)).payload == [1], "reads keep working")
    }

    @Test("ENOSPC fails the write, keeps reads working, and later writes succeed once there is room")
    func noSpace() async throws {
        let fs = SimulatedFileSystem(seed: 5)
        let log = try openLog(fs, options: LogOptions(segmentSize: 4096))
        defer { log.close() }
        for _ in 0..<10 { _ = try await log.append(term: Term(1), payload: [UInt8](repeating: 1, count: 100)) }
        let used = fs.contents(of: "/log/" + log.segmentNames.last!)!.count
        // Fill the disk: the current segment is preallocated, so the failure comes at rotation.
        fs.setCapacity(used + 100)
        var failures = 0
        for _ in 0..<60 {
            do { _ = try await log.append(term: Term(1), payload: [UInt8](repeating: 2, count: 100)) } catch {
                guard case .noSpace = error else {
                    Issue.record("expected .noSpace, got \(error)")
                    return
                }
                failures += 1
            }
        }
        #expect(failures > 0)
        let last = log.lastIndex
        #expect(try log.entry(at: LogIndex(1)).payload.first == 1)
        fs.setCapacity(nil)
        let next = try await log.append(term: Term(1), payload: [3])
        #expect(next == last.next, "indexes continue without a gap after the failed writes")
        #expect(try log.entry(at: next).payload == [3])
    }

    @Test("an entry over the size limit is refused")
    func entryTooLarge() async throws {
        var limits = Limits()
        limits.entrySizeMax = 10
        let log = try openLog(SimulatedFileSystem(seed: 1), options: LogOptions(segmentSize: 4096, limits: limits))
        defer { log.close() }
        await #expect(throws: StorageError.entryTooLarge(size: 11, limit: 10)) {
            try await log.append(term: Term(1), payload: [UInt8](repeating: 0, count: 11))
        }
    }

    @Test("a full queue refuses appends with .overloaded")
    func queueLimit() async throws {
        var limits = Limits()
        limits.appendQueueCountMax = 4
        let simulated = SimulatedFileSystem(seed: 1)
        let fs = GatedFileSystem(simulated)
        let log = try openLog(fs, options: LogOptions(segmentSize: 1 << 20, limits: limits))
        defer { log.close() }
        fs.armGate()
        try log.append(term: Term(1), payload: [0]) { _ in }
        fs.entered.wait()
        for i in 0..<4 { try log.append(term: Term(1), payload: [UInt8(i)]) { _ in } }
        #expect(throws: StorageError.overloaded(queued: 4)) { try log.append(term: Term(1), payload: [9]) { _ in } }
        fs.release.signal()
    }

    @Test("the log is rejected with a segment size outside the limits")
    func invalidSegmentSize() {
        #expect(throws: StorageError.self) {
            try openLog(SimulatedFileSystem(seed: 1), options: LogOptions(segmentSize: 100))
        }
    }
}

final class Counter: @unchecked Sendable {
    // @unchecked Sendable: `count` is only touched under `lock`.
    private let lock = NSLock()
    private var count = 0
    func increment() { lock.withLock { count += 1 } }
    var value: Int { lock.withLock { count } }
}
