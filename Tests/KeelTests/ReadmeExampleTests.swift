import Foundation
import Keel
import KeelCore
import KeelStorage
import NIOPosix
import Testing

// The example of README.md and the DocC overview, compiled and run (keep them the same).
final class Counter: StateMachine {
    var value: Int64 = 0
    struct Snapshot: CheckpointSource {
        let value: Int64
        func writeCheckpoint(to sink: inout CheckpointSink) throws(StorageError) {
            try sink.write(UInt64(bitPattern: value))
        }
    }
    func apply(_ command: [UInt8]) -> [UInt8] {
        value += Int64(String(decoding: command, as: UTF8.self)) ?? 0
        return Array(String(value).utf8)
    }
    func snapshot() -> Snapshot { Snapshot(value: value) }
    func restore(from bytes: [UInt8]) throws {
        var reader = ByteReader(bytes)
        value = Int64(bitPattern: try reader.readUInt64())
    }
}

@Test("the README's node example runs, and its state survives a restart through a checkpoint")
func readmeExample() async throws {
    let directory = NSTemporaryDirectory() + "keel-readme-\(getpid())"
    defer { try? FileManager.default.removeItem(atPath: directory) }
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
    let port = try await freePorts(1, group: group)[0]
    let configuration = NodeConfiguration(node: NodeID(1), dataDirectory: directory,
                                          listen: PeerAddress(host: "127.0.0.1", port: port),
                                          clusterToken: Array("a secret".utf8))
    var node = try await KeelNode.start(configuration: configuration, machine: Counter(), group: group)
    var total: [UInt8] = []
    for _ in 0..<100 where total.isEmpty {
        do { total = try await node.propose(Array("5".utf8)) } catch NodeError.noLeader { try await Task.sleep(for: .milliseconds(20)) }
    }
    #expect(String(decoding: total, as: UTF8.self) == "5")
    #expect(try await node.read(consistency: .linearizable) { $0.value } == 5)
    _ = try await node.propose(Array("2".utf8))
    _ = try await node.checkpoint()
    await node.shutdown()
    node = try await KeelNode.start(configuration: configuration, machine: Counter(), group: group)
    #expect(try await node.read(consistency: .local) { $0.value } == 7, "restored from the checkpoint")
    await node.shutdown()
    try await group.shutdownGracefully()
}
