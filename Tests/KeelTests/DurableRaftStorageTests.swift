import Keel
import KeelCore
import KeelRaft
import KeelStorage
import Testing

struct BytesSource: CheckpointSource {
    let bytes: [UInt8]
    func writeCheckpoint(to sink: inout CheckpointSink) throws(StorageError) { try sink.write(bytes) }
}

@Suite("Raft on the storage engine's log")
struct DurableRaftStorageTests {
    static let membership = Membership(voters: [NodeID(1)])

    /// The caller's loop for one node: persist, (no peers to send to), apply, advance.
    static func drain(_ node: RaftNode, _ storage: DurableRaftStorage, applied: inout [Entry]) async throws {
        while node.hasReady {
            let ready = node.ready()
            try await storage.persist(entries: ready.entries, hardState: ready.hardState)
            applied += ready.committedEntries
            node.advance(ready)
            node.checkInvariants()
        }
    }

    @Test("a single node's term, vote, commit and log survive a restart, and committed entries are applied again from the start")
    func singleNodeRestart() async throws {
        let fs = SimulatedFileSystem(seed: 51)
        var (storage, state) = try DurableRaftStorage.open(path: "/node", options: LogOptions(segmentSize: 4096), initialMembership: Self.membership, fileSystem: fs)
        #expect(state == nil)
        var node = try RaftNode(configuration: RaftConfiguration(id: NodeID(1)), storage: storage, randomSeed: 1)
        node.campaign()
        var applied: [Entry] = []
        try await Self.drain(node, storage, applied: &applied)
        for i in 0..<40 {
            try node.propose(Array("entry \(i)".utf8))
            try await Self.drain(node, storage, applied: &applied)
        }
        let before = node.status
        #expect(applied.filter { !$0.data.isEmpty }.count == 40)
        storage.close()

        (storage, state) = try DurableRaftStorage.open(path: "/node", options: LogOptions(segmentSize: 4096), initialMembership: Self.membership, fileSystem: fs)
        defer { storage.close() }
        node = try RaftNode(configuration: RaftConfiguration(id: NodeID(1)), storage: storage, randomSeed: 2)
        #expect(node.status.term == before.term && node.status.votedFor == NodeID(1))
        #expect(node.status.commitIndex == before.commitIndex && node.status.lastIndex == before.lastIndex)
        var replayed: [Entry] = []
        try await Self.drain(node, storage, applied: &replayed)
        #expect(replayed == applied, "the committed entries come back in order, once")
    }

    @Test("a conflicting suffix is replaced in the one log, and the replacement survives a restart")
    func suffixReplacement() async throws {
        let fs = SimulatedFileSystem(seed: 52)
        var (storage, _) = try DurableRaftStorage.open(path: "/node", options: LogOptions(segmentSize: 4096), initialMembership: Self.membership, fileSystem: fs)
        let first = (1...60).map { Entry(index: LogIndex(UInt64($0)), term: Term(1), data: Array("a\($0)".utf8)) }
        try await storage.persist(entries: first, hardState: HardState(term: Term(1), votedFor: NodeID(2), commit: LogIndex(10)))
        let replacement = (31...35).map { Entry(index: LogIndex(UInt64($0)), term: Term(2), kind: .configurationChange, data: Array("b\($0)".utf8)) }
        try await storage.persist(entries: replacement, hardState: HardState(term: Term(2), votedFor: nil, commit: LogIndex(20)))
        storage.close()
        (storage, _) = try DurableRaftStorage.open(path: "/node", options: LogOptions(segmentSize: 4096), initialMembership: Self.membership, fileSystem: fs)
        defer { storage.close() }
        #expect(storage.lastIndex == LogIndex(35))
        #expect(try storage.entries(from: LogIndex(1), to: LogIndex(36), maxSize: 1 << 20) == Array(first.prefix(30)) + replacement)
        #expect(storage.initialState().0 == HardState(term: Term(2), votedFor: nil, commit: LogIndex(20)))
    }

    @Test("entries served from memory are the log's: a replaced suffix replaces them, and nothing past the written end is served")
    func recentEntries() async throws {
        let fs = SimulatedFileSystem(seed: 54)
        let (storage, _) = try DurableRaftStorage.open(path: "/node", options: LogOptions(segmentSize: 4096), initialMembership: Self.membership, fileSystem: fs)
        defer { storage.close() }
        let first = (1...60).map { Entry(index: LogIndex(UInt64($0)), term: Term(1), data: Array("a\($0)".utf8)) }
        try await storage.persist(entries: first, hardState: HardState(term: Term(1), votedFor: NodeID(1), commit: LogIndex(10)))
        #expect(try storage.entries(from: LogIndex(1), to: LogIndex(61), maxSize: 1 << 20) == first)
        #expect(try storage.entries(from: LogIndex(5), to: LogIndex(61), maxSize: 100).count == 3, "the size limit holds for cached entries")
        let replacement = (31...35).map { Entry(index: LogIndex(UInt64($0)), term: Term(2), data: Array("b\($0)".utf8)) }
        try await storage.persist(entries: replacement, hardState: HardState(term: Term(2), votedFor: nil, commit: LogIndex(20)))
        #expect(try storage.entries(from: LogIndex(1), to: LogIndex(36), maxSize: 1 << 20) == Array(first.prefix(30)) + replacement)
        #expect(throws: RaftStorageError.unavailable) { try storage.entries(from: LogIndex(30), to: LogIndex(37), maxSize: 1 << 20) }

        // A write the disk refuses: its entries were remembered, but are never served.
        fs.setCapacity(0)
        let refused = (36...40).map { Entry(index: LogIndex(UInt64($0)), term: Term(2), data: Array(repeating: 7, count: 3000)) }
        await #expect(throws: StorageError.self) { try await storage.persist(entries: refused, hardState: nil) }
        let written = storage.lastIndex
        #expect(written < LogIndex(40))
        #expect(throws: RaftStorageError.unavailable) { try storage.entries(from: LogIndex(30), to: written.next.next, maxSize: 1 << 20) }
        fs.setCapacity(nil)
        let retried = (written.rawValue + 1...41).map { Entry(index: LogIndex($0), term: Term(3), data: Array("c\($0)".utf8)) }
        try await storage.persist(entries: retried, hardState: HardState(term: Term(3), votedFor: nil, commit: LogIndex(20)))
        let served = try storage.entries(from: LogIndex(31), to: LogIndex(42), maxSize: 1 << 20)
        #expect(served == replacement + refused.prefix(Int(written.rawValue) - 35) + retried)
        #expect(served.map(\.index) == (31...41).map { LogIndex(UInt64($0)) })
    }

    @Test("a snapshot is the leader's checkpoint file, sent in chunks, verified and installed by the follower, and survives its restart")
    func snapshotTransfer() async throws {
        let fs = SimulatedFileSystem(seed: 53)
        let membership = Membership(voters: [NodeID(1), NodeID(2)], learners: [NodeID(3)])
        let (leader, _) = try DurableRaftStorage.open(path: "/leader", options: LogOptions(segmentSize: 4096), initialMembership: membership, fileSystem: fs)
        defer { leader.close() }
        let entries = (1...100).map { Entry(index: LogIndex(UInt64($0)), term: Term(3), data: Array(repeating: UInt8($0), count: 50)) }
        try await leader.persist(entries: entries, hardState: HardState(term: Term(3), votedFor: NodeID(1), commit: LogIndex(100)))
        let state = (0..<5000).map { UInt8(truncatingIfNeeded: $0 * 7) }
        try leader.createSnapshot(at: LogIndex(80), term: Term(3), membership: membership, state: BytesSource(bytes: state), wallTimeMilliseconds: 0)
        #expect(leader.snapshot.index == LogIndex(80) && leader.firstIndex == LogIndex(81))
        #expect(throws: RaftStorageError.compacted) { try leader.term(at: LogIndex(50)) }

        var (follower, restored) = try DurableRaftStorage.open(path: "/follower", options: LogOptions(segmentSize: 4096), initialMembership: Membership(voters: [NodeID(1), NodeID(2)]), fileSystem: fs)
        #expect(restored == nil)
        var offset = 0
        while true {
            let chunk = try leader.snapshotChunk(of: leader.snapshot, offset: offset, maxSize: 700)
            try follower.receive(IncomingSnapshotChunk(metadata: leader.snapshot, offset: offset, data: chunk.data))
            offset += chunk.data.count
            if chunk.isLast { break }
        }
        #expect(offset > 5000)
        let installed = try await follower.install(leader.snapshot)
        #expect(installed == state)
        #expect(follower.snapshot.membership == membership)
        try await follower.persist(entries: Array(entries.suffix(20)), hardState: nil)
        follower.close()

        (follower, restored) = try DurableRaftStorage.open(path: "/follower", options: LogOptions(segmentSize: 4096), initialMembership: Membership(voters: [NodeID(1)]), fileSystem: fs)
        defer { follower.close() }
        #expect(restored == state)
        #expect(follower.snapshot.index == LogIndex(80) && follower.snapshot.membership == membership)
        #expect(try follower.entries(from: LogIndex(81), to: LogIndex(101), maxSize: 1 << 20) == Array(entries.suffix(20)))
    }

    @Test("a damaged snapshot file is refused, not installed")
    func damagedSnapshot() async throws {
        let fs = SimulatedFileSystem(seed: 54)
        let (leader, _) = try DurableRaftStorage.open(path: "/leader", options: LogOptions(segmentSize: 4096), initialMembership: Self.membership, fileSystem: fs)
        defer { leader.close() }
        try await leader.persist(entries: (1...10).map { Entry(index: LogIndex(UInt64($0)), term: Term(1), data: [1]) }, hardState: nil)
        try leader.createSnapshot(at: LogIndex(10), term: Term(1), membership: Self.membership, state: BytesSource(bytes: [1, 2, 3]), wallTimeMilliseconds: 0)
        let (follower, _) = try DurableRaftStorage.open(path: "/follower", options: LogOptions(segmentSize: 4096), initialMembership: Self.membership, fileSystem: fs)
        defer { follower.close() }
        var chunk = try leader.snapshotChunk(of: leader.snapshot, offset: 0, maxSize: 1 << 20)
        chunk.data[chunk.data.count / 2] ^= 0x40
        try follower.receive(IncomingSnapshotChunk(metadata: leader.snapshot, offset: 0, data: chunk.data))
        await #expect(throws: StorageError.self) { _ = try await follower.install(leader.snapshot) }
        #expect(follower.snapshot.index == .zero)
    }
}
