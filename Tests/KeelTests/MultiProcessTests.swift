import Foundation
import NIOCore
import NIOPosix
import Testing

struct NodeStartFailure: Error, CustomStringConvertible {
    let node: Int
    var description: String { "node \(node) exited or was not ready within 60 s" }
}

/// Three `keel-node-harness` processes; every peer link (i to j) goes through its own proxy, so a
/// test can cut any link in either direction.
final class ProcessCluster: @unchecked Sendable {
    // @unchecked Sendable: driven by one test task at a time.
    let base: String
    let group: any EventLoopGroup
    let size: Int
    var ports: [Int] = []
    /// proxies[i][j]: how node i reaches node j.
    var proxies: [[CuttableProxy?]] = []
    var nodes: [NodeProcess?] = []
    var snapshotInterval: Int
    /// Every acknowledged write: key -> value.
    var acknowledged: [String: String] = [:]
    var unknown = 0
    /// Why each unknown write was unknown (the harness's reason, or "timeout").
    var unknownReasons: [String] = []
    var written = 0

    init(size: Int = 3, snapshotInterval: Int = 10_000, group: any EventLoopGroup) {
        base = NSTemporaryDirectory() + "keel-processes-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        self.size = size
        self.snapshotInterval = snapshotInterval
        self.group = group
    }

    func start() async throws {
        ports = try await freePorts(size, group: group)
        proxies = Array(repeating: Array(repeating: nil, count: size), count: size)
        for i in 0..<size {
            for j in 0..<size where i != j {
                let proxy = CuttableProxy(target: ports[j], group: group)
                try await proxy.start()
                proxies[i][j] = proxy
            }
        }
        nodes = Array(repeating: nil, count: size)
        for i in 0..<size { try await startNode(i) }
    }

    func startNode(_ i: Int) async throws {
        var members: [String] = []
        for j in 0..<size { members.append("\(j + 1)=127.0.0.1:\(i == j ? ports[j] : proxies[i][j]!.port)") }
        let node = try NodeProcess(id: UInt64(i + 1), arguments: [
            "--id", "\(i + 1)", "--dir", "\(base)/node\(i + 1)", "--members", members.joined(separator: ","),
            "--tick-ms", "20", "--snapshot-interval", "\(snapshotInterval)",
        ])
        let ready = await node.waitUntilReady()
        nodes[i] = node
        if !ready { throw NodeStartFailure(node: i + 1) }
    }

    /// The index of the node every live node agrees leads, if any.
    func leader() async -> Int? {
        for (i, node) in nodes.enumerated() {
            guard let node, let status = await node.status() else { continue }
            if status["role"] == "leader" { return i }
        }
        return nil
    }

    func waitForLeader(excluding excluded: Int? = nil) async -> Int? {
        for _ in 0..<500 {
            if let leader = await leader(), leader != excluded { return leader }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return nil
    }

    /// Writes `count` new keys, each through the live nodes in turn until one acknowledges it.
    /// A write whose outcome is unknown (timed out, or the leader changed under it) may have
    /// committed; it is put again, as a client would, up to `retries` times: the same key and value,
    /// so a later acknowledgement is the write's own. One never acknowledged counts as unknown.
    func write(_ count: Int, avoiding: Set<Int> = [], retries: Int = 3) async {
        for _ in 0..<count {
            written += 1
            let key = "k\(written)"
            let value = "v\(written)"
            var done = false
            var retried = 0
            for attempt in 0..<300 where !done {
                let candidates = (0..<size).filter { nodes[$0] != nil && !avoiding.contains($0) }
                let reply = await nodes[candidates[attempt % candidates.count]]!.request("put \(key) \(value)", seconds: 5)
                if reply == "ok" {
                    acknowledged[key] = value
                    done = true
                } else if reply.hasPrefix("unknown") || reply == "timeout" {
                    if retried < retries {
                        retried += 1
                        continue
                    }
                    unknown += 1
                    unknownReasons.append(reply)
                    done = true // its outcome stays unknown; move on
                } else {
                    try? await Task.sleep(for: .milliseconds(20))
                }
            }
        }
    }

    /// Waits until every live node reports the same hash at the same applied index; returns it.
    func converge() async -> (applied: String, hash: String)? {
        for _ in 0..<750 {
            var seen: Set<String> = []
            var last: [String] = []
            for node in nodes.compactMap({ $0 }) {
                let reply = await node.request("hash", seconds: 3)
                let parts = reply.split(separator: " ").map(String.init)
                guard parts.count == 4, parts[0] == "hash" else { seen.insert(reply + "\(node.id)"); continue }
                seen.insert(parts[1] + " " + parts[2])
                last = parts
            }
            if seen.count == 1, last.count == 4 { return (last[1], last[2]) }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return nil
    }

    /// Checks that every live node holds every acknowledged write.
    func checkNothingLost() async {
        for node in nodes.compactMap({ $0 }) {
            let reply = await node.request("dump")
            #expect(reply.hasPrefix("dump"), "node \(node.id) answers its dump")
            var held: [String: String] = [:]
            for pair in reply.dropFirst(5).split(separator: ",") {
                let parts = pair.split(separator: "=", maxSplits: 1)
                if parts.count == 2 { held[String(parts[0])] = String(parts[1]) }
            }
            let missing = acknowledged.filter { held[$0.key] != $0.value }
            #expect(missing.isEmpty, "node \(node.id) lost acknowledged writes: \(missing.keys.sorted().prefix(10))")
        }
    }

    func stop() async {
        for node in nodes.compactMap({ $0 }) { await node.stop() }
        for proxy in proxies.joined().compactMap({ $0 }) { await proxy.stop() }
        try? FileManager.default.removeItem(atPath: base)
    }
}

@Suite("Three node processes under SIGKILL, SIGSTOP, wiped data and cut links", .serialized)
struct MultiProcessTests {
    func withCluster(snapshotInterval: Int = 10_000, _ body: (ProcessCluster) async throws -> Void) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let cluster = ProcessCluster(snapshotInterval: snapshotInterval, group: group)
        do {
            try await cluster.start()
            try await body(cluster)
        } catch {
            await cluster.stop()
            throw error
        }
        await cluster.stop()
        try await group.shutdownGracefully()
    }

    @Test("the leader SIGKILLed: another is elected, no acknowledged write is lost, the restarted node converges")
    func leaderKilled() async throws {
        try await withCluster { cluster in
            let first = try #require(await cluster.waitForLeader())
            await cluster.write(30)
            await cluster.nodes[first]!.kill9()
            cluster.nodes[first] = nil
            let second = await cluster.waitForLeader(excluding: first)
            #expect(second != nil && second != first, "a new leader was elected")
            await cluster.write(30)
            try await cluster.startNode(first)
            await cluster.write(10)
            #expect(cluster.acknowledged.count >= 60, "the survivors kept acknowledging writes (\(cluster.acknowledged.count), \(cluster.unknown) unknown: \(cluster.unknownReasons))")
            #expect(await cluster.converge() != nil, "all three reached the same state hash at the same applied index")
            await cluster.checkNothingLost()
        }
    }

    @Test("a follower SIGSTOPped and resumed catches up")
    func followerPaused() async throws {
        try await withCluster { cluster in
            let leader = try #require(await cluster.waitForLeader())
            let follower = (leader + 1) % 3
            await cluster.write(20)
            cluster.nodes[follower]!.signal(SIGSTOP)
            await cluster.write(30, avoiding: [follower])
            cluster.nodes[follower]!.signal(SIGCONT)
            await cluster.write(10)
            #expect(cluster.acknowledged.count == 60, "writes went on without the paused follower (\(cluster.unknown) unknown: \(cluster.unknownReasons))")
            #expect(await cluster.converge() != nil)
            await cluster.checkNothingLost()
        }
    }

    @Test("a node whose data was wiped rejoins from a streamed checkpoint")
    func wipedNodeRejoins() async throws {
        try await withCluster(snapshotInterval: 20) { cluster in
            let leader = try #require(await cluster.waitForLeader())
            let follower = (leader + 1) % 3
            await cluster.write(10)
            await cluster.nodes[follower]!.kill9()
            cluster.nodes[follower] = nil
            try FileManager.default.removeItem(atPath: "\(cluster.base)/node\(follower + 1)")
            await cluster.write(80)
            let compacted = await cluster.nodes[leader]!.status()?["snapshot"].flatMap(Int.init) ?? 0
            #expect(compacted > 10, "the others compacted past what the wiped node had")
            try await cluster.startNode(follower)
            await cluster.write(5)
            let converged = await cluster.converge()
            #expect(converged != nil)
            let rejoined = await cluster.nodes[follower]!.status()?["snapshot"].flatMap(Int.init) ?? 0
            #expect(rejoined > 10, "the rejoined node installed a checkpoint (snapshot \(rejoined))")
            await cluster.checkNothingLost()
        }
    }

    @Test("links to and from the leader cut by a proxy and restored: a new leader serves, the old one converges")
    func linksCut() async throws {
        try await withCluster { cluster in
            let leader = try #require(await cluster.waitForLeader())
            await cluster.write(20)
            for other in 0..<3 where other != leader {
                cluster.proxies[leader][other]!.cut()
                cluster.proxies[other][leader]!.cut()
            }
            let next = await cluster.waitForLeaderAmong(Set(0..<3).subtracting([leader]))
            #expect(next != nil, "the two connected nodes elected a leader")
            await cluster.write(30, avoiding: [leader])
            // One direction first: the old leader hears the others but cannot answer.
            for other in 0..<3 where other != leader { cluster.proxies[other][leader]!.restore() }
            try await Task.sleep(for: .milliseconds(300))
            for other in 0..<3 where other != leader { cluster.proxies[leader][other]!.restore() }
            await cluster.write(10)
            #expect(await cluster.converge() != nil)
            await cluster.checkNothingLost()
        }
    }

    @Test("a sole voter SIGKILLed and restarted (its newest commit index not yet on disk) never answers a direct read without a write it acknowledged")
    func directReadsAfterRestart() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let base = NSTemporaryDirectory() + "keel-direct-restart-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { try? FileManager.default.removeItem(atPath: base) }
        let port = try await freePorts(1, group: group)[0]
        let arguments = ["--id", "1", "--dir", base, "--members", "1=127.0.0.1:\(port)", "--tick-ms", "10"]
        /// Sends `request` every 10 ms until the reply passes `done` (at most 5 s); the last reply.
        func retry(_ node: NodeProcess, _ request: String, until done: (String) -> Bool) async throws -> String {
            var reply = ""
            for _ in 0..<500 {
                reply = await node.request(request)
                if done(reply) { break }
                try await Task.sleep(for: .milliseconds(10))
            }
            return reply
        }
        var written = 0
        // The window is short (from the first commit of the new term to the next Ready): rounds
        // give the watcher many chances (with the bound raised late, 2 runs of 3 caught it at 5 rounds).
        for _ in 0..<12 {
            let node = try NodeProcess(id: 1, arguments: arguments)
            await node.waitUntilReady()
            for _ in 0..<40 {
                #expect(try await retry(node, "put k\(written) v") { $0 == "ok" } == "ok")
                written += 1
            }
            await node.kill9()
            // A thread calls readDirectly without pause from the moment the node is up; the node
            // applies what it had committed, is elected, and commits the rest only then.
            let restarted = try NodeProcess(id: 1, arguments: arguments + ["--watch-direct-reads", "yes"])
            await restarted.waitUntilReady()
            #expect(try await retry(restarted, "get k\(written - 1)") { $0 == "value v" } == "value v")
            // (On a loaded machine the watching thread may not have run yet.)
            let counts = try await retry(restarted, "direct") { reply in
                let counts = reply.split(separator: " ").compactMap { Int($0) }
                return counts.count == 2 && counts[0] > 0
            }.split(separator: " ").compactMap { Int($0) }
            #expect(counts.count == 2 && counts[0] > 0, "direct reads were answered: \(counts)")
            #expect(counts.count == 2 && counts[1] == written, "every direct read saw the \(written) acknowledged writes: \(counts)")
            await restarted.stop()
        }
        try await group.shutdownGracefully()
    }
}

extension ProcessCluster {
    func waitForLeaderAmong(_ candidates: Set<Int>) async -> Int? {
        for _ in 0..<500 {
            for i in candidates {
                if let status = await nodes[i]?.status(), status["role"] == "leader" { return i }
            }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return nil
    }
}
