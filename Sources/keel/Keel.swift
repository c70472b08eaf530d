// The `keel` command: wiring only. Each subcommand parses its arguments and calls into the library.

import ArgumentParser

@main
struct KeelCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "keel",
        abstract: "Keel: fault-tolerant state for Swift.",
        subcommands: [Serve.self, Member.self, Inspect.self, Verify.self, Recover.self, Bench.self, Sim.self, Torture.self])
}
