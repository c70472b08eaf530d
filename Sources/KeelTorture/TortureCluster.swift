// The cluster under torture: real `keel serve` processes on loopback, each peer link through its
// own proxy (`LinkProxy`), each data directory optionally on its own small tmpfs. It starts,
// kills, pauses, wipes and restarts nodes, cuts and restores links, fills and frees disks, and asks
// nodes for their role and indexes (INFO) and state digests (KEEL.STATEHASH).

import Foundation
import Glibc
import NIOCore
import NIOPosix

/// One node's process and where it lives.
final class TortureNode {
    let slot: Int
    let clientPort: Int
    let peerPort: Int
    /// The tmpfs mount point, when the node's data is on one.
    var mountPoint: String?
    let dataDirectory: String
    let logPath: String
    var process: Process?
    var paused = false
    /// Whether the node joined through `--join` (after a wipe): it is started that way from
    /// then on (harmless once it is a member; needed if it died before it learned anything).
    var joins = false
    /// A file filling the node's disk, while one does.
    var filler: String?

    init(slot: Int, clientPort: Int, peerPort: Int, dataDirectory: String, logPath: String) {
        self.slot = slot
        self.clientPort = clientPort
        self.peerPort = peerPort
        self.dataDirectory = dataDirectory
        self.logPath = logPath
    }

    var id: Int { slot + 1 }
    var isRunning: Bool { process?.isRunning ?? false }
}

/// What INFO's keel section says.
struct NodeRole {
    var role: String
    var term: UInt64
    var commitIndex: UInt64
    var appliedIndex: UInt64
}

/// Starts and breaks the cluster. Used from the fault thread and the final phase only (one at a
/// time); the client threads read `clientPorts` only.
/// Loopback ports for servers a test starts: free at the moment, below the kernel's ephemeral
/// range, so an outgoing connection made meanwhile (by anything on the machine) cannot take one
/// between the choice and the server's bind.
public enum LoopbackPorts {
    public static func free(_ count: Int) throws -> [Int] { try TortureCluster.freePorts(count) }
}

final class TortureCluster: @unchecked Sendable {
    // @unchecked Sendable: the mutable node table is used by one thread at a time (the fault
    // thread during the run, the main thread before and after it); `clientPorts` never changes.
    let options: TortureOptions
    let nodes: [TortureNode]
    let clientPorts: [Int]
    /// proxies[i][j]: the link node i dials to reach node j (nil on the diagonal).
    let proxies: [[LinkProxy?]]
    private let group: MultiThreadedEventLoopGroup
    private(set) var skipped: [String] = []
    private(set) var diskFaultsPossible = false

    init(options: TortureOptions) throws {
        self.options = options
        group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let count = options.nodes
        let ports = try Self.freePorts(2 * count)
        var nodes: [TortureNode] = []
        for slot in 0..<count {
            let home = "\(options.workDirectory)/node\(slot + 1)"
            nodes.append(TortureNode(slot: slot, clientPort: ports[2 * slot], peerPort: ports[2 * slot + 1],
                                     dataDirectory: home + "/data", logPath: "\(options.workDirectory)/node\(slot + 1).log"))
        }
        self.nodes = nodes
        clientPorts = nodes.map(\.clientPort)
        var proxies: [[LinkProxy?]] = Array(repeating: Array(repeating: nil, count: count), count: count)
        for i in 0..<count {
            for j in 0..<count where i != j {
                let proxy = LinkProxy(target: nodes[j].peerPort, group: group)
                try proxy.start()
                proxies[i][j] = proxy
            }
        }
        self.proxies = proxies
    }

    /// Ports free at the moment, below the kernel's ephemeral range (so no outgoing connection
    /// takes a stopped node's port while it is down), chosen at random and checked by binding.
    static func freePorts(_ count: Int) throws -> [Int] {
        var low = 32768
        if let text = try? String(contentsOfFile: "/proc/sys/net/ipv4/ip_local_port_range", encoding: .utf8),
           let first = text.split(whereSeparator: \.isWhitespace).first, let value = Int(first) { low = value }
        guard low > 11_000 else { return try ephemeralPorts(count) }
        var ports: [Int] = []
        var attempts = 0
        while ports.count < count {
            attempts += 1
            guard attempts < 10_000 else { throw TortureError.setup("no free port below \(low)") }
            let port = Int.random(in: 10_000..<low)
            if !ports.contains(port), canBind(port) { ports.append(port) }
        }
        return ports
    }

    static func canBind(_ port: Int) -> Bool {
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { close(fd) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        address.sin_port = in_port_t(UInt16(port).bigEndian)
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        } == 0
    }

    /// Ports the kernel picks (bound to port 0 and released), where its range leaves no room below.
    static func ephemeralPorts(_ count: Int) throws -> [Int] {
        var sockets: [Int32] = []
        defer { for socket in sockets { close(socket) } }
        var ports: [Int] = []
        for _ in 0..<count {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            guard fd >= 0 else { throw TortureError.setup("socket: \(String(cString: strerror(errno)))") }
            sockets.append(fd)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr("127.0.0.1")
            address.sin_port = 0
            let bound = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            guard bound == 0 else { throw TortureError.setup("bind: \(String(cString: strerror(errno)))") }
            var length = socklen_t(MemoryLayout<sockaddr_in>.size)
            _ = withUnsafeMutablePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
            }
            ports.append(Int(UInt16(bigEndian: address.sin_port)))
        }
        return ports
    }

    // MARK: - Setting up and tearing down

    /// Creates the data directories (each on a tmpfs of `diskBytes` when disk faults are asked
    /// for and mounting works), and starts every node.
    func start() throws {
        let files = FileManager.default
        if let existing = try? files.contentsOfDirectory(atPath: options.workDirectory), !existing.isEmpty {
            // Old data would start the registers at other values than 0: false violations.
            throw TortureError.setup("the work directory \(options.workDirectory) is not empty (remove it, or name another)")
        }
        try files.createDirectory(atPath: options.workDirectory, withIntermediateDirectories: true)
        for node in nodes { try files.createDirectory(atPath: "\(options.workDirectory)/node\(node.id)", withIntermediateDirectories: true) }
        if options.faults.contains(.disk) {
            var failure: String?
            for node in nodes {
                let point = "\(options.workDirectory)/node\(node.id)"
                let (status, output) = Self.run("/bin/mount", ["-t", "tmpfs", "-o", "size=\(options.diskBytes)", "tmpfs", point])
                if status != 0 {
                    failure = output.trimmingCharacters(in: .whitespacesAndNewlines)
                    break
                }
                node.mountPoint = point
            }
            if let failure {
                unmountAll()
                skipped.append("disk: cannot mount a \(options.diskBytes)-byte tmpfs for the data directories (\(failure.isEmpty ? "mount failed" : failure)); this fault needs root, or CAP_SYS_ADMIN")
            } else {
                diskFaultsPossible = true
            }
        }
        for node in nodes {
            try files.createDirectory(atPath: node.dataDirectory, withIntermediateDirectories: true)
            try startProcess(node)
        }
        for node in nodes where !waitUntilServing(node, seconds: 30) {
            throw TortureError.setup("node \(node.id) did not answer PING within 30 s (see \(node.logPath))")
        }
    }

    /// Stops every process (SIGTERM, then SIGKILL after 10 s), the proxies and the mounts.
    func shutdown() {
        for node in nodes where node.paused {
            if let process = node.process { kill(process.processIdentifier, SIGCONT) }
            node.paused = false
        }
        for node in nodes where node.isRunning { node.process?.terminate() }
        for node in nodes {
            guard let process = node.process else { continue }
            for _ in 0..<1000 where process.isRunning { usleep(10_000) }
            if process.isRunning {
                kill(process.processIdentifier, SIGKILL)
                process.waitUntilExit()
            }
        }
        for proxy in proxies.joined().compactMap({ $0 }) { proxy.stop() }
        unmountAll()
        try? group.syncShutdownGracefully()
    }

    private func unmountAll() {
        for node in nodes {
            guard let point = node.mountPoint else { continue }
            _ = Self.run("/bin/umount", [point])
            node.mountPoint = nil
        }
    }

    /// Runs a program to its end; its status and its output (both streams).
    static func run(_ path: String, _ arguments: [String]) -> (Int32, String) {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        do { try process.run() } catch { return (-1, "\(error)") }
        let output = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        return (process.terminationStatus, String(decoding: output, as: UTF8.self))
    }

    // MARK: - Processes

    /// The flags this node is started with.
    func arguments(for node: TortureNode) -> [String] {
        let peers = nodes.map { other in
            let port = other.slot == node.slot ? other.peerPort : proxies[node.slot][other.slot]!.port
            return "\(other.id)=127.0.0.1:\(port)"
        }.joined(separator: ",")
        // Routes win over the addresses the cluster records (a rejoined node's entry carries its
        // real port): every link goes through its proxy.
        let routes = nodes.filter { $0.slot != node.slot }.map { "\($0.id)=127.0.0.1:\(proxies[node.slot][$0.slot]!.port)" }.joined(separator: ",")
        var arguments = ["serve", "--bind", "127.0.0.1", "--port", "\(node.clientPort)", "--node-id", "\(node.id)",
                         "--peer-port", "\(node.peerPort)", "--peers", peers, "--data-dir", node.dataDirectory]
        if !routes.isEmpty { arguments += ["--peer-routes", routes] }
        if node.joins {
            // Through the leader, or any other node that runs.
            let through = leader()?.node ?? nodes.first { $0 !== node && $0.isRunning } ?? nodes[(node.slot + 1) % nodes.count]
            arguments += ["--join", "127.0.0.1:\(through.clientPort)"]
        }
        arguments += options.serveArguments
        return arguments
    }

    func startProcess(_ node: TortureNode) throws {
        if !FileManager.default.fileExists(atPath: node.logPath) {
            guard FileManager.default.createFile(atPath: node.logPath, contents: nil) else { throw TortureError.setup("cannot create \(node.logPath)") }
        }
        guard let log = FileHandle(forWritingAtPath: node.logPath) else { throw TortureError.setup("cannot write \(node.logPath)") }
        log.seekToEndOfFile()
        log.write(Data("=== keel torture: starting node \(node.id)\n".utf8))
        let process = Process()
        process.executableURL = URL(fileURLWithPath: options.serveBinary)
        process.arguments = arguments(for: node)
        process.standardOutput = log
        process.standardError = log
        process.standardInput = FileHandle.nullDevice
        do { try process.run() } catch { throw TortureError.setup("cannot start \(options.serveBinary): \(error)") }
        try? log.close()
        node.process = process
        node.paused = false
    }

    /// SIGKILL, and wait for the process to be gone.
    func kill9(_ node: TortureNode) {
        guard let process = node.process else { return }
        if process.isRunning {
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
        }
        node.paused = false
    }

    func pause(_ node: TortureNode) {
        guard let process = node.process, process.isRunning else { return }
        kill(process.processIdentifier, SIGSTOP)
        node.paused = true
    }

    func resume(_ node: TortureNode) {
        guard let process = node.process else { return }
        kill(process.processIdentifier, SIGCONT)
        node.paused = false
    }

    /// Deletes the node's data directory (the process must be stopped).
    func wipe(_ node: TortureNode) throws {
        try? FileManager.default.removeItem(atPath: node.dataDirectory)
        try FileManager.default.createDirectory(atPath: node.dataDirectory, withIntermediateDirectories: true)
    }

    func waitUntilServing(_ node: TortureNode, seconds: Double) -> Bool {
        let deadline = RESPClient.deadline(after: seconds)
        while DispatchTime.now().uptimeNanoseconds < deadline {
            if let reply = try? call(node, ["PING"], timeout: 1), reply == .simple("PONG") { return true }
            if !node.isRunning { return false }
            usleep(50_000)
        }
        return false
    }

    // MARK: - Disks

    /// Fills the node's tmpfs until a write fails with ENOSPC; returns the bytes written.
    func fill(_ node: TortureNode) -> Int {
        guard let point = node.mountPoint else { return 0 }
        let path = point + "/filler"
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0o644)
        guard fd >= 0 else { return 0 }
        defer { close(fd) }
        node.filler = path
        var written = 0
        for size in [1 << 20, 4096, 512] {
            let chunk = [UInt8](repeating: 0xAB, count: size)
            while true {
                let count = chunk.withUnsafeBytes { write(fd, $0.baseAddress!, size) }
                if count > 0 { written += count; continue }
                if count < 0, errno == EINTR { continue }
                break
            }
        }
        return written
    }

    func free(_ node: TortureNode) {
        guard let filler = node.filler else { return }
        unlink(filler)
        node.filler = nil
    }

    /// The node's log lines saying it stopped taking part (a fatal storage error).
    func stopReports(_ node: TortureNode) -> [String] {
        guard let text = try? String(contentsOfFile: node.logPath, encoding: .utf8) else { return [] }
        return text.split(separator: "\n").filter { $0.contains("node \(node.id) stops: ") }.map(String.init)
    }

    /// How many times the node's log says its disk was full.
    func fullDiskReports(_ node: TortureNode) -> Int {
        guard let text = try? String(contentsOfFile: node.logPath, encoding: .utf8) else { return 0 }
        return text.components(separatedBy: "the disk is full").count - 1
    }

    // MARK: - Links

    /// Cuts (or restores) node `from`'s messages to node `to`.
    func setLink(from: Int, to: Int, cut: Bool) {
        guard let proxy = proxies[from][to] else { return }
        if cut { proxy.cut() } else { proxy.restore() }
    }

    func restoreAllLinks() {
        for proxy in proxies.joined().compactMap({ $0 }) { proxy.restore() }
    }

    // MARK: - Asking nodes

    /// One command on a fresh connection.
    func call(_ node: TortureNode, _ arguments: [String], timeout: Double) throws -> RESPValue {
        let client = try RESPClient(port: node.clientPort, timeout: timeout)
        defer { client.close() }
        return try client.call(arguments, deadline: RESPClient.deadline(after: timeout))
    }

    /// Role and indexes from INFO keel; nil if the node does not answer.
    func role(_ node: TortureNode) -> NodeRole? {
        guard node.isRunning, !node.paused, let reply = try? call(node, ["INFO", "keel"], timeout: 1), let text = reply.text else { return nil }
        var fields: [String: String] = [:]
        for line in text.split(whereSeparator: \.isNewline) {
            let parts = line.split(separator: ":", maxSplits: 1)
            if parts.count == 2 { fields[String(parts[0])] = String(parts[1]).trimmingCharacters(in: .whitespaces) }
        }
        guard let role = fields["keel_role"] else { return nil }
        return NodeRole(role: role, term: UInt64(fields["keel_term"] ?? "") ?? 0, commitIndex: UInt64(fields["keel_commit_index"] ?? "") ?? 0,
                        appliedIndex: UInt64(fields["keel_applied_index"] ?? "") ?? 0)
    }

    /// The node that says it leads in the highest term, if any answers.
    func leader() -> (node: TortureNode, role: NodeRole)? {
        var best: (node: TortureNode, role: NodeRole)?
        for node in nodes {
            guard let role = role(node), role.role == "leader" else { continue }
            if best == nil || role.term > best!.role.term { best = (node, role) }
        }
        return best
    }

    /// Waits until every node runs, a leader is known, and every node has applied what the leader
    /// had committed when it was asked. Returns whether that happened within `seconds`.
    func waitUntilHealthy(seconds: Double, stop: () -> Bool = { false }) -> Bool {
        let deadline = RESPClient.deadline(after: seconds)
        while DispatchTime.now().uptimeNanoseconds < deadline, !stop() {
            if nodes.allSatisfy({ $0.isRunning && !$0.paused }), let (_, leaderRole) = leader() {
                let target = leaderRole.commitIndex
                while DispatchTime.now().uptimeNanoseconds < deadline, !stop() {
                    let roles = nodes.map(role)
                    if roles.allSatisfy({ ($0?.appliedIndex ?? 0) >= target }) { return true }
                    usleep(100_000)
                }
                return false
            }
            usleep(100_000)
        }
        return false
    }

    /// Sends a membership command through the leader (or any node), retrying until it is
    /// answered OK or `seconds` pass; returns the last answer.
    func member(_ arguments: [String], seconds: Double, stop: () -> Bool = { false }) -> String {
        let deadline = RESPClient.deadline(after: seconds)
        var last = "no node answered"
        while DispatchTime.now().uptimeNanoseconds < deadline, !stop() {
            let through = leader()?.node ?? nodes.first { $0.isRunning && !$0.paused }
            if let through {
                do {
                    let reply = try call(through, ["KEEL.MEMBER"] + arguments, timeout: 5)
                    if reply == .simple("OK") { return "OK" }
                    // A REMOVE that committed while its answer was lost: retried, it is not a member.
                    if arguments.first == "REMOVE", case .error(let text) = reply, arguments.count > 1, text.hasSuffix("node \(arguments[1]) is not a member") { return "OK" }
                    last = "\(reply)"
                } catch {
                    last = "\(error)"
                }
            }
            usleep(200_000)
        }
        return last
    }

    /// Whether the leader lists the node as a voter.
    func isVoter(_ node: TortureNode) -> Bool {
        guard let (leader, _) = leader(), case .array(let items?)? = try? call(leader, ["KEEL.MEMBER", "LIST"], timeout: 2) else { return false }
        return items.contains { $0.text?.hasPrefix("id=\(node.id) ") == true && $0.text?.contains("role=voter") == true }
    }

    /// Each node's (applied index, digest, keys) from KEEL.STATEHASH; nil where it does not answer.
    func stateHashes() -> [TortureNodeState?] {
        nodes.map { node in
            guard case .array(let items?)? = try? call(node, ["KEEL.STATEHASH"], timeout: 2), items.count == 3,
                  case .integer(let applied) = items[0], let digest = items[1].text, case .integer(let keys) = items[2] else { return nil }
            return TortureNodeState(node: node.id, appliedIndex: UInt64(applied), digest: digest, keys: Int(keys))
        }
    }
}
