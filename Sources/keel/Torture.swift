// `keel torture`: fault injection on real `keel serve` processes, with a verdict (docs/torture.md).
// `keel torture check FILE` checks a history again.

import ArgumentParser
import Dispatch
import Foundation
import KeelTorture

struct Torture: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Break a real keel serve cluster with faults while clients run, and check the history.",
        discussion: """
        Starts a cluster on loopback, runs clients (GET, SET, INCR, SET…GET, WATCH/MULTI/EXEC, \
        and SETs of unique keys) while injecting faults from a seed (SIGKILL and restart, \
        SIGSTOP/SIGCONT, partitions and one-way link cuts through proxies, a wiped node rejoining, \
        a full disk on a tmpfs), heals everything, and checks: linearizability per key, no \
        acknowledged write lost, every node at the same state. Exit status 0: no violation; \
        1: a violation; 2: parts could not be checked. Flags after -- go to every keel serve:
          keel torture --nodes 3 --duration 60 -- --fsync everysec
        """,
        subcommands: [TortureRunCommand.self, TortureCheckCommand.self],
        defaultSubcommand: TortureRunCommand.self)
}

struct TortureRunCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "run", abstract: "Run a torture session (the default).")

    @Option(help: "Nodes: 1, 3 or 5.") var nodes = 3
    @Option(help: "Seconds of load and faults.") var duration: Double = 60
    @Option(help: "The seed of the plan (default: random, printed).") var seed: UInt64?
    @Option(help: "Client threads.") var clients = 8
    @Option(help: "Operations per second across all clients.") var rate: Double = 400
    @Option(help: "Register keys in use at a time.") var keys = 8
    @Option(name: .customLong("key-seconds"), help: "Seconds before clients move to fresh register keys.") var keySeconds: Double = 10
    @Option(help: "Fault kinds, comma-separated: kill, pause, partition, one-way, wipe, disk; all; or none.") var faults = "all"
    @Flag(name: .customLong("in-order"), help: "Inject the --faults kinds in the order given, round and round (default: each once in a seeded order, then at random).") var inOrder = false
    @Option(name: .customLong("fault-interval"), help: "Mean seconds between faults.") var faultInterval: Double = 2
    @Option(help: "Seconds a client waits for an answer (then the outcome is unknown).") var timeout: Double = 2
    @Option(help: "Where the history is written (JSON).") var history = "keel-torture-history.json"
    @Option(name: .customLong("work-dir"), help: "Where data directories and node logs go (default: a new directory under /tmp).") var workDir: String?
    @Flag(help: "Keep the work directory (it is kept anyway unless the run passed).") var keep = false
    @Option(name: .customLong("keel"), help: "The keel executable the nodes run (default: this one).") var keelPath: String?
    @Argument(parsing: .postTerminator, help: "Flags for every keel serve (after --).") var serveArguments: [String] = []

    func run() throws {
        var kinds: [TortureFaultKind] = []
        switch faults {
        case "all": kinds = TortureFaultKind.allCases
        case "none": kinds = []
        default:
            for name in faults.split(separator: ",") {
                guard let kind = TortureFaultKind(rawValue: name.trimmingCharacters(in: .whitespaces)) else {
                    throw ValidationError("unknown fault kind \(name) (kill, pause, partition, one-way, wipe, disk, all, none)")
                }
                kinds.append(kind)
            }
        }
        let seed = self.seed ?? UInt64.random(in: 1...UInt64(UInt32.max))
        let binary = keelPath ?? (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
        let work = workDir ?? NSTemporaryDirectory() + "keel-torture-\(getpid())"
        var options = TortureOptions(serveBinary: binary, workDirectory: work)
        options.nodes = nodes
        options.durationSeconds = duration
        options.seed = seed
        options.clients = clients
        options.rate = rate
        options.keys = keys
        options.keySeconds = keySeconds
        options.faults = kinds
        options.faultIntervalSeconds = faultInterval
        options.inOrder = inOrder
        options.requestTimeoutSeconds = timeout
        options.serveArguments = serveArguments
        options.progress = { FileHandle.standardOutput.write(Data(($0 + "\n").utf8)) }
        options.progress?("keel torture: seed \(seed), \(nodes) node(s), \(duration) s, faults \(kinds.map(\.rawValue).joined(separator: ",").isEmpty ? "none" : kinds.map(\.rawValue).joined(separator: ","))")
        let session: TortureRun
        do { session = try TortureRun(options: options) } catch {
            FileHandle.standardError.write(Data("keel torture: \(error)\n".utf8))
            throw ExitCode(2)
        }
        // Ctrl-C ends the run early (it still heals, checks and tears down).
        signal(SIGINT, SIG_IGN)
        let interrupt = DispatchSource.makeSignalSource(signal: SIGINT, queue: .global())
        interrupt.setEventHandler { session.stop() }
        interrupt.resume()
        let result: TortureHistory
        do { result = try session.run() } catch {
            FileHandle.standardError.write(Data("keel torture: \(error)\n".utf8))
            throw ExitCode(2)
        }
        interrupt.cancel()
        try result.encoded().write(to: URL(fileURLWithPath: history))
        let report = TortureChecker.check(result)
        print(report.rendered())
        print("history: \(history) (check it again with: keel torture check \(history))")
        if keep || report.exitCode != 0 {
            print("work directory kept: \(work) (node logs node*.log)")
        } else {
            try? FileManager.default.removeItem(atPath: work)
        }
        if report.exitCode != 0 { throw ExitCode(report.exitCode) }
    }
}

struct TortureCheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "check", abstract: "Check a history written by keel torture.")

    @Argument(help: "The history file.") var file: String

    func run() throws {
        guard let data = FileManager.default.contents(atPath: file) else { throw ValidationError("cannot read \(file)") }
        let history: TortureHistory
        do { history = try TortureHistory.decode(data) } catch {
            FileHandle.standardError.write(Data("keel torture check: \(error)\n".utf8))
            throw ExitCode(2)
        }
        let report = TortureChecker.check(history)
        print(report.rendered())
        if report.exitCode != 0 { throw ExitCode(report.exitCode) }
    }
}
