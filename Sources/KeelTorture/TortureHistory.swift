// The record of a `keel torture` run: every client operation with its invocation and completion
// times and outcome, every fault injected, and what each node reported once the faults were
// healed. Written as one JSON document (docs/torture.md gives the format), read back by
// `keel torture check`, so a history can be checked again, or checked after editing by hand.
//
// Times are nanoseconds since the run began, from one monotonic clock in the torture process
// (every client runs in it), so invocations and completions of different clients compare.

import Foundation

/// What a client asked for.
public enum TortureOperationKind: String, Codable, Sendable, CaseIterable {
    /// GET a register key; the result is its value (a missing key reads as 0).
    case read
    /// SET a register key to `value`.
    case write
    /// INCR a register key; the result is the new value.
    case incr
    /// SET … GET: sets `value`, the result is the value it replaced.
    case swap
    /// WATCH, GET, MULTI, SET, EXEC: sets `value` if the key still holds `expected` (the value the
    /// GET saw). ok with result 1: it did. An EXEC that aborts (the key changed) is `fail`.
    case cas
    /// SET of a key no other operation touches (`a:<client>:<n>`): the "set" workload; each one
    /// acknowledged must be present at the end.
    case add
}

/// How an operation ended.
public enum TortureOutcome: String, Codable, Sendable, CaseIterable {
    /// Answered; it took effect (a write) or returned `result` (a read).
    case ok
    /// Definitely did not take effect (an error that says the write was refused, or not handed to
    /// the leader).
    case fail
    /// May or may not have taken effect: a timeout, a closed connection, or an error that says so.
    case unknown
}

/// One client operation.
public struct TortureOperation: Codable, Sendable, Equatable {
    public var id: Int
    /// The client (a thread with one connection at a time); -1 for the final reads.
    public var client: Int
    /// The node (1-based) the client's connection was to.
    public var node: Int
    public var key: String
    public var kind: TortureOperationKind
    /// The value written (write, swap, cas).
    public var value: Int64?
    /// The value a cas expected.
    public var expected: Int64?
    public var invoke: UInt64
    /// nil for unknown outcomes (the operation may take effect at any later time).
    public var complete: UInt64?
    public var outcome: TortureOutcome
    /// The value read (read), the new value (incr), the replaced value (swap), 1 or 0 (cas).
    public var result: Int64?
    /// The error text or why the outcome is unknown.
    public var error: String?

    public init(id: Int, client: Int, node: Int, key: String, kind: TortureOperationKind, value: Int64? = nil,
                expected: Int64? = nil, invoke: UInt64, complete: UInt64?, outcome: TortureOutcome,
                result: Int64? = nil, error: String? = nil) {
        self.id = id
        self.client = client
        self.node = node
        self.key = key
        self.kind = kind
        self.value = value
        self.expected = expected
        self.invoke = invoke
        self.complete = complete
        self.outcome = outcome
        self.result = result
        self.error = error
    }
}

/// The kinds of fault `keel torture` injects.
public enum TortureFaultKind: String, Codable, Sendable, CaseIterable {
    /// SIGKILL a node's process, then start it again on the same data.
    case kill
    /// SIGSTOP a node's process, then SIGCONT it.
    case pause
    /// Cut every link between two groups of nodes, both ways.
    case partition
    /// Cut one link in one direction (node A's messages no longer reach node B).
    case oneWay = "one-way"
    /// SIGKILL a node, delete its data directory, start it again empty: it rejoins and catches
    /// up from the log or a streamed checkpoint.
    case wipe
    /// Fill the small file system a node's data directory is on, then free it.
    case disk
}

/// One fault, from its injection to its healing.
public struct TortureFault: Codable, Sendable, Equatable {
    public var kind: TortureFaultKind
    /// The nodes it hit (1-based): the killed, paused, wiped or filled node; for a partition the
    /// smaller side; for a one-way cut the sender then the receiver.
    public var nodes: [Int]
    /// Whether the hit node (the first) was the leader when the fault began.
    public var leader: Bool
    public var start: UInt64
    public var end: UInt64
    public var detail: String

    public init(kind: TortureFaultKind, nodes: [Int], leader: Bool, start: UInt64, end: UInt64, detail: String) {
        self.kind = kind
        self.nodes = nodes
        self.leader = leader
        self.start = start
        self.end = end
        self.detail = detail
    }
}

/// What one node reported after every fault was healed (`KEEL.STATEHASH`).
public struct TortureNodeState: Codable, Sendable, Equatable {
    public var node: Int
    public var appliedIndex: UInt64
    public var digest: String
    public var keys: Int

    public init(node: Int, appliedIndex: UInt64, digest: String, keys: Int) {
        self.node = node
        self.appliedIndex = appliedIndex
        self.digest = digest
        self.keys = keys
    }
}

/// The state at the end of a run.
public struct TortureFinal: Codable, Sendable, Equatable {
    /// Each node's report; a node that never answered is missing.
    public var nodes: [TortureNodeState]
    /// The `add` keys present at the end (read from the leader, linearizably); nil if they could
    /// not be read.
    public var adds: [String]?
    /// Why the end state is incomplete, if it is.
    public var problem: String?

    public init(nodes: [TortureNodeState], adds: [String]?, problem: String? = nil) {
        self.nodes = nodes
        self.adds = adds
        self.problem = problem
    }
}

/// A whole run.
public struct TortureHistory: Codable, Sendable, Equatable {
    /// "keel-torture-history": part of the format.
    public var format = TortureHistory.formatName
    /// 1: part of the format; a change that old readers would misread takes a new version.
    public var version = 1
    public var seed: UInt64
    public var nodes: Int
    public var durationSeconds: Double
    /// The flags every `keel serve` was started with (beyond its ports, id, peers and data
    /// directory).
    public var serveArguments: [String]
    /// Fault kinds asked for but not possible here, and why.
    public var skippedFaults: [String]
    public var operations: [TortureOperation]
    public var faults: [TortureFault]
    public var final: TortureFinal?

    public static let formatName = "keel-torture-history"

    public init(seed: UInt64, nodes: Int, durationSeconds: Double, serveArguments: [String], skippedFaults: [String] = [],
                operations: [TortureOperation] = [], faults: [TortureFault] = [], final: TortureFinal? = nil) {
        self.seed = seed
        self.nodes = nodes
        self.durationSeconds = durationSeconds
        self.serveArguments = serveArguments
        self.skippedFaults = skippedFaults
        self.operations = operations
        self.faults = faults
        self.final = final
    }

    /// The history as JSON (one operation per line, so a history can be read with grep).
    public func encoded() throws -> Data {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        var text = Data()
        var header = self
        header.operations = []
        // The header object without its operations, then the operations spliced in one per line.
        var head = try encoder.encode(header)
        guard let range = head.range(of: Data("\"operations\":[]".utf8)) else { return try encoder.encode(self) }
        let tail = head.subdata(in: range.upperBound..<head.count)
        head = head.subdata(in: 0..<range.lowerBound)
        text.append(head)
        text.append(Data("\"operations\":[\n".utf8))
        for (position, operation) in operations.enumerated() {
            text.append(try encoder.encode(operation))
            text.append(Data((position + 1 < operations.count ? ",\n" : "\n").utf8))
        }
        text.append(Data("]".utf8))
        text.append(tail)
        text.append(Data("\n".utf8))
        return text
    }

    /// Reads a history written by `encoded()` (or any JSON of the same shape).
    /// - Throws: `TortureError.badHistory` when it is not a keel torture history of a known version.
    public static func decode(_ data: Data) throws -> TortureHistory {
        let history: TortureHistory
        do {
            history = try JSONDecoder().decode(TortureHistory.self, from: data)
        } catch {
            throw TortureError.badHistory("not a keel torture history: \(error)")
        }
        guard history.format == formatName else { throw TortureError.badHistory("format is \"\(history.format)\", not \"\(formatName)\"") }
        guard history.version == 1 else { throw TortureError.badHistory("version \(history.version) is not known (this keel reads version 1)") }
        return history
    }
}

/// What can stop a torture run or a check.
public enum TortureError: Error, CustomStringConvertible, Sendable {
    case badHistory(String)
    case setup(String)

    public var description: String {
        switch self {
        case .badHistory(let reason): "bad history: \(reason)"
        case .setup(let reason): "cannot start the torture run: \(reason)"
        }
    }
}
