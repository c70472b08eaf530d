import Foundation
import Keel
import KeelCore
import KeelRaft
import KeelStorage
import NIOCore
import NIOPosix
import Testing

/// Polls `condition` every 20 ms for up to `seconds`; true once it held.
func eventually(seconds: Double = 15, _ condition: () async throws -> Bool) async rethrows -> Bool {
    let deadline = Date().addingTimeInterval(seconds)
    while Date() < deadline {
        if try await condition() { return true }
        try? await Task.sleep(for: .milliseconds(20))
    }
    return try await condition()
}

/// Retries a proposal through the given nodes until one commits it.
@discardableResult
func commit(_ command: String, via nodes: [KeelNode<TestMachine>]) async throws -> [UInt8] {
    for attempt in 0..<500 {
        do {
            return try await nodes[attempt % nodes.count].propose(Array(command.utf8))
        } catch NodeError.noLeader, NodeError.timedOut, NodeError.notLeader, NodeError.leaderChanged {
            try await Task.sleep(for: .milliseconds(20))
        }
    }
    Issue.record("could not commit \(command)")
    return []
}

@Suite("The node's public API: membership at run time, read consistency, checkpoints, errors", .serialized)
struct NodeAPITests {
    func address(_ port: Int) -> PeerAddress { PeerAddress(host: "127.0.0.1", port: port) }

    /// Members 1...count on free loopback ports.
    func freshMembers(_ count: Int, group: any EventLoopGroup) async throws -> [NodeID: PeerAddress] {
        let ports = try await freePorts(count, group: group)
        return Dictionary(uniqueKeysWithValues: (0..<count).map { (NodeID(UInt64($0 + 1)), address(ports[$0])) })
    }

    /// Starts the given members of `members` (each with a fresh TestMachine).
    func start(_ ids: ClosedRange<UInt64>, _ base: String, members: [NodeID: PeerAddress], group: any EventLoopGroup,
               configure: (inout NodeConfiguration) -> Void = { _ in }) async throws -> [KeelNode<TestMachine>] {
        var nodes: [KeelNode<TestMachine>] = []
        for id in ids {
            var configuration = settings(id, base, members: members)
            configure(&configuration)
            nodes.append(try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group, logger: silentLogger))
        }
        return nodes
    }

    func settings(_ id: UInt64, _ base: String, members: [NodeID: PeerAddress], join: Bool = false) -> NodeConfiguration {
        var configuration = NodeConfiguration(node: NodeID(id), dataDirectory: base + "/node\(id)", members: members,
                                              clusterToken: Array("token".utf8))
        configuration.join = join
        configuration.tickMilliseconds = 20
        configuration.log = LogOptions(segmentSize: 1 << 20)
        return configuration
    }

    @Test("routes win over the members' addresses: a node dials its peers through the proxies its routes name")
    func routesWin() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let base = NSTemporaryDirectory() + "keel-routes-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let ports = try await freePorts(3, group: group)
        let members = Dictionary(uniqueKeysWithValues: (1...3).map { (NodeID(UInt64($0)), address(ports[$0 - 1])) })
        let proxies = [CuttableProxy(target: ports[1], group: group), CuttableProxy(target: ports[2], group: group)]
        for proxy in proxies { try await proxy.start() }
        var nodes: [KeelNode<TestMachine>] = []
        for id in 1...3 {
            var configuration = settings(UInt64(id), base, members: members)
            if id == 1 { configuration.routes = [NodeID(2): address(proxies[0].port), NodeID(3): address(proxies[1].port)] }
            nodes.append(try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group, logger: silentLogger))
        }
        _ = try await commit("set routed 1", via: nodes)
        // A follower sends only to the leader: node 1 leads, so that it sends to both peers (it
        // failed about half its runs when another node won the first election).
        let leads = try await eventually(seconds: 10) {
            if try await nodes[0].status().role == .leader { return true }
            for node in nodes.dropFirst() where try await node.status().role == .leader {
                try? await node.transferLeadership(to: NodeID(1))
            }
            return false
        }
        #expect(leads, "node 1 took the leadership")
        let dialed = await eventually(seconds: 10) { proxies.allSatisfy { $0.accepted > 0 } }
        #expect(dialed, "node 1 reached nodes 2 and 3 through its routes")
        // The status still shows the addresses the cluster records.
        #expect(try await nodes[0].status().members.first { $0.id == NodeID(2) }?.address == address(ports[1]))
        for node in nodes { await node.shutdown() }
        for proxy in proxies { await proxy.stop() }
        try await group.shutdownGracefully()
    }

    @Test("a checkpoint is taken once the log has grown by snapshotLogBytes, however few the entries")
    func checkpointByLogBytes() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let base = NSTemporaryDirectory() + "keel-bytes-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let ports = try await freePorts(2, group: group)
        for (trigger, expected) in [(UInt64(256 << 10), true), (0, false)] {
            let id = expected ? UInt64(1) : 2
            var configuration = settings(id, base, members: [NodeID(id): address(ports[Int(id) - 1])])
            configuration.snapshotInterval = 1_000_000
            configuration.snapshotLogBytes = trigger
            let node = try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group, logger: silentLogger)
            var proposed = 0
            while proposed < 100 {
                do {
                    _ = try await node.propose(Array("set k\(proposed) \(String(repeating: "v", count: 4000))".utf8))
                    proposed += 1
                } catch NodeError.noLeader {
                    try await Task.sleep(for: .milliseconds(20))
                }
            }
            var snapshotted = false
            for _ in 0..<100 where !snapshotted {
                snapshotted = try await node.status().snapshotIndex > .zero
                if !snapshotted && expected { try await Task.sleep(for: .milliseconds(20)) }
            }
            #expect(snapshotted == expected, "100 entries of 4 KB with snapshotLogBytes \(trigger)")
            await node.shutdown()
        }
        try await group.shutdownGracefully()
    }

    /// Proposes `count` entries of 4 KB, each to a new key (so the state, and its checkpoints,
    /// grow as the log does), and returns the snapshot indexes seen after each, in order.
    func proposeDistinct(_ node: KeelNode<TestMachine>, from first: Int, count: Int) async throws -> [UInt64] {
        var seen: [UInt64] = []
        var proposed = 0
        while proposed < count {
            do {
                _ = try await node.propose(Array("set k\(first + proposed) \(String(repeating: "v", count: 4000))".utf8))
                proposed += 1
            } catch NodeError.noLeader {
                try await Task.sleep(for: .milliseconds(20))
            }
            let index = try await node.status().snapshotIndex.rawValue
            if index > 0, index != seen.last { seen.append(index) }
        }
        return seen
    }

    @Test("with snapshotLogGrowthPercent, a due checkpoint waits until the log has grown by that share of the last checkpoint")
    func checkpointByLogGrowth() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let base = NSTemporaryDirectory() + "keel-growth-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let ports = try await freePorts(2, group: group)
        var taken: [UInt64: [UInt64]] = [:]
        for (id, percent) in [(UInt64(1), UInt64(100)), (2, 0)] {
            var configuration = settings(id, base, members: [NodeID(id): address(ports[Int(id) - 1])])
            configuration.snapshotInterval = 1_000_000
            configuration.snapshotLogBytes = 64 << 10
            configuration.snapshotLogGrowthPercent = percent
            let node = try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group, logger: silentLogger)
            taken[percent] = try await proposeDistinct(node, from: 0, count: 300)
            await node.shutdown()
        }
        let growing = taken[100]!, fixed = taken[0]!
        // 64 KB triggers the first; each later one waits for as much log as the last checkpoint
        // holds (about 16, 32, 64, 128, 256 entries; polling may miss one, which only widens a gap).
        #expect(growing.count >= 3, "checkpoints with growth 100: \(growing)")
        for (a, b) in zip(growing, growing.dropFirst()) {
            #expect(b - a >= a / 2, "checkpoint at \(b) came \(b - a) entries after one holding \(a): \(growing)")
        }
        // Without the growth condition, one every 64 KB (about 16 entries).
        #expect(fixed.count > growing.count, "growth 0: \(fixed); growth 100: \(growing)")
        #expect(zip(fixed, fixed.dropFirst()).contains { a, b in b - a < a / 2 }, "growth 0: \(fixed)")
        try await group.shutdownGracefully()
    }

    @Test("the log a node holds after its checkpoint when it starts counts toward snapshotLogBytes")
    func checkpointCountsLogFromBeforeRestart() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let base = NSTemporaryDirectory() + "keel-held-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let ports = try await freePorts(1, group: group)
        var configuration = settings(1, base, members: [NodeID(1): address(ports[0])])
        configuration.snapshotInterval = 1_000_000
        configuration.snapshotLogBytes = 256 << 10
        var node = try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group, logger: silentLogger)
        let before = try await proposeDistinct(node, from: 0, count: 50)
        #expect(before.isEmpty, "200 KB of log is under the 256 KB trigger: \(before)")
        await node.shutdown()
        // 200 KB held, 80 KB more written after the restart: past 256 KB since the (initial) checkpoint.
        node = try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group, logger: silentLogger)
        _ = try await proposeDistinct(node, from: 50, count: 20)
        let snapshotted = try await eventually { try await node.status().snapshotIndex > .zero }
        #expect(snapshotted, "280 KB of log since the last checkpoint, 200 KB of it from before the restart")
        await node.shutdown()

        // Only the log after the checkpoint counts: 200 KB, a checkpoint, 40 KB, a restart, 80 KB
        // more is 120 KB since it (the log before it is still held: one checkpoint compacts nothing).
        configuration.dataDirectory = base + "/node2"
        node = try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group, logger: silentLogger)
        _ = try await proposeDistinct(node, from: 0, count: 50)
        let checkpoint = try await node.checkpoint()
        _ = try await proposeDistinct(node, from: 50, count: 10)
        await node.shutdown()
        node = try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group, logger: silentLogger)
        let after = try await proposeDistinct(node, from: 60, count: 20)
        try await Task.sleep(for: .milliseconds(200))
        let final = try await node.status().snapshotIndex
        #expect(after == [checkpoint.rawValue] && final == checkpoint,
                "120 KB since the checkpoint at \(checkpoint) is under the 256 KB trigger: \(after)")
        await node.shutdown()
        try await group.shutdownGracefully()
    }

    @Test("a single node grows to three members at run time, then shrinks, and hands over leadership")
    func growAndShrink() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let base = NSTemporaryDirectory() + "keel-grow-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let ports = try await freePorts(3, group: group)
        let first = TestMachine()
        let one = try await KeelNode.start(
            configuration: NodeConfiguration(node: NodeID(1), dataDirectory: base + "/node1", listen: address(ports[0]),
                                             clusterToken: Array("token".utf8)).tuned(),
            machine: first, group: group, logger: silentLogger)
        for i in 0..<10 { try await commit("set k\(i) v\(i)", via: [one]) }
        #expect(try await one.status().members.map(\.id) == [NodeID(1)])

        // Node 2 joins as a learner and is promoted once it has caught up.
        try await one.addLearner(NodeID(2), address: address(ports[1]))
        let second = TestMachine()
        let two = try await KeelNode.start(configuration: settings(2, base, members: [NodeID(2): address(ports[1]), NodeID(1): address(ports[0])], join: true),
                                           machine: second, group: group, logger: silentLogger)
        let promoted = try await eventually { try await one.status().members.first { $0.id == NodeID(2) }?.isVoter == true }
        #expect(promoted, "the learner was promoted automatically")
        #expect(try await two.read(consistency: .linearizable) { $0.values.count } == 10, "it caught up from the log, founding entry included")

        // Node 3 joins as a voter directly, and takes writes.
        try await one.addMember(NodeID(3), address: address(ports[2]))
        let third = TestMachine()
        let three = try await KeelNode.start(configuration: settings(3, base, members: [NodeID(3): address(ports[2]), NodeID(1): address(ports[0])], join: true),
                                             machine: third, group: group, logger: silentLogger)
        try await commit("set via three", via: [three])
        let status = try await one.status()
        #expect(status.members.map(\.id) == [NodeID(1), NodeID(2), NodeID(3)])
        #expect(status.members.allSatisfy { $0.isVoter && $0.address != nil })
        #expect(status.members.allSatisfy { ($0.matchIndex ?? .zero) > .zero }, "the leader reports every member's match index")
        #expect(try await two.read { $0.values["via"] } == "three", "a write through the new member is seen through another")

        // Leadership moves to node 2; node 1 then removes node 3, which stops serving.
        try await one.transferLeadership(to: NodeID(2))
        #expect(try await two.status().role == .leader)
        // A follower takes a membership change too (forwarded to the leader).
        #expect(try await one.status().role == .follower)
        try await one.removeMember(NodeID(3))
        await #expect(throws: NodeError.invalidArgument("node 3 is not a member")) { try await two.removeMember(NodeID(3)) }
        let gone = await eventually {
            do { _ = try await three.propose(Array("set late 1".utf8)); return false } catch { return (error as? NodeError) == .notMember }
        }
        #expect(gone, "a removed member answers notMember")
        #expect(try await two.status().members.map(\.id) == [NodeID(1), NodeID(2)])
        try await commit("set after removal", via: [one, two])

        // A checkpoint on demand covers what was applied.
        let applied = try await two.status().appliedIndex
        let covered = try await two.checkpoint()
        #expect(covered >= applied)
        #expect(try await two.status().snapshotIndex == covered)

        for node in [one, two, three] { await node.shutdown() }
        #expect(first.values == second.values)
        await #expect(throws: NodeError.shuttingDown) { try await one.propose(Array("set x y".utf8)) }
        try await group.shutdownGracefully()
    }

    @Test("reads at each consistency: linearizable and lease through a follower see acknowledged writes; local is served at once")
    func readConsistency() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let base = NSTemporaryDirectory() + "keel-reads-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let members = try await freshMembers(3, group: group)
        let nodes = try await start(1...3, base, members: members, group: group)
        for i in 0..<20 {
            try await commit("set k\(i) v\(i)", via: nodes)
            let follower = try await nodes.asyncFirst { try await $0.status().role == .follower } ?? nodes[0]
            // Each read starts after the write was acknowledged: it must see it.
            var seen: String?
            for _ in 0..<100 {
                do {
                    seen = try await follower.read(consistency: i.isMultiple(of: 2) ? .linearizable : .lease) { $0.values["k\(i)"] }
                    break
                } catch NodeError.noLeader, NodeError.timedOut, NodeError.leaderChanged { try await Task.sleep(for: .milliseconds(20)) }
            }
            #expect(seen == "v\(i)")
        }
        let local = try await nodes[0].read(consistency: .local) { $0.values.count }
        #expect(local <= 20)
        #expect(try await eventually { try await nodes[0].read(consistency: .local) { $0.values.count } == 20 }, "local reads catch up")
        for node in nodes { await node.shutdown() }
        try await group.shutdownGracefully()
    }

    @Test("direct reads: a sole voter answers on the caller's thread with every acknowledged write; members of a three-voter cluster and a stopped node never do")
    func directReads() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let base = NSTemporaryDirectory() + "keel-direct-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let single = try await start(1...1, base + "/single", members: try await freshMembers(1, group: group), group: group)[0]
        for i in 0..<50 {
            try await commit("set k\(i) v\(i)", via: [single])
            // Acknowledged, so applied: once the node has applied all it committed it answers directly, with it.
            var seen: String??
            #expect(try await eventually { seen = single.readDirectly { $0.values["k\(i)"] }; return seen != nil })
            #expect(seen == .some("v\(i)"))
        }
        await single.shutdown()
        #expect(single.readDirectly { $0.values.count } == nil, "a node that shut down does not answer")

        let nodes = try await start(1...3, base + "/three", members: try await freshMembers(3, group: group), group: group)
        for i in 0..<20 {
            try await commit("set k\(i) v\(i)", via: nodes)
            for node in nodes { #expect(node.readDirectly { $0.values.count } == nil, "with three voters a read needs the read index") }
        }
        for node in nodes { await node.shutdown() }
        try await group.shutdownGracefully()
    }

    @Test("settings outside their range are refused with a clear error")
    func invalidSettings() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let base = NSTemporaryDirectory() + "keel-settings-\(getpid())"
        defer { try? FileManager.default.removeItem(atPath: base) }
        var configuration = settings(1, base, members: [NodeID(1): address(1)])
        configuration.log.fsyncPolicy = .never
        await #expect(throws: NodeError.self) { _ = try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group) }
        configuration = settings(1, base, members: [NodeID(2): address(1)])
        await #expect(throws: NodeError.invalidArgument("members must include this node's own address (node 1)")) {
            _ = try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group)
        }
        configuration = settings(1, base, members: [NodeID(1): address(1)])
        configuration.log.fsyncPolicy = .everysec
        configuration.allowUnsyncedLog = true
        configuration.syncOnLoop = true
        await #expect(throws: NodeError.invalidArgument("syncOnLoop needs the log's fsync `always`")) {
            _ = try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group)
        }
        configuration = settings(1, base, members: [NodeID(1): address(1)])
        configuration.clusterToken = []
        await #expect(throws: NodeError.self) { _ = try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group) }
        configuration = settings(1, base, members: [NodeID(1): address(1)])
        configuration.raft.checkQuorum = false
        configuration.raft.readConsistency = .lease
        await #expect(throws: NodeError.invalidArgument("lease reads need check-quorum")) {
            _ = try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group)
        }
        configuration = settings(1, base, members: [NodeID(1): address(1)])
        configuration.applyOffLoopBytes = -1
        await #expect(throws: NodeError.invalidArgument("applyOffLoopBytes must not be negative")) {
            _ = try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group)
        }
        try await group.shutdownGracefully()
    }
}

extension NodeConfiguration {
    func tuned() -> NodeConfiguration {
        var copy = self
        copy.tickMilliseconds = 20
        copy.log = LogOptions(segmentSize: 1 << 20)
        return copy
    }
}

extension NodeAPITests {
    @Test("the founding membership is in the log: a restart with other members configured does not change it")
    func foundingMembershipPersists() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let base = NSTemporaryDirectory() + "keel-founding-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let ports = try await freePorts(3, group: group)
        var node = try await KeelNode.start(configuration: settings(1, base, members: [NodeID(1): address(ports[0])]), machine: TestMachine(),
                                            group: group, logger: silentLogger)
        try await commit("set a 1", via: [node])
        await node.shutdown()
        let more = [NodeID(1): address(ports[0]), NodeID(2): address(ports[1]), NodeID(3): address(ports[2])]
        node = try await KeelNode.start(configuration: settings(1, base, members: more), machine: TestMachine(), group: group, logger: silentLogger)
        #expect(try await node.status().members.map(\.id) == [NodeID(1)], "still the one founding voter")
        try await commit("set b 2", via: [node])
        #expect(try await node.read { $0.values.count } == 2, "and it still commits alone")
        await node.shutdown()
        try await group.shutdownGracefully()
    }

    @Test("a node whose fsync fails stops taking part and says why (the log's writer thread syncing, or the loop)", arguments: [false, true])
    func fsyncFailureStops(syncOnLoop: Bool) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let ports = try await freePorts(1, group: group)
        let fileSystem = SimulatedFileSystem(seed: 7)
        var configuration = settings(1, "/keel", members: [NodeID(1): address(ports[0])])
        configuration.syncOnLoop = syncOnLoop
        let node = try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group, logger: silentLogger, fileSystem: fileSystem)
        try await commit("set a 1", via: [node])
        fileSystem.failNextSyncs(1)
        await #expect(throws: NodeError.self) { _ = try await node.propose(Array("set b 2".utf8)) }
        let status = try await node.status()
        #expect(status.stopped?.contains("fsync") == true || status.stopped?.contains("sync") == true, "it says why: \(status.stopped ?? "nothing")")
        do {
            _ = try await node.propose(Array("set c 3".utf8))
            Issue.record("a stopped node took a proposal")
        } catch let error as NodeError {
            guard case .storageFailed = error else { Issue.record("expected storageFailed, got \(error)"); return }
        }
        await #expect(throws: NodeError.self) { _ = try await node.read { $0.values.count } }
        await node.shutdown()
        try await group.shutdownGracefully()
    }

    @Test("a batch of committed commands is announced to the machine (willApply) and then applied exactly as announced, in order (the log's writer thread syncing, or the loop)",
          arguments: [false, true])
    func willApplyAnnouncesBatches(syncOnLoop: Bool) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let base = NSTemporaryDirectory() + "keel-announce-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let members = try await freshMembers(1, group: group)
        let node = try await start(1...1, base, members: members, group: group) { $0.syncOnLoop = syncOnLoop }[0]
        try await commit("set warm 0", via: [node])
        // Many proposals at once: they are written, committed and applied in batches.
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            for i in 0..<400 { tasks.addTask { _ = try await node.propose(Array("append k\(i % 7) \(i)".utf8)) } }
            try await tasks.waitForAll()
        }
        let (announced, unannounced, pending, applied) = try await node.read(consistency: .local) {
            ($0.announcedCount, $0.appliedUnannounced, $0.announced.count, $0.applied.count)
        }
        #expect(applied == 401)
        #expect(announced > 0, "batches were announced")
        #expect(unannounced == 0 && pending == 0, "what was announced was applied next, in order")
        await node.shutdown()
        try await group.shutdownGracefully()
    }

    @Test("a proposal made from a task, and one made from a task that task queued, share one write: the node takes its Ready behind the tasks queued in the same turn (the writer thread syncing, or the loop)",
          arguments: [false, true])
    func proposalsOfOneTurnShareAWrite(syncOnLoop: Bool) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let base = NSTemporaryDirectory() + "keel-one-turn-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let members = try await freshMembers(1, group: group)
        let node = try await start(1...1, base, members: members, group: group) { $0.syncOnLoop = syncOnLoop }[0]
        try await commit("set warm 0", via: [node])
        // As keel serve does: a connection's pipelined writes proposed while the loop reads, and
        // the turn's single writes proposed from a task the reads queued. (Three times: a write
        // still in flight when the first task runs, the tail of the one before, holds the first
        // proposal until it is done, and the second may miss it; an idle node never splits them.)
        for attempt in 0..<3 {
            try await Task.sleep(for: .milliseconds(20))
            try await node.eventLoop.submit {
                node.propose(Array("set a\(attempt) 1".utf8)) { _ in }
                node.eventLoop.execute { node.propose(Array("set b\(attempt) 2".utf8)) { _ in } }
            }.get()
            #expect(try await eventually { try await node.read(consistency: .local) { $0.values["b\(attempt)"] } == "2" })
        }
        let batches = try await node.read(consistency: .local) { $0.announcedBatches }
        let together = (0..<3).filter { attempt in batches.contains { $0 == ["set a\(attempt) 1", "set b\(attempt) 2"] } }
        #expect(!together.isEmpty, "both of a pair were committed and applied as one batch: \(batches)")
        await node.shutdown()
        try await group.shutdownGracefully()
    }

    @Test("a leader whose checkpoint rotted on disk writes a fresh one instead of sending it; the follower catches up")
    func damagedLeaderCheckpoint() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let base = NSTemporaryDirectory() + "keel-bad-checkpoint-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let members = try await freshMembers(3, group: group)
        let nodes = try await start(1...3, base, members: members, group: group)
        try await commit("set first 1", via: nodes)
        let leader = try #require(await nodes.asyncFirst { try await $0.status().role == .leader })
        let laggard = try #require(await nodes.asyncFirst { try await $0.status().role != .leader })
        let laggardID = try await laggard.status().id
        await laggard.shutdown()
        for i in 0..<20 { try await commit("set k\(i) v\(i)", via: [leader]) }
        let checkpoint = try await leader.checkpoint()
        // Damage the leader's only checkpoint file on disk.
        let directory = "\(base)/node\(try await leader.status().id.rawValue)/checkpoints"
        let files = try FileManager.default.contentsOfDirectory(atPath: directory).filter { $0.hasSuffix(".ckpt") }
        #expect(files.count == 1 && checkpoint > .zero)
        let file = try #require(files.first)
        let handle = try #require(FileHandle(forUpdatingAtPath: "\(directory)/\(file)"))
        try handle.seek(toOffset: 40)
        let byte = try #require(try handle.read(upToCount: 1)?.first)
        try handle.seek(toOffset: 40)
        handle.write(Data([byte ^ 0xff]))
        try handle.close()
        try FileManager.default.removeItem(atPath: "\(base)/node\(laggardID.rawValue)")
        let restarted = try await KeelNode.start(configuration: settings(laggardID.rawValue, base, members: members), machine: TestMachine(),
                                                 group: group, logger: silentLogger)
        let caughtUp = try await eventually { try await restarted.read(consistency: .local) { $0.values.count } == 21 }
        #expect(caughtUp, "the node caught up from the leader's fresh checkpoint")
        #expect(try await restarted.status().rejectedSnapshots == 0, "no damaged bytes were sent")
        for node in nodes where node !== laggard { await node.shutdown() }
        await restarted.shutdown()
        try await group.shutdownGracefully()
    }

    @Test("a received snapshot that does not verify is refused, the core restarts, the transfer begins again; the node does not stop")
    func receivedSnapshotRefused() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let base = NSTemporaryDirectory() + "keel-refused-snapshot-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let members = try await freshMembers(3, group: group)
        let nodes = try await start(1...2, base, members: members, group: group)
        for i in 0..<20 { try await commit("set k\(i) v\(i)", via: nodes) }
        let leader = try #require(await nodes.asyncFirst { try await $0.status().role == .leader })
        _ = try await leader.checkpoint()
        // Node 3 starts empty on a disk that flips a bit whenever the received file is read back.
        let disk = SimulatedFileSystem(seed: 3)
        disk.flipBitOnRead(path: "/node3/checkpoints/incoming.ckpt.tmp", offset: 40)
        let third = try await KeelNode.start(configuration: settings(3, "", members: members), machine: TestMachine(), group: group,
                                             logger: silentLogger, fileSystem: disk)
        let refused = try await eventually { try await third.status().rejectedSnapshots >= 2 }
        #expect(refused, "the damaged transfer was refused, and refused again when it was sent again")
        #expect(try await third.status().stopped == nil)
        #expect(try await third.read(consistency: .local) { $0.values.count } == 0, "nothing from it was installed")
        disk.clearReadFlips()
        let caughtUp = try await eventually { try await third.read(consistency: .local) { $0.values.count } == 20 }
        #expect(caughtUp, "the next transfer verified and installed")
        for node in nodes + [third] { await node.shutdown() }
        try await group.shutdownGracefully()
    }
}

extension NodeAPITests {
    @Test("a write waiting on a leader that died is answered leaderChanged as soon as the follower gives up on it, not at the timeout")
    func leaderChangedAnswersEarly() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let base = NSTemporaryDirectory() + "keel-leader-changed-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let members = try await freshMembers(3, group: group)
        let nodes = try await start(1...3, base, members: members, group: group) { $0.requestTimeoutMilliseconds = 60_000 }
        try await commit("set a 1", via: nodes)
        let leader = try #require(await nodes.asyncFirst { try await $0.status().role == .leader })
        let follower = try #require(await nodes.asyncFirst { try await $0.status().role == .follower })
        await leader.shutdown()
        do {
            _ = try await follower.propose(Array("set b 2".utf8))
        } catch let error as NodeError {
            // Forwarded to a leader that is gone: the follower answers when it stops following it.
            // (The 60 s timeout would have answered timedOut.)
            #expect(error == .leaderChanged || error == .noLeader, "got \(error)")
        }
        for node in nodes where node !== leader { await node.shutdown() }
        try await group.shutdownGracefully()
    }
}

extension NodeAPITests {
    @Test("a full disk refuses writes with noSpace, keeps what was acknowledged and serves reads, and takes writes again once there is room (the log's writer thread writing, or the loop)",
          arguments: [false, true])
    func fullDisk(syncOnLoop: Bool) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let ports = try await freePorts(1, group: group)
        let disk = SimulatedFileSystem(seed: 11)
        var configuration = settings(1, "/full", members: [NodeID(1): address(ports[0])])
        configuration.log = LogOptions(segmentSize: 16 << 10)
        configuration.syncOnLoop = syncOnLoop
        let node = try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group, logger: silentLogger, fileSystem: disk)
        try await commit("set first 1", via: [node])
        disk.setCapacity(disk.usedBytes + (4 << 10))
        var acknowledged: [String] = []
        var refused = false
        let filler = String(repeating: "x", count: 1000)
        for i in 0..<200 where !refused {
            do {
                _ = try await node.propose(Array("set k\(i) \(filler)".utf8))
                acknowledged.append("k\(i)")
            } catch NodeError.noSpace {
                refused = true
            }
        }
        #expect(refused, "the disk filled up and a write was refused with noSpace")
        #expect(try await node.status().stopped == nil, "the node did not stop")
        let held = try await node.read(consistency: .local) { Set($0.values.keys) }
        #expect(held.isSuperset(of: acknowledged + ["first"]), "every acknowledged write is still there")
        // Room again: writes are taken again (after an election, if the node gave up leading).
        disk.setCapacity(nil)
        let resumed = await eventually {
            do {
                _ = try await node.propose(Array("set after room".utf8))
                return true
            } catch { return false }
        }
        #expect(resumed)
        #expect(try await node.read { $0.values["after"] } == "room")
        await node.shutdown()
        try await group.shutdownGracefully()
    }

    /// Three nodes, each on a simulated disk of its own (16 KiB log segments, so a large write
    /// needs a new segment), with one write committed; the disks, the nodes and the position of
    /// a node in `role` once there is a leader.
    func fullDiskCluster(_ base: String, seed: UInt64, role: Role, group: any EventLoopGroup,
                         adjust: (inout NodeConfiguration) -> Void = { _ in }) async throws
        -> (disks: [SimulatedFileSystem], nodes: [KeelNode<TestMachine>], position: Int) {
        let ports = try await freePorts(3, group: group)
        let members = Dictionary(uniqueKeysWithValues: (1...3).map { (NodeID(UInt64($0)), address(ports[$0 - 1])) })
        let disks = (1...3).map { SimulatedFileSystem(seed: seed + UInt64($0)) }
        var nodes: [KeelNode<TestMachine>] = []
        for id in 1...3 {
            var configuration = settings(UInt64(id), base, members: members)
            configuration.log = LogOptions(segmentSize: 16 << 10)
            adjust(&configuration)
            nodes.append(try await KeelNode.start(configuration: configuration, machine: TestMachine(), group: group, logger: silentLogger,
                                                  fileSystem: disks[id - 1]))
        }
        _ = try await commit("set first 1", via: nodes)
        for _ in 0..<250 {
            var roles: [Role] = []
            for node in nodes { roles.append(try await node.status().role) }
            if roles.contains(.leader), let position = roles.firstIndex(of: role) { return (disks, nodes, position) }
            try await Task.sleep(for: .milliseconds(20))
        }
        Issue.record("no node became \(role)")
        throw NodeError.noLeader
    }

    @Test("a leader's full disk: the write that failed (its appends already sent) and an earlier one still waiting for followers are 'interrupted' (they may commit)")
    func fullDiskInterrupts() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        // checkQuorum off: the leader keeps leading once its followers are gone.
        let (disks, nodes, position) = try await fullDiskCluster("/interrupt", seed: 20, role: .leader, group: group) { $0.raft.checkQuorum = false }
        let leader = nodes[position]
        for (other, node) in nodes.enumerated() where other != position { await node.shutdown() }
        // Written on the leader's disk, never committed (no follower answers).
        let waiting = Task { () -> NodeError? in
            do {
                _ = try await leader.propose(Array("set waiting 1".utf8))
                return nil
            } catch let error as NodeError {
                return error
            }
        }
        let written = try await eventually(seconds: 5) {
            let status = try await leader.status()
            return status.lastIndex > status.commitIndex
        }
        #expect(written, "the waiting write reached the leader's log")
        try await Task.sleep(for: .milliseconds(50))
        // The next write needs a new segment, and the disk has no room for one.
        disks[position].setCapacity(disks[position].usedBytes + 1024)
        var failed: NodeError?
        do { _ = try await leader.propose(Array("set big \(String(repeating: "x", count: 20_000))".utf8)) } catch let error as NodeError { failed = error }
        // Sent to the followers' addresses before the write failed: not refused (nobody can say
        // the followers did not take it). A sole voter's failed write is refused (the test above).
        if case .interrupted = failed {} else { Issue.record("the write that hit the full disk: \(String(describing: failed))") }
        let earlier = try await waiting.value
        if case .interrupted = earlier {} else { Issue.record("the earlier write, durable and uncommitted: \(String(describing: earlier))") }
        await leader.shutdown()
        try await group.shutdownGracefully()
    }

    @Test("a follower's full disk: a write it forwarded, whose entry the leader sent back, is 'interrupted', not refused, and commits")
    func followerFullDisk() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let (disks, nodes, position) = try await fullDiskCluster("/follower-full", seed: 40, role: .follower, group: group)
        // The entry needs a new segment on this follower, which has no room; the others have.
        disks[position].setCapacity(disks[position].usedBytes + 1024)
        let big = String(repeating: "y", count: 20_000)
        var failed: NodeError?
        do { _ = try await nodes[position].propose(Array("set big \(big)".utf8)) } catch let error as NodeError { failed = error }
        if case .interrupted = failed {} else { Issue.record("the write the full follower forwarded: \(String(describing: failed))") }
        let others = nodes.indices.filter { $0 != position }.map { nodes[$0] }
        let committed = try await eventually(seconds: 20) {
            for node in others where try await node.read(consistency: .local, { $0.values["big"] }) != big { return false }
            return true
        }
        #expect(committed, "the leader and the other follower committed it")
        for node in nodes { await node.shutdown() }
        try await group.shutdownGracefully()
    }

    @Test("a leader's full disk after it sent the write's appends: the write is 'interrupted', not refused, and the next leader commits it")
    func fullDiskAfterAppendsSent() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let (disks, nodes, position) = try await fullDiskCluster("/sent", seed: 30, role: .leader, group: group)
        // The write needs a new segment on the leader, which has no room; its followers have.
        disks[position].setCapacity(disks[position].usedBytes + 1024)
        let big = String(repeating: "x", count: 20_000)
        var failed: NodeError?
        do { _ = try await nodes[position].propose(Array("set big \(big)".utf8)) } catch let error as NodeError { failed = error }
        if case .interrupted = failed {} else { Issue.record("the write whose appends went out: \(String(describing: failed))") }
        // It was not refused: the followers hold it, and the one elected next commits it.
        let followers = nodes.indices.filter { $0 != position }.map { nodes[$0] }
        let committed = try await eventually(seconds: 20) {
            for follower in followers where try await follower.read(consistency: .local, { $0.values["big"] }) != big { return false }
            return true
        }
        #expect(committed, "the write the full-disk leader sent out was committed by the next leader")
        for node in nodes { await node.shutdown() }
        try await group.shutdownGracefully()
    }
}

extension NodeAPITests {
    @Test("a leader applies large batches on its apply thread: every caller gets its own result, reads see every acknowledged write, checkpoints taken meanwhile cover exactly what they say (a restart applies nothing twice)")
    func applyOffLoop() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let base = NSTemporaryDirectory() + "keel-offloop-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let members = try await freshMembers(1, group: group)
        let configure: (inout NodeConfiguration) -> Void = {
            $0.applyOffLoopBytes = 1 // every batch a leader commits
            $0.snapshotInterval = 40 // checkpoints come due while batches are applied off the loop
        }
        let node = try await start(1...1, base, members: members, group: group, configure: configure)[0]
        // Slow commands: the loop handles the next Readies (and checkpoints that come due) while
        // a batch is still being applied.
        _ = try await node.inspect { machine, _ in machine.applyDelay = 300 }.get()
        let writers = 8, appends = 60
        try await withThrowingTaskGroup(of: Void.self) { tasks in
            for writer in 0..<writers {
                tasks.addTask {
                    var expected = ""
                    for i in 0..<appends {
                        // Each append returns the key's value after it: exactly this writer's appends so far.
                        expected += "\(i),"
                        let result = try await commit("append w\(writer) \(i),", via: [node])
                        #expect(String(decoding: result, as: UTF8.self) == expected, "writer \(writer), append \(i)")
                        // Acknowledged, so a linearizable read sees it (and a direct read, when it answers).
                        let seen = try await node.read { $0.values["w\(writer)"] }
                        #expect(seen == expected)
                        if let direct = node.readDirectly({ $0.values["w\(writer)"] }) { #expect(direct?.hasPrefix(expected) == true) }
                    }
                }
            }
            try await tasks.waitForAll()
        }
        let (offLoop, state, applied) = try await node.inspect { machine, index in (machine.appliedOffLoop, machine.values, index) }.get()
        #expect(offLoop > 0, "batches were applied off the loop")
        #expect(applied == (try await node.status()).appliedIndex)
        #expect(try await eventually { try await node.status().snapshotIndex > .zero }, "checkpoints were taken meanwhile")
        await node.shutdown()

        // A restart recovers the newest checkpoint and replays the log after it: with a
        // checkpoint ahead of or behind its index, an append would be missing or doubled.
        let again = try await start(1...1, base, members: members, group: group, configure: configure)[0]
        let expectedState = Dictionary(uniqueKeysWithValues: (0..<writers).map { writer in
            ("w\(writer)", (0..<appends).map { "\($0)," }.joined())
        })
        #expect(state == expectedState)
        #expect(try await eventually { try await again.read(consistency: .local) { $0.values } == expectedState })
        await again.shutdown()
        try await group.shutdownGracefully()
    }
}
