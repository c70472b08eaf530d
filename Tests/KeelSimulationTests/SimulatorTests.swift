import Foundation
import KeelRaft
import KeelSimulation
import Testing

/// The fixed seeds CI runs (at least 200), and the seeds that must expose each deliberate fault.
enum Seeds {
    static let threeNodes: [UInt64] = Array(1...200)
    static let fiveNodes: [UInt64] = Array(1...40)
    /// Aggressive faults: more crashes, partitions and heals.
    static let aggressive: [UInt64] = Array(1001...1040)
}

func aggressive(_ options: inout SimulationOptions) {
    options.crashRate = 0.004
    options.partitionRate = 0.002
    options.healRate = 0.01
}

@Suite("Simulator")
struct SimulatorTests {
    @Test("the fixed list of 3-node seeds runs without a violation", arguments: Seeds.threeNodes)
    func threeNodeSeeds(seed: UInt64) {
        var options = SimulationOptions(seed: seed)
        options.steps = 10_000
        let result = Simulation(options: options).run()
        #expect(result.violations.isEmpty, "keel sim --seed \(seed) --steps 10000: \(result.violations)")
        #expect(result.committed > .zero, "seed \(seed) made progress")
    }

    @Test("the fixed list of 5-node seeds runs without a violation", arguments: Seeds.fiveNodes)
    func fiveNodeSeeds(seed: UInt64) {
        var options = SimulationOptions(seed: seed)
        options.nodeCount = 5
        options.steps = 10_000
        let result = Simulation(options: options).run()
        #expect(result.violations.isEmpty, "keel sim --seed \(seed) --nodes 5 --steps 10000: \(result.violations)")
    }

    @Test("seeds with heavy crashes and partitions run without a violation (odd seeds with lease reads)", arguments: Seeds.aggressive)
    func aggressiveSeeds(seed: UInt64) {
        var options = SimulationOptions(seed: seed)
        options.steps = 20_000
        aggressive(&options)
        options.leaseReads = seed % 2 == 1
        let result = Simulation(options: options).run()
        #expect(result.violations.isEmpty, "keel sim --seed \(seed) --steps 20000 --crash-rate 0.004 --partition-rate 0.002 --heal-rate 0.01\(options.leaseReads ? " --lease-reads" : ""): \(result.violations)")
    }

    @Test("seeds with frequent membership changes run without a violation", arguments: Array(UInt64(2001)...2020))
    func membershipChurnSeeds(seed: UInt64) {
        var options = SimulationOptions(seed: seed)
        options.steps = 20_000
        options.membershipChangeRate = 0.003
        options.nodeCount = seed % 2 == 0 ? 3 : 5
        let result = Simulation(options: options).run()
        #expect(result.violations.isEmpty, "keel sim --seed \(seed) --nodes \(options.nodeCount) --steps 20000 --membership-rate 0.003: \(result.violations)")
        #expect(result.lines.contains { $0.contains("propose remove") }, "seed \(seed) changed the membership")
    }

    @Test("a time-boxed sweep of random seeds (printed, so a failure is a seed number)")
    func randomSweep() {
        let budget = Double(ProcessInfo.processInfo.environment["KEEL_SIM_SWEEP_SECONDS"] ?? "") ?? 15
        let started = Date()
        var seeds: [UInt64] = []
        var generator = SystemRandomNumberGenerator()
        while Date().timeIntervalSince(started) < budget {
            let seed = UInt64.random(in: 1...UInt64(1) << 48, using: &generator)
            seeds.append(seed)
            var options = SimulationOptions(seed: seed)
            options.steps = 10_000
            options.nodeCount = seed % 2 == 0 ? 3 : 5
            let result = Simulation(options: options).run()
            #expect(result.violations.isEmpty, "keel sim --seed \(seed) --nodes \(options.nodeCount) --steps 10000: \(result.violations)")
        }
        print("random sweep ran \(seeds.count) seeds: \(seeds.map(String.init).joined(separator: " "))")
        #expect(!seeds.isEmpty)
    }

    @Test("the same seed gives the same run, line for line; another seed gives another")
    func determinism() {
        var options = SimulationOptions(seed: 77)
        options.steps = 8_000
        let first = Simulation(options: options).run()
        let second = Simulation(options: options).run()
        #expect(first.lines == second.lines)
        #expect(first.history == second.history)
        options.seed = 78
        #expect(Simulation(options: options).run().lines != first.lines)
        #expect(first.lines.first?.hasPrefix("keel sim: seed 77, nodes 3") == true, "the seed and options come first")
    }

    @Test("the election safety checker catches a node that votes twice in a term")
    func catchesDoubleVote() {
        let caught = [UInt64(55), 63, 70, 71].contains { seed in
            var options = SimulationOptions(seed: seed)
            options.raftFaults.voteTwiceInTerm = true
            return Simulation(options: options).run().violations.contains { $0.hasPrefix("election safety") }
        }
        #expect(caught)
    }

    @Test("the safety checkers catch a leader that commits by counting entries of older terms")
    func catchesOlderTermCommit() {
        let caught = [UInt64(1383), 3584, 4462].contains { seed in
            var options = SimulationOptions(seed: seed)
            options.steps = 40_000
            aggressive(&options)
            options.raftFaults.commitEntriesOfOlderTerms = true
            let violations = Simulation(options: options).run().violations
            return violations.contains { $0.hasPrefix("leader completeness") || $0.hasPrefix("state machine safety") }
        }
        #expect(caught)
    }

    @Test("the linearizability checker catches reads served without a read index")
    func catchesStaleReads() {
        let caught = [UInt64(1), 2, 3].contains { seed in
            var options = SimulationOptions(seed: seed)
            options.raftFaults.readWithoutReadIndex = true
            return Simulation(options: options).run().violations.contains { $0.hasPrefix("linearizability") }
        }
        #expect(caught)
    }

    @Test("keel sim prints the seed and options first, and exits non-zero on a violation")
    func command() throws {
        let clean = try runKeel(["sim", "--seed", "5", "--steps", "3000"])
        #expect(clean.status == 0)
        #expect(clean.output.hasPrefix("keel sim: seed 5, nodes 3, steps 3000"))
        #expect(clean.output.contains("result: ok"))
        let faulty = try runKeel(["sim", "--seed", "1", "--fault", "read-without-read-index"])
        #expect(faulty.status == 1 && faulty.output.contains("VIOLATION"))
        let bad = try runKeel(["sim", "--seed", "1", "--nodes", "4"])
        #expect(bad.status != 0 && bad.output.contains("--nodes must be 3 or 5"))
        let badBench = try runKeel(["bench", "raft", "--nodes", "0"])
        #expect(badBench.status != 0 && badBench.output.contains("--nodes must be between 1 and 9"))
        let badSize = try runKeel(["bench", "append", "--size=-1"])
        #expect(badSize.status != 0 && badSize.output.contains("--size must be between"))
    }
}

func runKeel(_ arguments: [String]) throws -> (status: Int32, output: String) {
    var url = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
    var directory = FileManager.default.currentDirectoryPath + "/.build/debug"
    while url.path != "/" {
        url.deleteLastPathComponent()
        if FileManager.default.isExecutableFile(atPath: url.appendingPathComponent("keel").path) {
            directory = url.path
            break
        }
    }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: directory + "/keel")
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    try process.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: data, as: UTF8.self))
}
