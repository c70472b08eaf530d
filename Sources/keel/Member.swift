// `keel member`: membership of a running cluster, through any member's client port.

import ArgumentParser
import Foundation

struct Member: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List, add, remove or promote members of a running cluster (through any member).",
        discussion: """
        keel member list
        keel member add 4 10.0.0.4:16379            (a learner; promoted once caught up; --voter adds a voter)
        keel member promote 4
        keel member remove 4
        """)

    @Option(help: "A member's client address.") var server = "127.0.0.1:6379"
    @Option(help: "The password, when the server has one.") var password: String?
    @Flag(help: "With add: add a voter at once instead of a learner.") var voter = false
    @Argument(help: "list, add ID HOST:PEERPORT, promote ID or remove ID.") var words: [String]

    func validate() throws {
        guard let action = words.first else { throw ValidationError("say list, add, promote or remove") }
        switch (action, words.count) {
        case ("list", 1): break
        case ("add", 3):
            guard UInt64(words[1]).map({ $0 > 0 }) == true, words[2].contains(":") else { throw ValidationError("add takes ID HOST:PEERPORT") }
        case ("promote", 2), ("remove", 2):
            guard UInt64(words[1]).map({ $0 > 0 }) == true else { throw ValidationError("\(action) takes a node id") }
        default:
            throw ValidationError("say list, add ID HOST:PEERPORT, promote ID or remove ID")
        }
        guard server.contains(":") else { throw ValidationError("--server takes HOST:PORT") }
    }

    func run() throws {
        let colon = server.lastIndex(of: ":")!
        guard let port = Int(server[server.index(after: colon)...]) else { throw ValidationError("--server takes HOST:PORT") }
        do {
            let client = try RESPClient(host: String(server[..<colon]), port: port)
            if let password { _ = try client.call(["AUTH", password]) }
            var request = ["KEEL.MEMBER", words[0].uppercased()] + words.dropFirst()
            if words[0] == "add" { request.append(voter ? "VOTER" : "LEARNER") }
            for line in try client.call(request) { print(line) }
        } catch {
            FileHandle.standardError.write(Data("keel member: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }
}
