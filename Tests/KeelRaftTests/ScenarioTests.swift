// Scenario scripts with golden output (etcd raft's "datadriven" style). Each file in Scenarios/
// is a list of blocks:
//
//   command arguments
//   ----
//   expected output
//
// separated by blank lines. KEEL_REWRITE_GOLDEN=1 rewrites the expected output from the actual
// one (review the diff before committing it).

import Foundation
import KeelCore
import KeelRaft
import Testing

struct ScenarioRunner {
    var cluster = TestCluster(1)

    mutating func run(_ line: String) -> [String] {
        let words = line.split(separator: " ").map(String.init)
        guard let command = words.first else { return [] }
        let arguments = Array(words.dropFirst())
        func id(_ position: Int) -> UInt64 { UInt64(arguments[position])! }
        switch command {
        case "cluster":
            let count = Int(arguments[0])!
            var settings: [String: String] = [:]
            for pair in arguments.dropFirst() {
                let parts = pair.split(separator: "=").map(String.init)
                settings[parts[0]] = parts[1]
            }
            let learners = settings["learners"].map { $0.split(separator: ",").map { UInt64($0)! } } ?? []
            cluster = TestCluster(count, learners: learners) { configuration in
                if let value = settings["prevote"] { configuration.preVote = value == "true" }
                if let value = settings["checkquorum"] { configuration.checkQuorum = value == "true" }
                if let value = settings["chunk"] { configuration.snapshotChunkSizeMax = Int(value)! }
            }
            return []
        case "campaign":
            cluster[id(0)].raft.campaign()
            cluster.stabilize()
            return []
        case "start-campaign":
            cluster[id(0)].raft.campaign()
            cluster.process(NodeID(id(0)))
            return []
        case "tick":
            let count = Int(arguments[0])!
            let only = arguments.count > 1 ? arguments.dropFirst().map { UInt64($0)! } : nil
            cluster.tick(count, only: only)
            return []
        case "propose":
            do {
                try cluster[id(0)].raft.propose(bytes(arguments[1]))
                cluster.stabilize()
                return ["ok"]
            } catch {
                return ["error: \(error)"]
            }
        case "stabilize":
            cluster.stabilize()
            return []
        case "deliver":
            // One round: deliver what is in flight now, printing each message.
            cluster.processAll()
            let round = cluster.outbox
            cluster.outbox = []
            var lines: [String] = []
            for message in round {
                if cluster.cut.contains([message.from.rawValue, message.to.rawValue]) || cluster.down.contains(message.to) {
                    lines.append("dropped \(message)")
                    continue
                }
                lines.append(message.description)
                cluster.nodes[message.to]?.raft.step(message)
                cluster.process(message.to)
            }
            return lines
        case "partition":
            let split = arguments.split(separator: "|")
            cluster.partition(split[0].map { UInt64($0)! }, split[1].map { UInt64($0)! })
            return []
        case "heal":
            cluster.heal()
            return []
        case "crash":
            cluster.crash(id(0))
            return []
        case "restart":
            cluster.restart(id(0))
            cluster.stabilize()
            return []
        case "add-node":
            cluster.addNode(id(0))
            return []
        case "change":
            let kinds: [String: ConfigurationChange.Kind] = ["add-voter": .addVoter, "add-learner": .addLearner, "promote": .promoteLearner, "remove": .remove]
            do {
                try cluster[id(0)].raft.proposeConfigurationChange(ConfigurationChange(kinds[arguments[1]]!, NodeID(id(2))))
                cluster.process(NodeID(id(0)))
                return ["ok"]
            } catch {
                return ["error: \(error)"]
            }
        case "transfer":
            do {
                try cluster[id(0)].raft.transferLeadership(to: NodeID(id(1)))
                cluster.process(NodeID(id(0)))
                return ["ok"]
            } catch {
                return ["error: \(error)"]
            }
        case "snapshot":
            let node = cluster[id(0)]
            let applied = node.status.appliedIndex
            node.storage.createSnapshot(at: applied, membership: node.status.membership, data: bytes("state@\(applied)"))
            return ["snapshot of node \(id(0)) at \(applied)"]
        case "read":
            do {
                let before = cluster[id(0)].readStates.count
                try cluster[id(0)].raft.readIndex(context: bytes(arguments[1]))
                cluster.stabilize()
                let answered = cluster[id(0)].readStates.dropFirst(before)
                return answered.isEmpty ? ["no answer"] : answered.map { "read \(String(decoding: $0.context, as: UTF8.self)) at index \($0.index)" }
            } catch {
                return ["error: \(error)"]
            }
        case "status":
            return cluster.ids.map { nodeID in
                let node = cluster.nodes[nodeID]!
                if cluster.down.contains(nodeID) { return "\(nodeID): down" }
                let status = node.status
                return "\(nodeID): \(status.role) term \(status.term) leader \(status.leader.map { String($0.rawValue) } ?? "-") "
                    + "commit \(status.commitIndex) applied \(status.appliedIndex) last \(status.lastIndex) \(status.membership)"
            }
        case "log":
            let node = cluster[id(0)]
            var lines = ["snapshot \(node.storage.snapshot.term)/\(node.storage.snapshot.index)"]
            lines += node.storage.entries.map { entry in
                switch entry.kind {
                case .normal: "\(entry.term)/\(entry.index) " + (entry.data.isEmpty ? "no-op" : String(decoding: entry.data, as: UTF8.self))
                case .configurationChange: entry.description
                }
            }
            return lines
        case "applied":
            return [cluster.appliedData(id(0)).joined(separator: " ")]
        default:
            return ["unknown command \(command)"]
        }
    }
}

struct ScenarioBlock {
    var command: String
    var expected: [String]
}

func parseScenario(_ text: String) -> [ScenarioBlock] {
    var blocks: [ScenarioBlock] = []
    var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)[...]
    while let line = lines.first {
        lines = lines.dropFirst()
        if line.isEmpty || line.hasPrefix("#") { continue }
        var block = ScenarioBlock(command: line, expected: [])
        guard lines.first == "----" else {
            blocks.append(block)
            continue
        }
        lines = lines.dropFirst()
        while let output = lines.first, !output.isEmpty {
            block.expected.append(output)
            lines = lines.dropFirst()
        }
        blocks.append(block)
    }
    return blocks
}

func renderScenario(_ blocks: [ScenarioBlock]) -> String {
    blocks.map { ([$0.command, "----"] + $0.expected).joined(separator: "\n") }.joined(separator: "\n\n") + "\n"
}

@Suite("Raft scenarios with golden output")
struct ScenarioTests {
    static let directory = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("Scenarios")
    static let names = ["elections", "partitions", "conflicting-logs", "snapshots", "membership", "transfer", "reads"]

    @Test("scenario", arguments: names)
    func scenario(name: String) throws {
        let url = Self.directory.appendingPathComponent(name + ".txt")
        let text = try String(contentsOf: url, encoding: .utf8)
        let comments = text.split(separator: "\n", omittingEmptySubsequences: false).prefix { $0.hasPrefix("#") }.joined(separator: "\n")
        var blocks = parseScenario(text)
        var runner = ScenarioRunner()
        var mismatches = 0
        for position in blocks.indices {
            let actual = runner.run(blocks[position].command)
            if actual != blocks[position].expected {
                mismatches += 1
                if ProcessInfo.processInfo.environment["KEEL_REWRITE_GOLDEN"] == nil {
                    Issue.record("\(name).txt: `\(blocks[position].command)`\nexpected:\n\(blocks[position].expected.joined(separator: "\n"))\nactual:\n\(actual.joined(separator: "\n"))")
                }
                blocks[position].expected = actual
            }
        }
        if mismatches > 0, ProcessInfo.processInfo.environment["KEEL_REWRITE_GOLDEN"] != nil {
            try ((comments.isEmpty ? "" : comments + "\n\n") + renderScenario(blocks)).write(to: url, atomically: true, encoding: .utf8)
        }
        #expect(!blocks.isEmpty)
    }
}
