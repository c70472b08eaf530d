import KeelCore
import Testing
@testable import KeelStorage

@Suite("Simulated file system")
struct SimulatedFileSystemTests {
    func setUp() throws -> (SimulatedFileSystem, OpenFile) {
        let fs = SimulatedFileSystem(seed: 1)
        try fs.createDirectory("/d")
        let handle = try fs.open("/d/f", options: [.create])
        return (fs, handle)
    }

    @Test("a crash drops writes that were never synced")
    func unsyncedWritesAreLost() throws {
        let (fs, handle) = try setUp()
        try fs.synchronizeDirectory("/d")
        try fs.write(handle, [1, 2, 3], at: 0)
        try fs.synchronize(handle)
        try fs.write(handle, [4, 5, 6], at: 3)
        fs.crash()
        fs.restart()
        #expect(fs.contents(of: "/d/f") == [1, 2, 3])
    }

    @Test("a new name is lost in a crash unless its directory was synced")
    func namesNeedDirectorySync() throws {
        let (fs, handle) = try setUp()
        try fs.write(handle, [1], at: 0)
        try fs.synchronize(handle)
        fs.crash()
        fs.restart()
        #expect(!fs.exists("/d/f"))

        let again = try fs.open("/d/g", options: [.create])
        try fs.write(again, [2], at: 0)
        try fs.synchronize(again)
        try fs.synchronizeDirectory("/d")
        fs.crash()
        fs.restart()
        #expect(fs.contents(of: "/d/g") == [2])
    }

    @Test("a rename is durable only after the directory sync")
    func renameNeedsDirectorySync() throws {
        let (fs, handle) = try setUp()
        try fs.write(handle, [9], at: 0)
        try fs.synchronize(handle)
        try fs.synchronizeDirectory("/d")
        try fs.rename("/d/f", to: "/d/renamed")
        fs.crash()
        fs.restart()
        #expect(fs.exists("/d/f") && !fs.exists("/d/renamed"))
    }

    @Test("a failed fsync reports EIO; as on Linux the data stays readable but a crash loses it")
    func fsyncFailure() throws {
        let (fs, handle) = try setUp()
        try fs.synchronizeDirectory("/d")
        try fs.write(handle, [1, 2], at: 0)
        fs.failNextSyncs()
        #expect(throws: FileSystemError.self) { try fs.synchronize(handle) }
        #expect(fs.contents(of: "/d/f") == [1, 2], "the page cache still shows the bytes")
        do {
            try fs.synchronize(handle)
        } catch {
            Issue.record("only the next sync should fail: \(error)")
        }
        fs.crash()
        fs.restart()
        #expect(fs.contents(of: "/d/f") == [], "the later sync did not write what the failed one dropped")
    }

    @Test("writes past the capacity fail with ENOSPC and change nothing")
    func noSpace() throws {
        let (fs, handle) = try setUp()
        fs.setCapacity(10)
        try fs.write(handle, [UInt8](repeating: 1, count: 8), at: 0)
        do {
            try fs.write(handle, [UInt8](repeating: 2, count: 8), at: 8)
            Issue.record("the write should have failed")
        } catch {
            #expect(error.kind == .noSpace)
        }
        #expect(fs.contents(of: "/d/f") == [UInt8](repeating: 1, count: 8))
    }

    @Test("a crash keeping a random prefix tears the last kept write at a 512-byte boundary, the same way for the same seed")
    func tornWritesAreDeterministic() throws {
        func run(seed: UInt64) throws -> [[UInt8]?] {
            var results: [[UInt8]?] = []
            for round in 0..<20 {
                let fs = SimulatedFileSystem(seed: seed &+ UInt64(round))
                try fs.createDirectory("/d")
                let handle = try fs.open("/d/f", options: [.create])
                try fs.synchronizeDirectory("/d")
                for i in 0..<4 { try fs.write(handle, [UInt8](repeating: UInt8(i + 1), count: 2048), at: i * 2048) }
                fs.crash()
                fs.restart(mode: .keepRandomPrefix)
                let kept = fs.contents(of: "/d/f")
                #expect((kept?.count ?? 0) % 512 == 0)
                results.append(kept)
            }
            return results
        }
        let first = try run(seed: 99)
        #expect(first == (try run(seed: 99)))
        #expect(Set(first.map { $0?.count ?? -1 }).count > 1, "different rounds should keep different prefixes")
    }

    @Test("a planted bit flip shows in reads but not on disk")
    func bitFlipOnRead() throws {
        let (fs, handle) = try setUp()
        try fs.write(handle, [0, 0, 0, 0], at: 0)
        fs.flipBitOnRead(path: "/d/f", offset: 2)
        #expect(try fs.readRange(handle, offset: 0, count: 4, path: "/d/f") == [0, 0, 1, 0])
        #expect(fs.contents(of: "/d/f") == [0, 0, 0, 0])
    }

    @Test("a lock is exclusive until its handle is closed")
    func locking() throws {
        let fs = SimulatedFileSystem(seed: 1)
        try fs.createDirectory("/d")
        let held = try fs.lockExclusively("/d/LOCK")
        #expect(throws: FileSystemError.self) { try fs.lockExclusively("/d/LOCK") }
        fs.close(held)
        fs.close(try fs.lockExclusively("/d/LOCK"))
    }
}
