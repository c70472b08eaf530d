// The Raft core's ceiling: a 3-node cluster in memory on one thread, with a perfect network and
// no I/O, committing proposals as fast as the cores can step. `keel bench raft` runs it.

import KeelCore
import KeelRaft

/// Drives an in-memory cluster to measure the core alone.
public enum RaftBenchmark {
    /// Commits `entries` proposals of `size` bytes, proposing `batch` at a time on the leader
    /// (`propose(batch:)`: one AppendEntries round per batch).
    ///
    /// - Returns: the number of entries applied on the leader (at least `entries`).
    public static func run(nodes count: Int = 3, entries: Int, size: Int = 100, batch: Int = 64) throws(RaftError) -> Int {
        let membership = Membership(voters: (1...UInt64(count)).map { NodeID($0) })
        var storages: [MemoryRaftStorage] = []
        var cores: [RaftNode] = []
        for id in membership.voters {
            let storage = MemoryRaftStorage(membership: membership)
            storages.append(storage)
            cores.append(try RaftNode(configuration: RaftConfiguration(id: id), storage: storage, randomSeed: id.rawValue))
        }
        var inbox: [Message] = []
        var applied = 0
        func drain(_ position: Int) {
            let core = cores[position]
            while core.hasReady {
                let ready = core.ready()
                if let state = ready.hardState { storages[position].setHardState(state) }
                storages[position].append(ready.entries)
                inbox += ready.messages
                if position == 0 { applied += ready.committedEntries.count }
                core.advance(ready)
                // Keep memory flat: compact what every node has applied.
                let status = core.status
                if status.appliedIndex.rawValue > storages[position].snapshot.index.rawValue + 4096 {
                    storages[position].createSnapshot(at: status.appliedIndex, membership: status.membership, data: [])
                }
            }
        }
        func settle() {
            for position in cores.indices { drain(position) }
            while !inbox.isEmpty {
                let messages = inbox
                inbox = []
                for message in messages {
                    let position = Int(message.to.rawValue) - 1
                    cores[position].step(message)
                    drain(position)
                }
            }
        }
        cores[0].campaign()
        settle()
        let payload = [UInt8](repeating: 0x61, count: size)
        var proposed = 0
        while applied < entries {
            let count = min(batch, entries - proposed)
            if count > 0 {
                try cores[0].propose(batch: Array(repeating: payload, count: count))
                proposed += count
            }
            settle()
            if proposed >= entries && applied < entries {
                for core in cores { core.tick() }
                settle()
            }
        }
        return applied
    }
}
