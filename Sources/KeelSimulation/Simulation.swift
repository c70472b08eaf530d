// A whole Raft cluster on one thread: N cores, their persisted logs (`MemoryRaftStorage`, written
// only at the persist step of each Ready), a simulated network, a logical clock, crashes that lose
// everything not persisted, partitions, leadership transfers, and clients reading, writing and
// incrementing keys through any node. Every choice comes from the seed: the same seed gives the
// same run, line for line. Checkers watch election safety, log matching, leader completeness and
// state machine safety as the run goes, and linearizability of the client history at the end.

import KeelCore
import KeelRaft

/// How a simulation runs.
public struct SimulationOptions: Sendable, Equatable {
    public var seed: UInt64
    /// 3 or 5 nodes.
    public var nodeCount = 3
    /// Time units to simulate.
    public var steps = 20_000
    /// Time units per Raft tick.
    public var tickInterval: UInt64 = 10
    public var network = NetworkFaults()
    /// Per time unit: probability that an up node crashes.
    public var crashRate = 0.0004
    /// Time units a crashed node stays down (at least; up to twice).
    public var downTime: UInt64 = 300
    /// Per time unit: probability of a new partition (symmetric or one-way).
    public var partitionRate = 0.0004
    /// Per time unit: probability that every cut link is restored.
    public var healRate = 0.002
    /// Per time unit: probability that the leader is asked to hand over.
    public var transferRate = 0.0002
    /// Per time unit: probability of a membership change (remove a voter, add a non-member back as
    /// a learner, or promote a learner), one server at a time.
    public var membershipChangeRate = 0.0003
    /// Concurrent clients, each with one operation at a time.
    public var clients = 4
    /// Keys the clients use.
    public var keys = 3
    /// Per time unit: probability that an idle client starts an operation.
    public var operationRate = 0.05
    /// Time units before a client gives up (the outcome is then unknown).
    public var operationTimeout: UInt64 = 500
    /// Take a snapshot (and compact) after this many applied entries.
    public var snapshotInterval = 60
    /// Faults switched on in every core (checker tests).
    public var raftFaults = RaftFaults()
    /// Serve reads from the leader's lease instead of ReadIndex.
    public var leaseReads = false
    /// Time units at the end without new faults, with every node restarted and the network healed,
    /// after which every node must have caught up (the liveness check).
    public var quietSteps = 3_000
    /// Print every message delivery too (long).
    public var verbose = false

    public init(seed: UInt64) { self.seed = seed }

    var description: String {
        var faults: [String] = []
        if raftFaults.voteTwiceInTerm { faults.append("vote-twice") }
        if raftFaults.commitEntriesOfOlderTerms { faults.append("commit-older-terms") }
        if raftFaults.readWithoutReadIndex { faults.append("read-without-read-index") }
        return "seed \(seed), nodes \(nodeCount), steps \(steps), tick every \(tickInterval), drop \(network.dropRate), "
            + "duplicate \(network.duplicateRate), delay 1...\(network.delayMax), crash \(crashRate), down \(downTime), "
            + "partition \(partitionRate), heal \(healRate), transfer \(transferRate), membership \(membershipChangeRate), clients \(clients), keys \(keys), "
            + "timeout \(operationTimeout), snapshot every \(snapshotInterval), reads \(leaseReads ? "lease" : "read-index"), "
            + "quiet end \(quietSteps), raft faults \(faults.isEmpty ? "none" : faults.joined(separator: ","))"
    }
}

/// What a simulation found.
public struct SimulationResult: Sendable {
    /// Every line printed, starting with the seed and options.
    public var lines: [String]
    /// Safety and linearizability violations (empty when the run is clean).
    public var violations: [String]
    /// The client history.
    public var history: [HistoryOperation]
    /// Linearizability verdicts by key.
    public var verdicts: [(key: String, verdict: LinearizabilityVerdict)]
    /// Committed entries (the highest commit index seen).
    public var committed: LogIndex
}

/// Runs a seeded cluster.
public final class Simulation {
    final class Node {
        let id: NodeID
        var storage: MemoryRaftStorage
        var raft: RaftNode?
        var machine: KeyValueMachine
        var appliedIndex = LogIndex.zero
        var appliedMembership: Membership
        var incoming: [UInt8] = []
        var waitingWrites: [UInt64: Int] = [:] // operation id -> history position
        var waitingReads: [[UInt8]: Int] = [:] // read context -> history position
        var readStates: [ReadState] = []
        var downUntil: UInt64 = 0
        var restarts = 0

        init(id: NodeID, membership: Membership, keys: Int) {
            self.id = id
            storage = MemoryRaftStorage(membership: membership)
            machine = KeyValueMachine(keys: keys)
            appliedMembership = membership
        }
    }

    struct Client {
        var busy: Int? // history position
        var deadline: UInt64 = 0
    }

    let options: SimulationOptions
    private var random: SeededRandom
    private var network: SimulatedNetwork
    private var nodes: [Node] = []
    private var clients: [Client]
    private var history: [HistoryOperation] = []
    private var pending: Set<Int> = [] // history positions not yet completed
    private var now: UInt64 = 0
    /// Orders history events exactly: within one time unit, completions and invocations still
    /// happen one after another, and the checker must see that order.
    private var eventClock: UInt64 = 0
    private var quietStarted = false
    private var nextOperation: UInt64 = 1
    private var lines: [String] = []
    private var violations: [String] = []
    private var leadersByTerm: [Term: NodeID] = [:]
    private var appliedEntries: [LogIndex: (term: Term, data: [UInt8])] = [:]
    private var highestCommit = LogIndex.zero
    private var lastLeaderSeen: [NodeID: Term] = [:]

    public init(options: SimulationOptions) {
        self.options = options
        random = SeededRandom(seed: options.seed)
        network = SimulatedNetwork(faults: options.network)
        clients = Array(repeating: Client(), count: options.clients)
        let membership = Membership(voters: (1...UInt64(options.nodeCount)).map { NodeID($0) })
        for id in membership.voters { nodes.append(Node(id: id, membership: membership, keys: options.keys)) }
    }

    /// Runs to the end and checks the history.
    public func run() -> SimulationResult {
        log("keel sim: \(options.description)")
        for node in nodes { start(node) }
        // The run stops at the first violation: past it the cores' own invariants no longer hold.
        while now < UInt64(options.steps) && violations.isEmpty {
            now += 1
            step()
        }
        checkLogMatching()
        if violations.isEmpty { checkLiveness() }
        for position in pending.sorted() { history[position].outcome = .unknown }
        let verdicts = LinearizabilityChecker.check(history.map { operation in
            var copy = operation
            if copy.outcome == .unknown { copy.complete = UInt64.max }
            return copy
        })
        for (key, verdict) in verdicts {
            let count = history.filter { $0.key == key }.count
            log("linearizability: key \(key): \(verdict) (\(count) operations)")
            if case .violation = verdict { violation("linearizability: key \(key): \(verdict)") }
        }
        let ok = history.filter { if case .ok = $0.outcome { return true } else { return false } }.count
        let failed = history.filter { $0.outcome == .fail }.count
        let unknown = history.filter { $0.outcome == .unknown }.count
        log("operations: \(history.count) (ok \(ok), fail \(failed), unknown \(unknown)); committed index \(highestCommit); "
            + "messages sent \(network.sent), dropped \(network.dropped); restarts \(nodes.map(\.restarts).reduce(0, +))")
        log(violations.isEmpty ? "result: ok" : "result: \(violations.count) VIOLATION(S)")
        return SimulationResult(lines: lines, violations: violations, history: history, verdicts: verdicts, committed: highestCommit)
    }

    // MARK: - One time unit

    private func step() {
        // Every input of this time unit first, then one Ready per node: several messages (and a
        // tick) land in one Ready, as they do in a runtime that steps what arrived before persisting.
        var touched = Set<NodeID>()
        for message in network.due(at: now) {
            guard let node = nodes.first(where: { $0.id == message.to }), let raft = node.raft else { continue }
            if options.verbose { log("deliver \(message)") }
            raft.step(message)
            touched.insert(node.id)
        }
        if now % options.tickInterval == 0 {
            for node in nodes {
                guard let raft = node.raft else { continue }
                raft.tick()
                touched.insert(node.id)
            }
        }
        for node in nodes where touched.contains(node.id) && violations.isEmpty { drain(node) }
        guard violations.isEmpty else { return }
        injectFaults()
        runClients()
    }

    private var inQuietEnd: Bool { now + UInt64(options.quietSteps) > UInt64(options.steps) }

    private func injectFaults() {
        if inQuietEnd {
            if !quietStarted {
                quietStarted = true
                network.heal()
                for node in nodes where node.raft == nil { node.downUntil = now }
                log("quiet: faults stop, network healed, every node restarted")
            }
            for node in nodes where node.raft == nil {
                start(node)
                log("restart \(node.id)")
            }
            return
        }
        for node in nodes where node.raft == nil && now >= node.downUntil {
            start(node)
            log("restart \(node.id)")
        }
        if random.chance(options.crashRate * Double(nodes.count)) {
            let up = nodes.filter { $0.raft != nil }
            if !up.isEmpty {
                let node = up[Int(random.next() % UInt64(up.count))]
                crash(node)
            }
        }
        if random.chance(options.partitionRate) {
            let ids = nodes.map(\.id)
            if random.chance(0.5) {
                var groupA: [NodeID] = []
                var groupB: [NodeID] = []
                for id in ids { if random.chance(0.5) { groupA.append(id) } else { groupB.append(id) } }
                if !groupA.isEmpty && !groupB.isEmpty {
                    network.partition(groupA, groupB)
                    log("partition \(groupA.map(\.rawValue)) | \(groupB.map(\.rawValue))")
                }
            } else {
                let from = ids[Int(random.next() % UInt64(ids.count))]
                let to = ids[Int(random.next() % UInt64(ids.count))]
                if from != to {
                    network.cutOneWay(from: from, to: to)
                    log("cut \(from) -> \(to)")
                }
            }
        }
        if !network.cut.isEmpty && random.chance(options.healRate) {
            network.heal()
            log("heal")
        }
        if random.chance(options.membershipChangeRate), let leader = nodes.first(where: { $0.raft?.status.role == .leader }), let raft = leader.raft {
            let membership = raft.status.membership
            let node = nodes[Int(random.next() % UInt64(nodes.count))].id
            let change: ConfigurationChange
            if membership.isLearner(node) {
                change = ConfigurationChange(.promoteLearner, node)
            } else if !membership.contains(node) {
                change = ConfigurationChange(.addLearner, node)
            } else if membership.voters.count > 2 {
                change = ConfigurationChange(.remove, node)
            } else {
                change = ConfigurationChange(.addLearner, node) // refused below: already a voter
            }
            do {
                try raft.proposeConfigurationChange(change)
                log("propose \(change) at leader \(leader.id)")
            } catch {
                log("propose \(change) at leader \(leader.id) refused: \(error)")
            }
            drain(leader)
        }
        if random.chance(options.transferRate), let leader = nodes.first(where: { $0.raft?.status.role == .leader }), let raft = leader.raft {
            let others = raft.status.membership.voters.filter { $0 != leader.id }
            if !others.isEmpty {
                let target = others[Int(random.next() % UInt64(others.count))]
                do {
                    try raft.transferLeadership(to: target)
                    log("transfer \(leader.id) -> \(target)")
                } catch {
                    log("transfer \(leader.id) -> \(target) refused: \(error)")
                }
                drain(leader)
            }
        }
    }

    private func start(_ node: Node) {
        // Restart from what was persisted: the snapshot's state, then the log replays from there.
        node.machine = KeyValueMachine(decoding: node.storage.snapshotData) ?? KeyValueMachine(keys: options.keys)
        node.appliedIndex = node.storage.snapshot.index
        node.appliedMembership = node.storage.snapshot.membership
        node.incoming = []
        node.waitingWrites = [:]
        node.waitingReads = [:]
        node.readStates = []
        var configuration = RaftConfiguration(id: node.id)
        configuration.faults = options.raftFaults
        configuration.snapshotChunkSizeMax = 1024
        configuration.readConsistency = options.leaseReads ? .lease : .readIndex
        do {
            node.raft = try RaftNode(configuration: configuration, storage: node.storage, randomSeed: random.next())
        } catch {
            violation("node \(node.id) could not start: \(error)")
        }
        if node.raft != nil { drain(node) }
    }

    private func crash(_ node: Node) {
        node.raft = nil
        node.restarts += 1
        node.downUntil = now + options.downTime + random.next() % options.downTime
        network.dropAll(to: node.id)
        log("crash \(node.id)")
    }

    // MARK: - The caller's loop (persist, send, apply, advance)

    private func drain(_ node: Node) {
        guard let raft = node.raft else { return }
        var rounds = 0
        while raft.hasReady {
            rounds += 1
            if rounds > 1000 {
                violation("node \(node.id) keeps producing work (livelock)")
                return
            }
            let ready = raft.ready()
            // 1. Persist.
            if let hardState = ready.hardState { node.storage.setHardState(hardState) }
            for chunk in ready.incomingSnapshotChunks {
                if chunk.offset == 0 { node.incoming = [] }
                if chunk.offset == node.incoming.count { node.incoming += chunk.data }
            }
            if let snapshot = ready.snapshot {
                guard let machine = KeyValueMachine(decoding: node.incoming) else {
                    violation("node \(node.id) received a snapshot that does not decode")
                    return
                }
                node.storage.applySnapshot(snapshot, data: node.incoming)
                node.machine = machine
                node.appliedIndex = snapshot.index
                node.appliedMembership = snapshot.membership
                node.incoming = []
            }
            node.storage.append(ready.entries)
            // 2. Send.
            for message in ready.messages { network.send(message, now: now, random: &random) }
            // 3. Apply.
            for entry in ready.committedEntries { apply(entry, on: node) }
            node.readStates += ready.readStates
            if let softState = ready.softState, softState.role == .leader { leaderElected(node) }
            raft.advance(ready)
            for problem in raft.invariantViolations() { violation("invariant on node \(node.id): \(problem)") }
            if !violations.isEmpty { return }
            serveReads(node)
            if Int(node.appliedIndex.rawValue - node.storage.snapshot.index.rawValue) >= options.snapshotInterval {
                node.storage.createSnapshot(at: node.appliedIndex, membership: node.appliedMembership, data: node.machine.encoded)
            }
        }
        let commit = raft.status.commitIndex
        if commit > highestCommit { highestCommit = commit }
    }

    private func apply(_ entry: Entry, on node: Node) {
        guard entry.index == node.appliedIndex.next else {
            violation("node \(node.id) applied index \(entry.index) after \(node.appliedIndex)")
            return
        }
        node.appliedIndex = entry.index
        if let known = appliedEntries[entry.index] {
            if known.term != entry.term || known.data != entry.data {
                violation("state machine safety: index \(entry.index) applied as \(known.term)/\(known.data.count)B elsewhere but \(entry.term)/\(entry.data.count)B on node \(node.id)")
            }
        } else {
            appliedEntries[entry.index] = (entry.term, entry.data)
        }
        switch entry.kind {
        case .configurationChange:
            if let change = ConfigurationChange(decoding: entry.data) { node.appliedMembership = node.appliedMembership.applying(change) }
        case .normal:
            guard !entry.data.isEmpty, let command = KeyValueCommand(decoding: entry.data) else { return }
            let result = node.machine.apply(command)
            if let position = node.waitingWrites.removeValue(forKey: command.operation), let result {
                complete(position, .ok(command.kind == .increment ? result : nil))
            }
        }
    }

    private func serveReads(_ node: Node) {
        node.readStates.removeAll { state in
            guard state.index <= node.appliedIndex else { return false }
            if let position = node.waitingReads.removeValue(forKey: state.context) {
                let key = UInt8(history[position].key) ?? 0
                complete(position, .ok(node.machine.value(key)))
            }
            return true
        }
    }

    // MARK: - Clients

    private func runClients() {
        for client in clients.indices {
            if let position = clients[client].busy {
                if !pending.contains(position) {
                    clients[client].busy = nil
                } else if now >= clients[client].deadline {
                    complete(position, .unknown)
                    clients[client].busy = nil
                }
                continue
            }
            guard random.chance(options.operationRate) else { continue }
            // No new operations in the last stretch, so that the liveness check sees a settled cluster.
            guard now + UInt64(options.quietSteps / 3) <= UInt64(options.steps) else { continue }
            let up = nodes.filter { $0.raft != nil }
            guard !up.isEmpty else { continue }
            let node = up[Int(random.next() % UInt64(up.count))]
            let key = UInt8(random.next() % UInt64(options.keys))
            let operationID = nextOperation
            nextOperation += 1
            let roll = random.next() % 10
            let operation: RegisterOperation = roll < 4 ? .read : (roll < 7 ? .write(Int64(operationID)) : .increment)
            let position = history.count
            eventClock += 1
            history.append(HistoryOperation(id: Int(operationID), client: client, key: String(key), operation: operation,
                                            invoke: eventClock, complete: eventClock, outcome: .unknown))
            pending.insert(position)
            clients[client].busy = position
            clients[client].deadline = now + options.operationTimeout
            guard let raft = node.raft else { continue }
            do {
                switch operation {
                case .read:
                    var context = ByteWriter(capacity: 8)
                    context.write(operationID)
                    node.waitingReads[context.bytes] = position
                    try raft.readIndex(context: context.bytes)
                case .write(let value):
                    node.waitingWrites[operationID] = position
                    try raft.propose(KeyValueCommand(operation: operationID, kind: .write, key: key, value: value).encoded)
                case .increment:
                    node.waitingWrites[operationID] = position
                    try raft.propose(KeyValueCommand(operation: operationID, kind: .increment, key: key, value: 0).encoded)
                case .swap, .compareAndSet:
                    preconditionFailure("the simulator's clients do not generate \(operation)")
                }
            } catch {
                // Refused before anything was logged: it definitely did not happen.
                complete(position, .fail)
            }
            drain(node)
        }
    }

    private func complete(_ position: Int, _ outcome: OperationOutcome) {
        guard pending.remove(position) != nil else { return }
        eventClock += 1
        history[position].outcome = outcome
        history[position].complete = eventClock
    }

    // MARK: - Checkers

    private func leaderElected(_ node: Node) {
        guard let raft = node.raft else { return }
        let status = raft.status
        if let other = leadersByTerm[status.term], other != node.id {
            violation("election safety: nodes \(other) and \(node.id) both lead term \(status.term)")
        }
        leadersByTerm[status.term] = node.id
        if lastLeaderSeen[node.id] != status.term {
            lastLeaderSeen[node.id] = status.term
            log("leader \(node.id) term \(status.term)")
        }
        // Leader completeness (§5.4): every entry applied anywhere must be in the new leader's log.
        for (index, known) in appliedEntries where index > node.storage.snapshot.index {
            guard let term = raft.term(at: index) else {
                violation("leader completeness: leader \(node.id) of term \(status.term) lacks committed entry \(index)")
                continue
            }
            if term != known.term {
                violation("leader completeness: leader \(node.id) of term \(status.term) has term \(term) at committed index \(index), not \(known.term)")
            }
        }
    }

    /// Liveness: after the quiet end (no faults, network healed, every node up, no new operations
    /// for its last third), every node must have caught up with the highest commit index.
    private func checkLiveness() {
        guard options.quietSteps > 0 else { return }
        let leaders = nodes.filter { $0.raft?.status.role == .leader }
        if leaders.isEmpty { violation("liveness: no leader after a quiet period of \(options.quietSteps)") }
        let highest = nodes.compactMap { $0.raft?.status.commitIndex }.max() ?? .zero
        let members = leaders.first?.raft?.status.membership
        for node in nodes {
            // A node removed from the cluster is no longer kept up to date.
            guard let status = node.raft?.status, members?.contains(node.id) ?? true else { continue }
            if status.commitIndex < highest || node.appliedIndex < highest {
                violation("liveness: node \(node.id) has commit \(status.commitIndex) and applied \(node.appliedIndex) while the cluster committed \(highest), after a quiet period of \(options.quietSteps)")
            }
        }
    }

    /// Log matching (§5.3): if two logs hold an entry with the same index and term, the logs are
    /// identical up to it.
    private func checkLogMatching() {
        for a in 0..<nodes.count {
            for b in (a + 1)..<nodes.count {
                let left = nodes[a].storage
                let right = nodes[b].storage
                let low = max(left.firstIndex, right.firstIndex)
                let high = min(left.lastIndex, right.lastIndex)
                guard low <= high else { continue }
                var index = high
                var matched = false
                while index >= low {
                    let l = left.entries[Int(index.rawValue - left.snapshot.index.rawValue - 1)]
                    let r = right.entries[Int(index.rawValue - right.snapshot.index.rawValue - 1)]
                    if matched {
                        if l != r { violation("log matching: nodes \(nodes[a].id) and \(nodes[b].id) agree at a later index but differ at \(index)") }
                    } else if l.term == r.term {
                        matched = true
                        if l != r { violation("log matching: nodes \(nodes[a].id) and \(nodes[b].id) hold different entries \(index) of term \(l.term)") }
                    }
                    if index == low { break }
                    index = LogIndex(index.rawValue - 1)
                }
            }
        }
    }

    private func violation(_ text: String) {
        violations.append(text)
        log("VIOLATION at t=\(now): \(text)")
    }

    private func log(_ text: String) {
        lines.append(now == 0 ? text : "t=\(now) \(text)")
    }
}
