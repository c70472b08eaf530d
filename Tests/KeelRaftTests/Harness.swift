// A small cluster driver for Raft tests: nodes over MemoryRaftStorage, the caller's loop
// (persist, send, apply, advance) done by the book, and a network the test controls by hand.

import KeelCore
import KeelRaft
import Testing

final class TestNode {
    let id: NodeID
    var storage: MemoryRaftStorage
    var raft: RaftNode!
    var applied: [Entry] = []
    var readStates: [ReadState] = []
    var incoming: [UInt8] = []
    var installedSnapshots: [SnapshotMetadata] = []
    var configuration: RaftConfiguration

    init(id: NodeID, membership: Membership, configure: (inout RaftConfiguration) -> Void) {
        self.id = id
        storage = MemoryRaftStorage(membership: membership)
        configuration = RaftConfiguration(id: id)
        configure(&configuration)
        raft = try! RaftNode(configuration: configuration, storage: storage, randomSeed: id.rawValue)
    }

    /// Restarts from what was persisted (a crash).
    func restart() {
        applied = Array(applied.prefix { $0.index <= storage.snapshot.index })
        readStates = []
        incoming = []
        raft = try! RaftNode(configuration: configuration, storage: storage, randomSeed: id.rawValue &+ 1000)
    }

    var status: RaftStatus { raft.status }
}

final class TestCluster {
    var nodes: [NodeID: TestNode] = [:]
    var ids: [NodeID]
    /// Messages sent and not yet delivered, in order.
    var outbox: [Message] = []
    /// Directed links that drop everything: [from, to].
    var cut: Set<[UInt64]> = []
    var down: Set<NodeID> = []
    var delivered: [Message] = []
    /// Returns true for a message the network should lose.
    var lose: (Message) -> Bool = { _ in false }

    init(_ count: Int, learners: [UInt64] = [], configure: (inout RaftConfiguration) -> Void = { _ in }) {
        ids = (1...UInt64(count)).map { NodeID($0) }
        let membership = Membership(voters: ids.filter { !learners.contains($0.rawValue) }, learners: learners.map { NodeID($0) })
        for id in ids { nodes[id] = TestNode(id: id, membership: membership, configure: configure) }
    }

    subscript(_ id: UInt64) -> TestNode { nodes[NodeID(id)]! }

    /// Adds a node that is not yet a member; it joins through a membership change. Like a joining
    /// etcd member, it starts knowing the cluster's current membership.
    func addNode(_ id: UInt64, configure: (inout RaftConfiguration) -> Void = { _ in }) {
        let membership = leader?.status.membership ?? Membership(voters: [])
        let node = TestNode(id: NodeID(id), membership: membership, configure: configure)
        nodes[NodeID(id)] = node
        ids.append(NodeID(id))
    }

    /// Runs the caller's loop on one node.
    func process(_ id: NodeID) {
        guard !down.contains(id), let node = nodes[id] else { return }
        while node.raft.hasReady {
            let ready = node.raft.ready()
            if let state = ready.hardState { node.storage.setHardState(state) }
            for chunk in ready.incomingSnapshotChunks {
                if chunk.offset == 0 { node.incoming = [] }
                if chunk.offset == node.incoming.count { node.incoming += chunk.data }
            }
            if let snapshot = ready.snapshot {
                node.storage.applySnapshot(snapshot, data: node.incoming)
                node.installedSnapshots.append(snapshot)
                node.applied = []
            }
            node.storage.append(ready.entries)
            outbox += ready.messages
            node.applied += ready.committedEntries
            node.readStates += ready.readStates
            node.raft.advance(ready)
            node.raft.checkInvariants()
        }
    }

    func processAll() { for id in ids { process(id) } }

    /// Delivers messages until none are left. Returns how many were delivered.
    @discardableResult
    func stabilize(limit: Int = 100_000) -> Int {
        processAll()
        var count = 0
        while !outbox.isEmpty {
            let message = outbox.removeFirst()
            count += 1
            precondition(count < limit, "the cluster does not settle")
            if cut.contains([message.from.rawValue, message.to.rawValue]) || down.contains(message.to) || lose(message) { continue }
            guard let node = nodes[message.to] else { continue }
            delivered.append(message)
            node.raft.step(message)
            process(message.to)
        }
        return count
    }

    /// Ticks every live node `count` times, settling after each tick.
    func tick(_ count: Int = 1, only: [UInt64]? = nil) {
        for _ in 0..<count {
            for id in ids where !down.contains(id) && (only == nil || only!.contains(id.rawValue)) {
                nodes[id]!.raft.tick()
                process(id)
            }
            stabilize()
        }
    }

    func elect(_ id: UInt64) {
        self[id].raft.campaign()
        stabilize()
    }

    var leader: TestNode? {
        let leaders = ids.filter { !down.contains($0) }.compactMap { nodes[$0] }.filter { $0.status.role == .leader }
        return leaders.max { $0.status.term < $1.status.term }
    }

    func partition(_ a: [UInt64], _ b: [UInt64]) {
        for x in a { for y in b { cut.insert([x, y]); cut.insert([y, x]) } }
    }

    func heal() { cut = [] }

    func crash(_ id: UInt64) {
        down.insert(NodeID(id))
        outbox.removeAll { $0.to == NodeID(id) || $0.from == NodeID(id) }
    }

    func restart(_ id: UInt64) {
        down.remove(NodeID(id))
        self[id].restart()
        process(NodeID(id))
    }

    /// The data of the normal, non-empty entries a node applied.
    func appliedData(_ id: UInt64) -> [String] {
        self[id].applied.filter { $0.kind == .normal && !$0.data.isEmpty }.map { String(decoding: $0.data, as: UTF8.self) }
    }
}

func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }
