import Foundation
import Keel
import KeelCore
import KeelRaft
import KeelStorage
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import Testing

/// A register map for the node tests: "set k v", and "append k v" (which returns the new
/// value: applied twice, it shows).
final class TestMachine: StateMachine, @unchecked Sendable {
    // @unchecked Sendable: the node calls it one call at a time (on its loop or its apply thread).
    var values: [String: String] = [:]
    var applied: [String] = []
    /// Commands applied off the node's event loop (on its apply thread).
    var appliedOffLoop = 0
    /// Microseconds each command takes (a slow machine widens races with the loop).
    var applyDelay: UInt32 = 0

    /// Commands `willApply` announced and `apply` has not met yet, in order.
    var announced: [String] = []
    /// Announced commands in all, and commands applied other than the next one announced.
    var announcedCount = 0
    var appliedUnannounced = 0
    /// Every batch `willApply` announced, in order.
    var announcedBatches: [[String]] = []

    func willApply(_ commands: [ArraySlice<UInt8>]) {
        // Every announced command comes next, in order: none may be pending from an earlier call.
        if !announced.isEmpty { appliedUnannounced += announced.count }
        announced = commands.map { String(decoding: $0, as: UTF8.self) }
        announcedCount += commands.count
        announcedBatches.append(announced)
    }

    func apply(_ command: [UInt8]) -> [UInt8] {
        // (After the change: a read or snapshot in the window sees it.)
        defer { if applyDelay > 0 { usleep(applyDelay) } }
        let text = String(decoding: command, as: UTF8.self)
        applied.append(text)
        if !announced.isEmpty {
            if announced.first == text { announced.removeFirst() } else { appliedUnannounced += 1 }
        }
        if MultiThreadedEventLoopGroup.currentEventLoop == nil { appliedOffLoop += 1 }
        let parts = text.split(separator: " ").map(String.init)
        if parts.count == 3, parts[0] == "set" {
            values[parts[1]] = parts[2]
            return Array("ok".utf8)
        }
        if parts.count == 3, parts[0] == "append" {
            values[parts[1], default: ""] += parts[2]
            return Array(values[parts[1]]!.utf8)
        }
        return Array("?".utf8)
    }

    /// A copy-on-write copy of the map: O(1) to take, written out on the storage queue.
    struct Snapshot: CheckpointSource {
        let values: [String: String]
        func writeCheckpoint(to sink: inout CheckpointSink) throws(StorageError) {
            var writer = ByteWriter()
            for key in values.keys.sorted() {
                writer.writeLengthPrefixed(Array(key.utf8))
                writer.writeLengthPrefixed(Array(values[key]!.utf8))
            }
            try sink.write(writer.bytes)
        }
    }

    func snapshot() -> Snapshot { Snapshot(values: values) }

    func restore(from bytes: [UInt8]) throws {
        var reader = ByteReader(bytes)
        var restored: [String: String] = [:]
        while !reader.isAtEnd {
            let key = String(decoding: try reader.readLengthPrefixed(limit: 1 << 20), as: UTF8.self)
            restored[key] = String(decoding: try reader.readLengthPrefixed(limit: 1 << 20), as: UTF8.self)
        }
        values = restored
        restoredFromSnapshot = true
    }

    var restoredFromSnapshot = false
}

func freePorts(_ count: Int, group: any EventLoopGroup) async throws -> [Int] {
    var ports: [Int] = []
    var channels: [any Channel] = []
    for _ in 0..<count {
        let channel = try await ServerBootstrap(group: group).bind(host: "127.0.0.1", port: 0).get()
        ports.append(channel.localAddress!.port!)
        channels.append(channel)
    }
    for channel in channels { try await channel.close() }
    return ports
}

@Suite("Keel nodes over loopback TCP", .serialized)
struct KeelNodeTests {
    func configuration(_ id: UInt64, ports: [Int], base: String) -> NodeConfiguration {
        var members: [NodeID: PeerAddress] = [:]
        for (position, port) in ports.enumerated() { members[NodeID(UInt64(position + 1))] = PeerAddress(host: "127.0.0.1", port: port) }
        var configuration = NodeConfiguration(node: NodeID(id), dataDirectory: base + "/node\(id)", members: members, clusterToken: Array("token".utf8))
        configuration.tickMilliseconds = 20
        configuration.log = LogOptions(segmentSize: 1 << 20)
        return configuration
    }

    func leader(of nodes: [KeelNode<TestMachine>]) async throws -> KeelNode<TestMachine>? {
        for node in nodes where try await node.status().role == .leader { return node }
        return nil
    }

    /// The leader once one is elected (nil after 10 s).
    func awaitLeader(of nodes: [KeelNode<TestMachine>]) async throws -> KeelNode<TestMachine>? {
        for _ in 0..<500 {
            if let elected = try await leader(of: nodes) { return elected }
            try await Task.sleep(for: .milliseconds(20))
        }
        return nil
    }

    @Test("three nodes elect a leader, commit proposals made through any node, and agree")
    func threeNodes() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let base = NSTemporaryDirectory() + "keel-node-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let ports = try await freePorts(3, group: group)
        let machines = (0..<3).map { _ in TestMachine() }
        var nodes: [KeelNode<TestMachine>] = []
        for id in 1...3 {
            nodes.append(try await KeelNode.start(configuration: configuration(UInt64(id), ports: ports, base: base), machine: machines[id - 1],
                                                  group: group, logger: silentLogger))
        }
        let elected = try await awaitLeader(of: nodes)
        #expect(elected != nil, "a leader was elected")
        for i in 0..<30 {
            let node = nodes[i % 3]
            var result: [UInt8] = []
            for attempt in 0..<100 {
                do {
                    // Each attempt is a command of its own ("v3", then "v3r1", ...): one whose
                    // outcome was unknown may still commit after the retry (it may be queued in a
                    // link to the old leader, where a read cannot see it), and both then apply,
                    // once each, which "each command applied once" below tells from an entry
                    // applied twice.
                    result = try await node.propose(Array("set k\(i) v\(i)\(attempt == 0 ? "" : "r\(attempt)")".utf8))
                    break
                } catch NodeError.noLeader {
                    try await Task.sleep(for: .milliseconds(20))
                } catch NodeError.leaderChanged, NodeError.timedOut {
                    // The outcome is unknown: look before writing again.
                    if let value = try? await node.read({ $0.values["k\(i)"] }), value == "v\(i)" || value.hasPrefix("v\(i)r") {
                        result = Array("ok".utf8)
                        break
                    }
                }
            }
            #expect(result == Array("ok".utf8))
        }
        // A linearizable read through a follower sees every write acknowledged before it.
        let follower = try await nodes.asyncFirst { try await $0.status().role != .leader } ?? nodes[0]
        let seen = try await follower.read { $0.values.count }
        #expect(seen == 30)
        for node in nodes { await node.shutdown() }
        let histories = machines.map(\.applied)
        for a in 0..<3 {
            for b in 0..<3 where a < b {
                let (x, y) = (histories[a], histories[b])
                #expect(x.starts(with: y) || y.starts(with: x), "nodes \(a + 1) and \(b + 1) applied the same commands in the same order")
            }
        }
        #expect(histories.contains { history in (0..<30).allSatisfy { i in history.contains { $0 == "set k\(i) v\(i)" || $0.hasPrefix("set k\(i) v\(i)r") } } },
                "the leader applied every write")
        #expect(histories.allSatisfy { Set($0).count == $0.count }, "each command applied once")
        try await group.shutdownGracefully()
    }

    @Test("a node restarted from its data directory recovers and catches up")
    func restart() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let base = NSTemporaryDirectory() + "keel-node-restart-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let ports = try await freePorts(1, group: group)
        let first = TestMachine()
        var node = try await KeelNode.start(configuration: configuration(1, ports: ports, base: base), machine: first, group: group, logger: silentLogger)
        for i in 0..<20 {
            var done = false
            for _ in 0..<100 where !done {
                do {
                    _ = try await node.propose(Array("set k\(i) v\(i)".utf8))
                    done = true
                } catch NodeError.noLeader {
                    try await Task.sleep(for: .milliseconds(20))
                }
            }
        }
        await node.shutdown()
        let second = TestMachine()
        node = try await KeelNode.start(configuration: configuration(1, ports: ports, base: base), machine: second, group: group, logger: silentLogger)
        var caughtUp = false
        for _ in 0..<500 where !caughtUp {
            caughtUp = try await node.read { $0.values.count } == 20
            if !caughtUp { try await Task.sleep(for: .milliseconds(20)) }
        }
        #expect(caughtUp, "the committed log is applied again after the restart")
        await node.shutdown()
        try await group.shutdownGracefully()
    }
}

extension KeelNodeTests {
    @Test("a node whose data was wiped while the others compacted their logs rejoins from a streamed snapshot")
    func snapshotCatchUp() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let base = NSTemporaryDirectory() + "keel-node-snapshot-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let ports = try await freePorts(3, group: group)
        func start(_ id: UInt64, _ machine: TestMachine) async throws -> KeelNode<TestMachine> {
            var configuration = configuration(id, ports: ports, base: base)
            configuration.snapshotInterval = 20
            return try await KeelNode.start(configuration: configuration, machine: machine, group: group, logger: silentLogger)
        }
        let machines = [TestMachine(), TestMachine(), TestMachine()]
        var nodes: [KeelNode<TestMachine>] = []
        for id in 1...3 { nodes.append(try await start(UInt64(id), machines[id - 1])) }
        func propose(_ command: String, via candidates: [KeelNode<TestMachine>]) async throws {
            for attempt in 0..<300 {
                do {
                    _ = try await candidates[attempt % candidates.count].propose(Array(command.utf8))
                    return
                } catch NodeError.noLeader {
                    try await Task.sleep(for: .milliseconds(20))
                } catch NodeError.timedOut, NodeError.leaderChanged {
                    continue
                }
            }
            Issue.record("could not commit \(command)")
        }
        try await propose("set first 1", via: nodes)
        await nodes[2].shutdown()
        for i in 0..<80 { try await propose("set k\(i) v\(i)", via: Array(nodes.prefix(2))) }
        // The two live nodes have taken snapshots and compacted past what node 3 has.
        let compacted = FileManager.default.fileExists(atPath: base + "/node1/checkpoints")
            && ((try? FileManager.default.contentsOfDirectory(atPath: base + "/node1/checkpoints"))?.contains { $0.hasSuffix(".ckpt") } ?? false)
        #expect(compacted)
        // Node 3's data is gone; the entries it needs are compacted on the others, so only a
        // snapshot can bring it back. (Outside a test, wiping a voter loses its vote record: etcd's
        // advice to remove and re-add such a member applies here too.)
        try FileManager.default.removeItem(atPath: base + "/node3")
        let rejoined = TestMachine()
        nodes[2] = try await start(3, rejoined)
        var caughtUp = false
        for _ in 0..<500 where !caughtUp {
            do { caughtUp = try await nodes[2].read { $0.values.count } == 81 } catch NodeError.noLeader {
                // Not yet in touch with the leader.
            } catch NodeError.timedOut, NodeError.leaderChanged {}
            if !caughtUp { try await Task.sleep(for: .milliseconds(20)) }
        }
        #expect(caughtUp, "node 3 reached the others' state")
        let restored = try await nodes[2].read { $0.restoredFromSnapshot }
        #expect(restored, "by installing a snapshot, not by replaying a log the others no longer have")
        for node in nodes { await node.shutdown() }
        try await group.shutdownGracefully()
    }
}

extension Array {
    func asyncFirst(where predicate: (Element) async throws -> Bool) async rethrows -> Element? {
        for element in self where try await predicate(element) { return element }
        return nil
    }

}

extension KeelNodeTests {
    @Test("calls made from a completion on the node's loop: each command applied once, in order, and each read sees its write")
    func chainedCallbacks() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let base = NSTemporaryDirectory() + "keel-node-chain-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let ports = try await freePorts(3, group: group)
        let nodes = try await (1...3).asyncMap { id in
            // An election timeout of 1–2 s instead of 200–400 ms: the three nodes share one
            // thread, and under a loaded machine's stalls (CI, the whole suite at once) a follower
            // called an election in the middle of the chain, whose later calls then all failed at
            // once with no leader known. Leader changes are other tests' subject.
            var configuration = configuration(UInt64(id), ports: ports, base: base)
            configuration.raft.electionTicks = 50
            return try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group, logger: silentLogger)
        }
        let elected = try await awaitLeader(of: nodes)
        let leader = try #require(elected)
        // Followers know the leader once it has appended its first entry.
        for node in nodes { _ = try await node.read(consistency: .linearizable) { $0.values.count } }
        // Through a follower (its Readys may carry entries and the commit that covers them), and
        // through the leader: every completion makes the next calls from inside the node's work.
        for node in [nodes.first { $0 !== leader }!, leader] {
            let count = 150
            let prefix = "c\(ObjectIdentifier(node).hashValue & 0xffff)"
            let reads = NIOLockedValueBox<[Int: String]>([:])
            let failures = NIOLockedValueBox<[String]>([])
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                @Sendable func step(_ i: Int) {
                    guard i < count else { return continuation.resume() }
                    node.propose(Array("set \(prefix)k\(i) v\(i)".utf8)) { result in
                        if case .failure(let error) = result { failures.withLockedValue { $0.append("propose \(i): \(error)") } }
                        node.read(consistency: .linearizable, { $0.values["\(prefix)k\(i)"] ?? "missing" }, completion: { read in
                            reads.withLockedValue { $0[i] = (try? read.get()) ?? "failed" }
                        })
                        step(i + 1)
                    }
                }
                node.eventLoop.execute { step(0) }
            }
            #expect(failures.withLockedValue { $0 }.isEmpty, "\(failures.withLockedValue { $0 })")
            var served = false
            for _ in 0..<250 where !served {
                served = reads.withLockedValue { $0.count } == count
                if !served { try await Task.sleep(for: .milliseconds(20)) }
            }
            #expect(reads.withLockedValue { $0 } == Dictionary(uniqueKeysWithValues: (0..<count).map { ($0, "v\($0)") }), "each read saw its write")
            for member in nodes {
                var applied: [String] = []
                for _ in 0..<250 {
                    applied = try await member.read(consistency: .local) { $0.applied.filter { $0.hasPrefix("set \(prefix)") } }
                    if applied.count >= count { break }
                    try await Task.sleep(for: .milliseconds(20))
                }
                #expect(applied == (0..<count).map { "set \(prefix)k\($0) v\($0)" }, "every command applied once, in order, on every node")
            }
        }
        for node in nodes { await node.shutdown() }
        try await group.shutdownGracefully()
    }
}

extension Sequence {
    func asyncMap<T>(_ transform: (Element) async throws -> T) async rethrows -> [T] {
        var results: [T] = []
        for element in self { results.append(try await transform(element)) }
        return results
    }
}
