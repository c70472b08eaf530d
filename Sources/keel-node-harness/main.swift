// A Keel node in its own process, for the multi-process tests and `keel bench failover`: a
// replicated map of strings, driven by tagged lines on stdin, answered by tagged lines on stdout.
//
//   keel-node-harness --id 1 --dir DIR --members "1=127.0.0.1:7001,2=127.0.0.1:7002" [--join]
//                     [--snapshot-interval N] [--tick-ms N] [--token T] [--watch-direct-reads yes]
//
// `--members` lists where each member listens for peers, as this process should reach it (a test
// may point a member at a TCP proxy); this node's own entry is where it listens.
//
// Requests (TAG is any word without spaces; replies start with it):
//   TAG put KEY VALUE      -> TAG ok | TAG unknown REASON (timed out) | TAG err REASON
//   TAG get KEY            -> TAG value VALUE | TAG nil           (a linearizable read)
//   TAG status             -> TAG status role=R term=T leader=L applied=A commit=C members=1,2,3
//   TAG hash               -> TAG hash APPLIED HASH COUNT          (local state, at that applied index)
//   TAG dump               -> TAG dump K=V,K=V,...                 (local state)
//   TAG direct             -> TAG direct READS FEWEST              (with --watch-direct-reads: a thread
//                             has called readDirectly without pause since the node started; how many
//                             answered, and the fewest keys one of them saw; -1 if none answered)
//   TAG learner|member ID HOST:PORT, TAG promote|remove|transfer ID -> TAG ok | TAG err REASON
// It prints "ready" once the node runs, and exits on end of input.

import Foundation
import Keel
import KeelCore
import KeelRaft
import KeelStorage
import Logging
import NIOPosix

final class StringMap: StateMachine, @unchecked Sendable {
    // @unchecked Sendable: the node calls it one call at a time (its loop or its apply thread).
    var values: [String: String] = [:]

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

    func apply(_ command: [UInt8]) -> [UInt8] {
        let text = String(decoding: command, as: UTF8.self)
        guard let space = text.firstIndex(of: " ") else { return Array("?".utf8) }
        values[String(text[..<space])] = String(text[text.index(after: space)...])
        return Array("ok".utf8)
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
    }

    /// FNV-1a over the sorted pairs.
    var hash: UInt64 {
        var hash: UInt64 = 0xcbf2_9ce4_8422_2325
        for key in values.keys.sorted() {
            for byte in "\(key)=\(values[key]!)\n".utf8 {
                hash ^= UInt64(byte)
                hash = hash &* 0x100_0000_01b3
            }
        }
        return hash
    }
}

let output = NSLock()
func reply(_ line: String) {
    output.lock()
    defer { output.unlock() }
    FileHandle.standardOutput.write(Data((line + "\n").utf8))
}

func fail(_ message: String) -> Never {
    FileHandle.standardError.write(Data("keel-node-harness: \(message)\n".utf8))
    exit(2)
}

func parseAddress(_ text: Substring) -> PeerAddress? {
    guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]) else { return nil }
    return PeerAddress(host: String(text[..<colon]), port: port)
}

var options: [String: String] = [:]
var join = false
var arguments = CommandLine.arguments.dropFirst()
while let argument = arguments.popFirst() {
    if argument == "--join" { join = true; continue }
    guard argument.hasPrefix("--"), let value = arguments.popFirst() else { fail("usage: see the file comment") }
    options[String(argument.dropFirst(2))] = value
}
guard let id = options["id"].flatMap(UInt64.init), let directory = options["dir"], let memberList = options["members"] else {
    fail("--id, --dir and --members are required")
}
var members: [NodeID: PeerAddress] = [:]
for item in memberList.split(separator: ",") {
    let parts = item.split(separator: "=", maxSplits: 1)
    guard parts.count == 2, let member = UInt64(parts[0]), let address = parseAddress(parts[1]) else { fail("bad member \(item)") }
    members[NodeID(member)] = address
}
var configuration = NodeConfiguration(node: NodeID(id), dataDirectory: directory, members: members,
                                      clusterToken: Array((options["token"] ?? "harness").utf8))
configuration.join = join
configuration.tickMilliseconds = options["tick-ms"].flatMap(Int64.init) ?? 50
configuration.snapshotInterval = options["snapshot-interval"].flatMap(UInt64.init) ?? 10_000
configuration.requestTimeoutMilliseconds = 3000

var logger = Logger(label: "keel.harness.\(id)")
logger.logLevel = .notice
let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
let machine = StringMap()

func describe(_ error: any Error) -> String {
    if let error = error as? NodeError, error == .timedOut || error == .leaderChanged { return "unknown \(error)" }
    return "err \(error)".replacingOccurrences(of: "\n", with: " ")
}

func handle(_ line: String, node: KeelNode<StringMap>) async {
    let words = line.split(separator: " ", maxSplits: 3).map(String.init)
    guard words.count >= 2 else { return }
    let tag = words[0]
    do {
        switch (words[1], words.count) {
        case ("put", 4):
            _ = try await node.propose(Array("\(words[2]) \(words[3])".utf8))
            reply("\(tag) ok")
        case ("get", 3):
            let key = words[2]
            let value = try await node.read { $0.values[key] }
            reply(value.map { "\(tag) value \($0)" } ?? "\(tag) nil")
        case ("status", 2):
            let status = try await node.status()
            let members = status.members.map { "\($0.id.rawValue)\($0.isVoter ? "" : "L")" }.joined(separator: ",")
            reply("\(tag) status role=\(status.role) term=\(status.term.rawValue) leader=\(status.leader?.rawValue ?? 0) snapshot=\(status.snapshotIndex.rawValue) "
                  + "applied=\(status.appliedIndex.rawValue) commit=\(status.commitIndex.rawValue) members=\(members)")
        case ("hash", 2):
            while true {
                let before = try await node.status().appliedIndex
                let (hash, count) = try await node.read(consistency: .local) { ($0.hash, $0.values.count) }
                if try await node.status().appliedIndex == before {
                    reply("\(tag) hash \(before.rawValue) \(String(hash, radix: 16)) \(count)")
                    break
                }
            }
        case ("direct", 2):
            let (reads, fewest) = directWatch.withLock { (directReads, directFewest) }
            reply("\(tag) direct \(reads) \(fewest)")
        case ("dump", 2):
            let pairs = try await node.read(consistency: .local) { map in map.values.keys.sorted().map { "\($0)=\(map.values[$0]!)" } }
            reply("\(tag) dump \(pairs.joined(separator: ","))")
        case ("learner", 4), ("member", 4):
            guard let member = UInt64(words[2]), let address = parseAddress(Substring(words[3])) else { return reply("\(tag) err bad arguments") }
            if words[1] == "learner" {
                try await node.addLearner(NodeID(member), address: address)
            } else {
                try await node.addMember(NodeID(member), address: address)
            }
            reply("\(tag) ok")
        case ("promote", 3), ("remove", 3), ("transfer", 3):
            guard let member = UInt64(words[2]) else { return reply("\(tag) err bad arguments") }
            switch words[1] {
            case "promote": try await node.promote(NodeID(member))
            case "remove": try await node.removeMember(NodeID(member))
            default: try await node.transferLeadership(to: NodeID(member))
            }
            reply("\(tag) ok")
        default:
            reply("\(tag) err unknown request")
        }
    } catch {
        reply("\(tag) \(describe(error))")
    }
}

let node: KeelNode<StringMap>
do {
    node = try await KeelNode.start(configuration: configuration, machine: machine, group: group, logger: logger)
} catch {
    fail("cannot start: \(error)")
}
/// With --watch-direct-reads: direct reads answered, and the fewest keys one saw.
let directWatch = NSLock()
nonisolated(unsafe) var directReads = 0
nonisolated(unsafe) var directFewest = -1
if options["watch-direct-reads"] != nil {
    Thread.detachNewThread {
        while true {
            guard let count = node.readDirectly({ $0.values.count }) else { continue }
            directWatch.lock()
            directReads += 1
            if directFewest < 0 || count < directFewest { directFewest = count }
            directWatch.unlock()
        }
    }
}
reply("ready")
await withTaskGroup(of: Void.self) { tasks in
    let lines = AsyncStream<String> { continuation in
        Thread.detachNewThread {
            while let line = readLine() { continuation.yield(line) }
            continuation.finish()
        }
    }
    for await line in lines {
        tasks.addTask { await handle(line, node: node) }
    }
}
await node.shutdown()
try? await group.shutdownGracefully()
