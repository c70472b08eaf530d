// A torture run: a cluster of real `keel serve` processes, client threads recording every
// operation, a fault thread injecting faults from a seed, then healing, convergence and final
// reads, and the check (docs/torture.md).
//
// The seed fixes what the run chooses (each client's operations, keys and values; the faults,
// their targets and their durations); the processes' timing is the machine's, so two runs with
// one seed differ in detail but exercise the same plan.

import Foundation
import Glibc
import KeelCore
import NIOConcurrencyHelpers

/// What a torture run does.
public struct TortureOptions: Sendable {
    /// Nodes in the cluster: 1, 3 or 5.
    public var nodes = 3
    /// How long clients run and faults are injected, in seconds.
    public var durationSeconds: Double = 60
    public var seed: UInt64 = 1
    /// Client threads (each one connection at a time, one operation at a time).
    public var clients = 8
    /// Operations per second across all clients (each client paces itself to its share).
    public var rate: Double = 400
    /// Register keys in use at a time.
    public var keys = 8
    /// Clients move to fresh register keys this often, which bounds each key's history (and the
    /// linearizability search).
    public var keySeconds: Double = 10
    /// The fault kinds to inject.
    public var faults: [TortureFaultKind] = TortureFaultKind.allCases
    /// Inject the kinds in the order given, round and round (a schedule), instead of every kind
    /// once in a seeded order and then at random.
    public var inOrder = false
    /// Mean seconds without a fault between two faults.
    public var faultIntervalSeconds: Double = 2
    /// How long a client waits for an answer before the outcome is unknown.
    public var requestTimeoutSeconds: Double = 2
    /// The `keel` executable the nodes run.
    public var serveBinary: String
    /// Flags for every `keel serve` (after the ones the run sets).
    public var serveArguments: [String] = []
    /// Where data directories, node logs and the history go.
    public var workDirectory: String
    /// The size of each node's tmpfs, for disk faults.
    public var diskBytes = 64 << 20
    /// Prints progress lines here when set.
    public var progress: (@Sendable (String) -> Void)?

    public init(serveBinary: String, workDirectory: String) {
        self.serveBinary = serveBinary
        self.workDirectory = workDirectory
    }

    /// Rejects settings the run cannot honour.
    public func validate() throws {
        guard [1, 3, 5].contains(nodes) else { throw TortureError.setup("--nodes takes 1, 3 or 5") }
        guard durationSeconds > 0, durationSeconds <= 86_400 else { throw TortureError.setup("--duration must be in (0, 86400] seconds") }
        guard (1...256).contains(clients) else { throw TortureError.setup("--clients must be in 1...256") }
        guard rate > 0, rate <= 100_000 else { throw TortureError.setup("--rate must be in (0, 100000] operations per second") }
        guard (1...1024).contains(keys) else { throw TortureError.setup("--keys must be in 1...1024") }
        guard keySeconds >= 0.5 else { throw TortureError.setup("--key-seconds must be at least 0.5") }
        guard faultIntervalSeconds >= 0 else { throw TortureError.setup("--fault-interval must not be negative") }
        guard requestTimeoutSeconds >= 0.1 else { throw TortureError.setup("--timeout must be at least 0.1 s") }
        guard FileManager.default.isExecutableFile(atPath: serveBinary) else { throw TortureError.setup("\(serveBinary) is not an executable") }
    }
}

/// Runs a torture session and returns its history.
public final class TortureRun: @unchecked Sendable {
    // @unchecked Sendable: `operations`, `faults` and the stop flags are behind `lock`; the
    // cluster is used by the fault thread during the run and by the caller's thread otherwise.
    let options: TortureOptions
    let cluster: TortureCluster
    private let lock = NIOLock()
    private var operations: [TortureOperation] = []
    private var faults: [TortureFault] = []
    private var nextID = 0
    private var stopping = false
    private let started = DispatchTime.now().uptimeNanoseconds
    private var notes: [String] = []

    public init(options: TortureOptions) throws {
        try options.validate()
        var options = options
        // Small segments and frequent checkpoints, unless the caller chose: rotations, log
        // trimming and checkpoint transfers happen within a short run, and a full disk is met.
        let given = Set(options.serveArguments.filter { $0.hasPrefix("--") }.map { $0.split(separator: "=").first.map(String.init) ?? $0 })
        var defaults: [String] = []
        if !given.contains("--log-segment-bytes") { defaults += ["--log-segment-bytes", "1048576"] }
        if !given.contains("--checkpoint-log-bytes") { defaults += ["--checkpoint-log-bytes", "4194304"] }
        options.serveArguments = defaults + options.serveArguments
        self.options = options
        cluster = try TortureCluster(options: options)
    }

    /// Nanoseconds since the run began.
    func now() -> UInt64 { DispatchTime.now().uptimeNanoseconds - started }

    private var isStopping: Bool { lock.withLock { stopping } }

    private func say(_ text: String) {
        options.progress?(String(format: "[%7.2f s] ", Double(now()) / 1e9) + text)
    }

    /// Runs the whole session: start, load and faults for the duration, heal, converge, read the
    /// end state. Always tears the cluster down.
    public func run() throws -> TortureHistory {
        defer { cluster.shutdown() }
        try cluster.start()
        var faultKinds = options.faults
        var skipped = cluster.skipped
        if faultKinds.contains(.disk), !cluster.diskFaultsPossible { faultKinds.removeAll { $0 == .disk } }
        if options.nodes == 1 {
            for kind in [TortureFaultKind.partition, .oneWay, .wipe] where faultKinds.contains(kind) {
                faultKinds.removeAll { $0 == kind }
                skipped.append(kind == .wipe ? "wipe: a single node's wiped data is gone by definition (needs 3 or 5 nodes)"
                                             : "\(kind.rawValue): needs 3 or 5 nodes (there are no links to cut)")
            }
        }
        for line in skipped { say("skipped \(line)") }
        say("cluster of \(options.nodes) up (work directory \(options.workDirectory)); \(options.clients) clients for \(options.durationSeconds) s")
        _ = cluster.waitUntilHealthy(seconds: 30)

        let end = now() + UInt64(options.durationSeconds * 1e9)
        var threads: [Thread] = []
        let finished = DispatchGroup()
        for client in 0..<options.clients {
            finished.enter()
            let thread = Thread { [self] in
                runClient(client, until: end)
                finished.leave()
            }
            thread.stackSize = 1 << 20
            threads.append(thread)
        }
        finished.enter()
        let kinds = faultKinds
        let faultThread = Thread { [self] in
            injectFaults(kinds, until: end)
            finished.leave()
        }
        for thread in threads { thread.start() }
        faultThread.start()
        finished.wait()

        say("load and faults over; healing everything")
        let final = heal()
        let history = lock.withLock {
            TortureHistory(seed: options.seed, nodes: options.nodes, durationSeconds: options.durationSeconds,
                           serveArguments: options.serveArguments, skippedFaults: skipped + notes,
                           operations: operations.sorted { $0.id < $1.id }, faults: faults, final: final)
        }
        return history
    }

    /// Ends the run early (from a signal handler's queue): clients and faults stop at once.
    public func stop() { lock.withLock { stopping = true } }

    // MARK: - Clients

    private func record(_ operation: TortureOperation) {
        lock.withLock { operations.append(operation) }
    }

    private func newID() -> Int {
        lock.withLock {
            defer { nextID += 1 }
            return nextID
        }
    }

    /// A client thread: paced operations until `end`, moving to another node when its node does
    /// not answer.
    private func runClient(_ client: Int, until end: UInt64) {
        var random = SeededRandom(seed: options.seed &+ UInt64(client + 1) &* 0x9e37_79b9_7f4a_7c15)
        let interval = UInt64(Double(options.clients) / options.rate * 1e9)
        var next = now() + UInt64.random(in: 0...max(1, interval), using: &random)
        var slot = client % options.nodes
        var connection: RESPClient?
        var added = 0
        while !isStopping {
            let time = now()
            guard time < end else { break }
            if time < next { usleep(UInt32(min(100_000, (next - time) / 1000))); continue }
            next += interval
            if next + 20 * interval < time { next = time } // far behind (a long timeout): do not burst
            if connection == nil || !connection!.isOpen {
                do {
                    connection = try RESPClient(port: cluster.clientPorts[slot], timeout: 1)
                } catch {
                    connection = nil
                    slot = (slot + 1) % options.nodes
                    usleep(50_000)
                    continue
                }
            }
            let generation = Int(time / UInt64(options.keySeconds * 1e9))
            let key = "r\(Int(random.next() % UInt64(options.keys))):\(generation)"
            let roll = random.next() % 100
            let value = Int64(random.next() % 1_000_000_000) + 1
            let outcome: TortureOperation
            switch roll {
            case 0..<30: outcome = perform(client, slot, connection!, key: key, kind: .read, value: nil)
            case 30..<50: outcome = perform(client, slot, connection!, key: key, kind: .write, value: value)
            case 50..<65: outcome = perform(client, slot, connection!, key: key, kind: .incr, value: nil)
            case 65..<75: outcome = perform(client, slot, connection!, key: key, kind: .swap, value: value)
            case 75..<85: outcome = compareAndSet(client, slot, connection!, key: key, value: value)
            default:
                added += 1
                outcome = perform(client, slot, connection!, key: "a:\(client):\(added)", kind: .add, value: 1)
            }
            record(outcome)
            if !connection!.isOpen || outcome.outcome == .unknown {
                // No answer from this node: try the next one (a client of a real cluster would).
                connection?.close()
                connection = nil
                slot = (slot + 1) % options.nodes
            } else if outcome.outcome == .fail, outcome.error?.hasPrefix("CLUSTERDOWN") == true || outcome.error?.contains("not a member") == true {
                usleep(20_000)
            }
        }
        connection?.close()
    }

    /// Whether an error reply says the write definitely did not take effect. Only the answers
    /// Keel documents as refusals count; anything else is unknown.
    static func isRefusal(_ text: String) -> Bool {
        // ("not a member of the cluster" is not one: a node that applies its own removal fails
        // writes it had already handed to Raft with it.)
        text.hasPrefix("CLUSTERDOWN ") || text.contains("this node is not the leader")
            || text.contains("the write was refused") || text.hasPrefix("EXECABORT ")
    }

    /// One single-command operation.
    private func perform(_ client: Int, _ slot: Int, _ connection: RESPClient, key: String, kind: TortureOperationKind, value: Int64?) -> TortureOperation {
        let command: [String]
        switch kind {
        case .read: command = ["GET", key]
        case .write, .add: command = ["SET", key, "\(value ?? 1)"]
        case .incr: command = ["INCR", key]
        case .swap: command = ["SET", key, "\(value ?? 0)", "GET"]
        case .cas: preconditionFailure("compare-and-set has its own path")
        }
        let id = newID()
        let invoke = now()
        var operation = TortureOperation(id: id, client: client, node: slot + 1, key: key, kind: kind,
                                         value: kind == .read || kind == .incr ? nil : value, invoke: invoke, complete: nil, outcome: .unknown)
        do {
            let reply = try connection.call(command, deadline: RESPClient.deadline(after: options.requestTimeoutSeconds))
            operation.complete = now()
            switch (kind, reply) {
            case (.write, .simple("OK")), (.add, .simple("OK")):
                operation.outcome = .ok
            case (.read, .bulk), (.swap, .bulk):
                // A value that is not a number is recorded as a result no order can explain.
                operation.outcome = .ok
                operation.result = Self.registerValue(reply) ?? Int64.min
                if operation.result == Int64.min { operation.error = "unexpected reply \(reply)" }
            case (.incr, .integer(let newValue)):
                operation.outcome = .ok
                operation.result = newValue
            case (_, .error(let text)):
                operation.outcome = kind == .read || Self.isRefusal(text) ? .fail : .unknown
                operation.error = text
                if operation.outcome == .unknown { operation.complete = nil }
            default:
                // An answer the command never gives: the checker reports every one (a read's is
                // also a value no order explains; a write's may or may not have taken effect).
                operation.outcome = kind == .read ? .ok : .unknown
                operation.result = kind == .read ? Int64.min : nil
                operation.error = "unexpected reply \(reply)"
                if operation.outcome == .unknown { operation.complete = nil }
            }
        } catch {
            operation.outcome = kind == .read ? .fail : .unknown
            operation.complete = kind == .read ? now() : nil
            operation.error = "\(error)"
        }
        return operation
    }

    /// A register's value from a GET-like reply: nil bulk is 0 (a missing key); nil if not a number.
    static func registerValue(_ reply: RESPValue) -> Int64? {
        switch reply {
        case .bulk(nil): 0
        case .bulk(let bytes?): Int64(String(decoding: bytes, as: UTF8.self))
        case .simple, .error, .integer, .array: nil
        }
    }

    /// WATCH key, GET key, MULTI, SET key value, EXEC: a compare-and-set of the value read.
    private func compareAndSet(_ client: Int, _ slot: Int, _ connection: RESPClient, key: String, value: Int64) -> TortureOperation {
        let id = newID()
        let invoke = now()
        var operation = TortureOperation(id: id, client: client, node: slot + 1, key: key, kind: .cas, value: value,
                                         invoke: invoke, complete: nil, outcome: .fail)
        let deadline = RESPClient.deadline(after: options.requestTimeoutSeconds)
        func abandon(_ why: String) -> TortureOperation {
            // Nothing that writes was sent: the operation did not take effect.
            connection.close()
            operation.complete = now()
            operation.outcome = .fail
            operation.error = why
            return operation
        }
        do {
            guard try connection.call(["WATCH", key], deadline: deadline) == .simple("OK") else { return abandon("WATCH refused") }
            let current = try connection.call(["GET", key], deadline: deadline)
            guard let expected = Self.registerValue(current) else { return abandon("GET answered \(current)") }
            operation.expected = expected
            guard try connection.call(["MULTI"], deadline: deadline) == .simple("OK"),
                  try connection.call(["SET", key, "\(value)"], deadline: deadline) == .simple("QUEUED") else { return abandon("MULTI or SET refused") }
        } catch {
            return abandon("\(error)")
        }
        do {
            let reply = try connection.call(["EXEC"], deadline: deadline)
            operation.complete = now()
            switch reply {
            case .array(nil):
                operation.outcome = .fail
                operation.error = "EXEC aborted: the key changed"
            case .array(let items?) where items == [.simple("OK")]:
                operation.outcome = .ok
                operation.result = 1
            case .error(let text):
                operation.outcome = Self.isRefusal(text) ? .fail : .unknown
                operation.error = text
            default:
                operation.outcome = .unknown
                operation.error = "unexpected reply to EXEC \(reply)"
            }
        } catch {
            operation.outcome = .unknown
            operation.error = "\(error)"
        }
        if operation.outcome == .unknown { operation.complete = nil }
        return operation
    }

    // MARK: - Faults

    /// Sleeps up to `seconds`, in short steps, until the run stops.
    private func hold(_ seconds: Double) {
        let deadline = now() + UInt64(max(0, seconds) * 1e9)
        while now() < deadline, !isStopping { usleep(20_000) }
    }

    private func seconds(_ range: ClosedRange<Double>, _ random: inout SeededRandom) -> Double {
        range.lowerBound + Double(random.next() >> 11) / Double(1 << 53) * (range.upperBound - range.lowerBound)
    }

    /// The fault thread: every kind once in a seeded order, then kinds at random (or the kinds in
    /// their given order, round and round), each after the cluster is healthy again (all nodes up and caught up) or a 30-second wait.
    private func injectFaults(_ kinds: [TortureFaultKind], until end: UInt64) {
        guard !kinds.isEmpty else { return }
        var random = SeededRandom(seed: options.seed)
        var plan = kinds
        if !options.inOrder { plan.shuffle(using: &random) }
        hold(seconds(0.5...1.5, &random) * max(1, options.faultIntervalSeconds))
        var injected = 0
        while now() < end, !isStopping {
            let kind: TortureFaultKind
            if options.inOrder {
                kind = kinds[injected % kinds.count]
            } else {
                kind = plan.isEmpty ? kinds[Int(random.next() % UInt64(kinds.count))] : plan.removeFirst()
            }
            injected += 1
            let healthy = cluster.waitUntilHealthy(seconds: 30) { self.isStopping || self.now() >= end }
            guard now() < end, !isStopping else { break }
            if !healthy {
                lock.withLock { notes.append(String(format: "the cluster was not healthy 30 s after a fault (at %.1f s)", Double(now()) / 1e9)) }
                if kind == .wipe { continue } // wiping a member while another is behind could lose acknowledged writes
            }
            if let fault = inject(kind, &random) {
                lock.withLock { faults.append(fault) }
                say("\(fault.kind.rawValue) \(fault.nodes.map(String.init).joined(separator: "→"))\(fault.leader ? " (leader)" : ""): \(fault.detail)")
            }
            hold(seconds(0.5...1.5, &random) * options.faultIntervalSeconds)
        }
    }

    /// Starts the node's process again and waits until it answers PING (30 s); false if it did
    /// not (its log says why).
    private func restart(_ node: TortureNode) -> Bool {
        guard (try? cluster.startProcess(node)) != nil else { return false }
        return cluster.waitUntilServing(node, seconds: 30)
    }

    /// Picks the target: the leader half the time (the faults that matter most), else any node.
    private func target(_ random: inout SeededRandom) -> (TortureNode, Bool) {
        let leader = cluster.leader()
        if let leader, random.chance(0.5) { return (leader.node, true) }
        let node = cluster.nodes[Int(random.next() % UInt64(cluster.nodes.count))]
        return (node, node === leader?.node)
    }

    /// Injects one fault, holds it, heals it; returns its record.
    private func inject(_ kind: TortureFaultKind, _ random: inout SeededRandom) -> TortureFault? {
        let count = cluster.nodes.count
        switch kind {
        case .kill:
            let (node, leader) = target(&random)
            let start = now()
            cluster.kill9(node)
            let down = seconds(0.2...3, &random)
            hold(down)
            let restarted = restart(node)
            return TortureFault(kind: .kill, nodes: [node.id], leader: leader, start: start, end: now(),
                                detail: String(format: "SIGKILL, restarted after %.2f s", down) + (restarted ? "" : " (restart FAILED)"))
        case .pause:
            let (node, leader) = target(&random)
            let start = now()
            cluster.pause(node)
            let paused = seconds(1...4, &random)
            hold(paused)
            cluster.resume(node)
            return TortureFault(kind: .pause, nodes: [node.id], leader: leader, start: start, end: now(),
                                detail: String(format: "SIGSTOP for %.2f s, then SIGCONT", paused))
        case .partition:
            var order = Array(0..<count)
            order.shuffle(using: &random)
            let leaderSlot = cluster.leader()?.node.slot
            if let leaderSlot, random.chance(0.5), let position = order.firstIndex(of: leaderSlot) { order.swapAt(0, position) }
            let minority = Int(random.next() % UInt64((count - 1) / 2)) + 1
            let small = Array(order.prefix(minority)), large = Array(order.dropFirst(minority))
            let start = now()
            for i in small { for j in large { cluster.setLink(from: i, to: j, cut: true); cluster.setLink(from: j, to: i, cut: true) } }
            let held = seconds(1...5, &random)
            hold(held)
            for i in small { for j in large { cluster.setLink(from: i, to: j, cut: false); cluster.setLink(from: j, to: i, cut: false) } }
            return TortureFault(kind: .partition, nodes: small.map { $0 + 1 }, leader: small.contains { $0 == leaderSlot }, start: start, end: now(),
                                detail: String(format: "{%@} cut from {%@} both ways for %.2f s",
                                               small.map { String($0 + 1) }.joined(separator: ","), large.map { String($0 + 1) }.joined(separator: ","), held))
        case .oneWay:
            let leaderSlot = cluster.leader()?.node.slot
            var from = Int(random.next() % UInt64(count))
            var to = (from + 1 + Int(random.next() % UInt64(count - 1))) % count
            if let leaderSlot, random.chance(0.5) {
                // The leader's messages to one follower lost, or one follower's to the leader.
                if random.chance(0.5) { from = leaderSlot; to = (leaderSlot + 1 + Int(random.next() % UInt64(count - 1))) % count }
                else { to = leaderSlot; from = (leaderSlot + 1 + Int(random.next() % UInt64(count - 1))) % count }
            }
            let start = now()
            cluster.setLink(from: from, to: to, cut: true)
            let held = seconds(1...5, &random)
            hold(held)
            cluster.setLink(from: from, to: to, cut: false)
            return TortureFault(kind: .oneWay, nodes: [from + 1, to + 1], leader: from == leaderSlot, start: start, end: now(),
                                detail: String(format: "node %d's messages to node %d dropped for %.2f s", from + 1, to + 1, held))
        case .wipe:
            // The documented procedure for a member whose data is lost: remove it, and let it join
            // again empty (as a learner, promoted once caught up). docs/node.md says why a wiped
            // voter cannot simply come back under its old membership.
            let (node, leader) = target(&random)
            let start = now()
            cluster.kill9(node)
            let removal = cluster.member(["REMOVE", "\(node.id)"], seconds: 30) { self.isStopping }
            guard removal == "OK" else {
                let restarted = restart(node)
                return TortureFault(kind: .wipe, nodes: [node.id], leader: leader, start: start, end: now(),
                                    detail: "SIGKILL; KEEL.MEMBER REMOVE not answered OK within 30 s (\(removal)); restarted on its data, NOT wiped"
                                        + (restarted ? "" : " (restart FAILED)"))
            }
            do { try cluster.wipe(node) } catch {
                _ = restart(node)
                return TortureFault(kind: .wipe, nodes: [node.id], leader: leader, start: start, end: now(), detail: "wipe FAILED: \(error)")
            }
            node.joins = true
            let restarted = restart(node)
            // The next fault waits until it is a voter again and has caught up.
            let deadline = now() + 60_000_000_000
            while now() < deadline, !isStopping, !cluster.isVoter(node) { usleep(100_000) }
            let voter = cluster.isVoter(node)
            let caughtUp = voter && cluster.waitUntilHealthy(seconds: max(1, Double(deadline &- now()) / 1e9)) { self.isStopping }
            return TortureFault(kind: .wipe, nodes: [node.id], leader: leader, start: start, end: now(),
                                detail: "SIGKILL, removed, data directory deleted, joined again empty" + (restarted ? "" : " (restart FAILED)")
                                    + (caughtUp ? ", a voter again and caught up" : voter ? ", a voter again but NOT caught up within 60 s" : ", NOT a voter again within 60 s"))
        case .disk:
            let (node, leader) = target(&random)
            let before = cluster.fullDiskReports(node)
            let start = now()
            let filled = cluster.fill(node)
            // Large writes make every node's log rotate into the full disk within the hold.
            let held = seconds(3...6, &random)
            let ballastEnd = now() + UInt64(held * 1e9)
            var ballast = 0
            let value = String(repeating: "b", count: 256 << 10)
            while now() < ballastEnd, !isStopping {
                let port = cluster.clientPorts[Int(random.next() % UInt64(count))]
                if let client = try? RESPClient(port: port, timeout: 1) {
                    if (try? client.call(["SET", "ballast", value], deadline: RESPClient.deadline(after: 1))) == .simple("OK") { ballast += 1 }
                    client.close()
                }
                hold(0.05)
            }
            cluster.free(node)
            let met = cluster.fullDiskReports(node) - before
            return TortureFault(kind: .disk, nodes: [node.id], leader: leader, start: start, end: now(),
                                detail: String(format: "filled (%d MiB) for %.2f s with %d ballast writes of 256 KiB; the node logged %d full-disk warning(s)",
                                               filled >> 20, held, ballast, met))
        }
    }

    // MARK: - The end

    /// Heals every fault, waits for the nodes to converge, and reads the end state.
    private func heal() -> TortureFinal {
        cluster.restoreAllLinks()
        for node in cluster.nodes {
            cluster.free(node)
            if node.paused { cluster.resume(node) }
            if !node.isRunning, !restart(node) { say("node \(node.id) does not start again (see \(node.logPath))") }
        }
        var problem: [String] = []
        if !cluster.waitUntilHealthy(seconds: 60) { problem.append("the cluster was not healthy 60 s after healing") }
        // Converged: every node at the same applied index with the same digest (polled: an entry
        // may still be on its way to one of them).
        var states: [TortureNodeState?] = []
        let deadline = RESPClient.deadline(after: 30)
        repeat {
            states = cluster.stateHashes()
            let known = states.compactMap { $0 }
            if known.count == states.count, Set(known.map { "\($0.appliedIndex)/\($0.digest)" }).count == 1 { break }
            usleep(200_000)
        } while DispatchTime.now().uptimeNanoseconds < deadline
        say("end state: " + states.enumerated().map { "node \($0.offset + 1) " + ($0.element.map { "applied \($0.appliedIndex) digest \($0.digest)" } ?? "no answer") }.joined(separator: "; "))
        for node in cluster.nodes {
            for line in cluster.stopReports(node) { problem.append("node \(node.id) stopped: \(line.suffix(300))") }
        }
        let adds = finalReads(&problem)
        return TortureFinal(nodes: states.compactMap { $0 }, adds: adds, problem: problem.isEmpty ? nil : problem.joined(separator: "; "))
    }

    /// Reads every register key (recorded as reads, client -1) and the add keys, through the
    /// leader, retrying for up to 30 s.
    private func finalReads(_ problem: inout [String]) -> [String]? {
        let keys = lock.withLock { Array(Set(operations.filter { $0.kind != .add }.map(\.key))).sorted() }
        let deadline = RESPClient.deadline(after: 30)
        var remaining = keys[...]
        var adds: [String]?
        while DispatchTime.now().uptimeNanoseconds < deadline, !remaining.isEmpty || adds == nil {
            guard let (leader, _) = cluster.leader(), let client = try? RESPClient(port: leader.clientPort, timeout: 1) else {
                usleep(200_000)
                continue
            }
            defer { client.close() }
            while !remaining.isEmpty {
                let chunk = Array(remaining.prefix(100))
                let invoke = now()
                guard case .array(let values?)? = try? client.call(["MGET"] + chunk, deadline: RESPClient.deadline(after: 5)), values.count == chunk.count else { break }
                let complete = now()
                for (key, value) in zip(chunk, values) {
                    let parsed = Self.registerValue(value)
                    record(TortureOperation(id: newID(), client: -1, node: leader.id, key: key, kind: .read, invoke: invoke, complete: complete,
                                            outcome: .ok, result: parsed ?? Int64.min, error: parsed == nil ? "unexpected reply \(value)" : nil))
                }
                remaining = remaining.dropFirst(chunk.count)
            }
            if remaining.isEmpty, adds == nil {
                if case .array(let items?)? = try? client.call(["KEYS", "a:*"], deadline: RESPClient.deadline(after: 10)) {
                    adds = items.compactMap(\.text)
                }
            }
        }
        if !remaining.isEmpty { problem.append("\(remaining.count) register keys could not be read at the end") }
        if adds == nil { problem.append("the add keys could not be read at the end") }
        return adds
    }
}
