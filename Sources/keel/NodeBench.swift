// `keel bench node` and `keel bench failover`: the node runtime's throughput and latency over
// loopback TCP with fsync `always`, and the time from a leader's SIGKILL to the next commit.

import ArgumentParser
import Foundation
import Keel
import KeelCore
import KeelRaft
import KeelStorage
import Logging
import NIOCore
import NIOPosix

/// A replicated state machine that only counts.
final class CountingReplica: StateMachine, @unchecked Sendable {
    // @unchecked Sendable: the node calls it one call at a time (its loop or its apply thread).
    var count: UInt64 = 0
    struct Snapshot: CheckpointSource {
        let count: UInt64
        func writeCheckpoint(to sink: inout CheckpointSink) throws(StorageError) { try sink.write(count) }
    }
    func apply(_ command: [UInt8]) -> [UInt8] {
        count += 1
        return []
    }
    func snapshot() -> Snapshot { Snapshot(count: count) }
    func restore(from bytes: [UInt8]) throws {
        var reader = ByteReader(bytes)
        count = try reader.readUInt64()
    }
}

/// Free TCP ports on 127.0.0.1 (bound, then released).
func freeLoopbackPorts(_ count: Int, group: any EventLoopGroup) async throws -> [Int] {
    var channels: [any Channel] = []
    for _ in 0..<count { channels.append(try await ServerBootstrap(group: group).bind(host: "127.0.0.1", port: 0).get()) }
    let ports = channels.map { $0.localAddress!.port! }
    for channel in channels { try await channel.close() }
    return ports
}

struct NodeBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "node",
        abstract: "Committed proposals/s and latency for 1 and 3 nodes on loopback, fsync always, beside the disk's fdatasync/s.")

    @Option(help: "A directory on the disk to measure.") var directory = "./keel-bench"
    @Option(help: "Seconds per measurement.") var seconds: Double = 5
    @Option(help: "Command bytes.") var size = 100
    @Option(help: "Cluster sizes, comma-separated.") var nodes = "1,3"
    @Option(help: "Concurrent proposer counts, comma-separated.") var proposers = "1,16,128"

    func validate() throws {
        try require(seconds > 0 && seconds <= 3600, "--seconds must be between 0 and 3600")
        try require((0...(1 << 20)).contains(size), "--size must be between 0 and 1048576 bytes")
        let sizes = nodes.split(separator: ",").map { Int($0) }
        try require(!sizes.isEmpty && sizes.allSatisfy { $0 != nil && (1...7).contains($0!) }, "--nodes takes cluster sizes from 1 to 7, comma-separated")
        let counts = proposers.split(separator: ",").map { Int($0) }
        try require(!counts.isEmpty && counts.allSatisfy { $0 != nil && (1...4096).contains($0!) }, "--proposers takes counts from 1 to 4096, comma-separated")
    }

    func run() async throws {
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let syncs = measureFdatasync(directory: directory, seconds: min(seconds, 3))
        print(String(format: "disk: %.0f fdatasync/s on one thread", syncs))
        print("nodes  proposers  commits/s  p50 ms  p99 ms")
        let group = MultiThreadedEventLoopGroup(numberOfThreads: System.coreCount)
        for size in nodes.split(separator: ",").compactMap({ Int($0) }) {
            for count in proposers.split(separator: ",").compactMap({ Int($0) }) {
                let (rate, latencies) = try await measure(nodes: size, proposers: count, group: group)
                print(String(format: "%5d  %9d  %9.0f  %6.2f  %6.2f", size, count, rate, percentile(latencies, 0.5), percentile(latencies, 0.99)))
            }
        }
        try await group.shutdownGracefully()
    }

    func measure(nodes size: Int, proposers count: Int, group: any EventLoopGroup) async throws -> (Double, [Double]) {
        let base = freshDirectory(directory, "node-\(size)-\(count)")
        let ports = try await freeLoopbackPorts(size, group: group)
        var members: [NodeID: PeerAddress] = [:]
        for (i, port) in ports.enumerated() { members[NodeID(UInt64(i + 1))] = PeerAddress(host: "127.0.0.1", port: port) }
        var cluster: [KeelNode<CountingReplica>] = []
        for i in 1...size {
            var configuration = NodeConfiguration(node: NodeID(UInt64(i)), dataDirectory: "\(base)/node\(i)", members: members,
                                                  clusterToken: Array("bench".utf8))
            configuration.snapshotInterval = 1_000_000
            cluster.append(try await KeelNode.start(configuration: configuration, machine: CountingReplica(), group: group, logger: silent))
        }
        var leader: KeelNode<CountingReplica>?
        while leader == nil {
            for node in cluster where try await node.status().role == .leader { leader = node }
            if leader == nil { try await Task.sleep(for: .milliseconds(20)) }
        }
        let target = leader!
        let payload = [UInt8](repeating: 0x61, count: self.size)
        _ = try await target.propose(payload)
        let (elapsed, latencies) = try await measureConcurrently(count, seconds: seconds) { _ = try await target.propose(payload) }
        for node in cluster { await node.shutdown() }
        try? FileManager.default.removeItem(atPath: base)
        return (Double(latencies.count) / elapsed, latencies)
    }
}

/// A `keel-node-harness` process driven one request at a time.
final class HarnessProcess {
    let process = Process()
    let input = Pipe()
    let output = Pipe()
    private var buffer = Data()
    private var next = 0

    init(executable: String, arguments: [String]) throws {
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        process.standardInput = input
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        try process.run()
        _ = readLine() // "ready"
    }

    func readLine() -> String? {
        while true {
            if let newline = buffer.firstIndex(of: 10) {
                let line = String(decoding: buffer[buffer.startIndex..<newline], as: UTF8.self)
                buffer.removeSubrange(buffer.startIndex...newline)
                return line
            }
            let chunk = output.fileHandleForReading.availableData
            if chunk.isEmpty { return nil }
            buffer.append(chunk)
        }
    }

    /// Sends a request and waits for its reply (the harness answers within its request timeout).
    func request(_ text: String) -> String {
        next += 1
        let tag = "b\(next)"
        input.fileHandleForWriting.write(Data("\(tag) \(text)\n".utf8))
        while let line = readLine() {
            if line.hasPrefix(tag + " ") { return String(line.dropFirst(tag.count + 1)) }
        }
        return "exited"
    }

    func kill9() {
        kill(process.processIdentifier, SIGKILL)
        process.waitUntilExit()
    }

    func stop() {
        try? input.fileHandleForWriting.close()
        process.waitUntilExit()
    }
}

struct FailoverBench: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "failover",
        abstract: "Milliseconds from SIGKILL of a 3-node cluster's leader until the next write commits (median of runs).")

    @Option(help: "A directory for the nodes' data.") var directory = "./keel-bench"
    @Option(help: "Kills to measure.") var runs = 5
    @Option(help: "Milliseconds per Raft tick (the election timeout is 10 to 20 ticks).") var tickMilliseconds = 50

    func validate() throws {
        try require((1...100).contains(runs), "--runs must be between 1 and 100")
        try require((1...1000).contains(tickMilliseconds), "--tick-milliseconds must be between 1 and 1000")
    }

    func run() async throws {
        let executable = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
            .deletingLastPathComponent().appendingPathComponent("keel-node-harness").path
        guard FileManager.default.isExecutableFile(atPath: executable) else {
            throw ValidationError("keel-node-harness is not beside keel (\(executable)); build the package first")
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let ports = try await freeLoopbackPorts(3, group: group)
        try await group.shutdownGracefully()
        let base = freshDirectory(directory, "failover")
        let members = ports.enumerated().map { "\($0.offset + 1)=127.0.0.1:\($0.element)" }.joined(separator: ",")
        func start(_ i: Int) throws -> HarnessProcess {
            try HarnessProcess(executable: executable, arguments: ["--id", "\(i + 1)", "--dir", "\(base)/node\(i + 1)", "--members", members,
                                                                   "--tick-ms", "\(tickMilliseconds)"])
        }
        var nodes = try (0..<3).map(start)
        defer {
            for node in nodes { node.stop() }
            try? FileManager.default.removeItem(atPath: base)
        }
        print("run  leader  failover ms")
        var samples: [Double] = []
        var written = 0
        for run in 1...runs {
            // A leader that has committed a write, and every node caught up.
            var leader: Int?
            while leader == nil {
                written += 1
                if nodes[written % 3].request("put warm\(written) x") == "ok" {
                    leader = (0..<3).first { nodes[$0].request("status").contains("role=leader") }
                }
            }
            try await Task.sleep(for: .milliseconds(500))
            let killed = leader!
            let began = ContinuousClock.now
            nodes[killed].kill9()
            var attempt = 0
            while true {
                attempt += 1
                let survivor = (killed + 1 + attempt % 2) % 3
                if nodes[survivor].request("put after\(run)-\(attempt) x") == "ok" { break }
            }
            let milliseconds = secondsIn(ContinuousClock.now - began) * 1000
            samples.append(milliseconds)
            print(String(format: "%3d  %6d  %11.0f", run, killed + 1, milliseconds))
            nodes[killed] = try start(killed)
        }
        samples.sort()
        print(String(format: "median %.0f ms over %d runs (election timeout %d-%d ms)", samples[samples.count / 2], runs,
                     10 * tickMilliseconds, 20 * tickMilliseconds))
    }
}
