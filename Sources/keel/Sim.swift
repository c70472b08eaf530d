// `keel sim`: a seeded run of a simulated cluster (KeelSimulation). Wiring only.

import ArgumentParser
import KeelRaft
import KeelSimulation

struct Sim: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a seeded, deterministic simulation of a Raft cluster with faults, and check it.",
        discussion: "The same seed gives the same run, line for line. Exit status 1 when a checker finds a violation.")

    @Option(help: "The seed: a failing run is reproduced by its seed.")
    var seed: UInt64

    @Option(help: "Nodes in the cluster: 3 or 5.")
    var nodes = 3

    @Option(help: "Time units to simulate.")
    var steps = 20_000

    @Flag(help: "Print every message delivery.")
    var verbose = false

    @Flag(name: .customLong("lease-reads"), help: "Serve reads from the leader's lease instead of ReadIndex.")
    var leaseReads = false

    @Option(help: "Per time unit: probability that a node crashes (default 0.0004).")
    var crashRate: Double?

    @Option(help: "Per time unit: probability of a new partition (default 0.0004).")
    var partitionRate: Double?

    @Option(help: "Per time unit: probability that the network heals (default 0.002).")
    var healRate: Double?

    @Option(help: "Per time unit: probability that an idle client starts an operation (default 0.05).")
    var operationRate: Double?

    @Option(help: "Per time unit: probability of a membership change (default 0.0003).")
    var membershipRate: Double?

    @Option(help: "Switch on a deliberate fault in every core (vote-twice, commit-older-terms, read-without-read-index), to see the checkers catch it.")
    var fault: [String] = []

    func validate() throws {
        guard nodes == 3 || nodes == 5 else { throw ValidationError("--nodes must be 3 or 5") }
        guard steps > 0, steps <= 10_000_000 else { throw ValidationError("--steps must be between 1 and 10000000") }
        for rate in [crashRate, partitionRate, healRate, operationRate, membershipRate].compactMap({ $0 }) where !(0...1).contains(rate) {
            throw ValidationError("rates are probabilities between 0 and 1")
        }
        for name in fault where !["vote-twice", "commit-older-terms", "read-without-read-index"].contains(name) {
            throw ValidationError("unknown fault \(name)")
        }
    }

    func run() throws {
        var options = SimulationOptions(seed: seed)
        options.nodeCount = nodes
        options.steps = steps
        options.verbose = verbose
        options.leaseReads = leaseReads
        if let crashRate { options.crashRate = crashRate }
        if let partitionRate { options.partitionRate = partitionRate }
        if let healRate { options.healRate = healRate }
        if let operationRate { options.operationRate = operationRate }
        if let membershipRate { options.membershipChangeRate = membershipRate }
        options.raftFaults.voteTwiceInTerm = fault.contains("vote-twice")
        options.raftFaults.commitEntriesOfOlderTerms = fault.contains("commit-older-terms")
        options.raftFaults.readWithoutReadIndex = fault.contains("read-without-read-index")
        let result = Simulation(options: options).run()
        for line in result.lines { print(line) }
        if !result.violations.isEmpty { throw ExitCode(1) }
    }
}
