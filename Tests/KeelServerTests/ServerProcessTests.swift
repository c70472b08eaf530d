import Foundation
import KeelTorture
import Testing

/// The directory with the built executables.
func products() -> String {
    if let override = ProcessInfo.processInfo.environment["KEEL_PRODUCTS_DIR"] { return override }
    var url = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
    while url.path != "/" {
        url.deleteLastPathComponent()
        if FileManager.default.isExecutableFile(atPath: url.appendingPathComponent("keel").path) { return url.path }
    }
    return FileManager.default.currentDirectoryPath + "/.build/debug"
}

/// The Python checks beside this file.
let checks = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("python/redis_client_checks.py").path

/// A free TCP port on 127.0.0.1.
/// A free loopback port below the ephemeral range (the torture test's proxies, running beside
/// these tests, make many outgoing connections: one could take an ephemeral port between its
/// choice and the server's bind).
/// Never the same port twice in one test run.
func freePort() -> Int {
    handedOutLock.lock()
    defer { handedOutLock.unlock() }
    while true {
        guard let port = try? LoopbackPorts.free(1).first else { fatalError("no free loopback port") }
        if handedOut.insert(port).inserted { return port }
    }
}

nonisolated(unsafe) private var handedOut: Set<Int> = []
private let handedOutLock = NSLock()

/// Runs a program to completion (off the test's thread pool) and returns its status and output.
func runTool(_ path: String, _ arguments: [String], timeout: Double = 120) async -> (status: Int32, output: String) {
    await withCheckedContinuation { continuation in
        Thread.detachNewThread {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: path)
            process.arguments = arguments
            let pipe = Pipe()
            process.standardOutput = pipe
            process.standardError = pipe
            do { try process.run() } catch {
                continuation.resume(returning: (-1, "cannot run \(path): \(error)"))
                return
            }
            let timer = DispatchWorkItem { process.terminate() }
            DispatchQueue.global().asyncAfter(deadline: .now() + timeout, execute: timer)
            let data = pipe.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            timer.cancel()
            continuation.resume(returning: (process.terminationStatus, String(decoding: data, as: UTF8.self)))
        }
    }
}

func which(_ tool: String) -> String {
    for directory in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin").split(separator: ":") {
        let path = "\(directory)/\(tool)"
        if FileManager.default.isExecutableFile(atPath: path) { return path }
    }
    return "/usr/bin/\(tool)"
}

/// A `keel serve` process.
final class ServerProcess: @unchecked Sendable {
    let port: Int
    let directory: String
    let arguments: [String]
    /// Variables added to (or, when empty, removed from) the test's environment.
    let environment: [String: String]
    private var process: Process?

    init(directory: String, port: Int = freePort(), extra: [String] = [], environment: [String: String] = [:]) {
        self.port = port
        self.directory = directory
        arguments = ["serve", "--port", String(port), "--data-dir", directory] + extra
        self.environment = environment
    }

    func start() async throws {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: products() + "/keel")
        process.arguments = arguments
        if !environment.isEmpty {
            var merged = ProcessInfo.processInfo.environment
            for (name, value) in environment { merged[name] = value.isEmpty ? nil : value }
            process.environment = merged
        }
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        try process.run()
        self.process = process
        for _ in 0..<500 {
            let answer = await runTool(which("redis-cli"), ["-p", String(port), "ping"], timeout: 5).output
            if answer.contains("PONG") || answer.contains("NOAUTH") { return }
            try await Task.sleep(for: .milliseconds(20))
        }
        Issue.record("keel serve on port \(port) did not answer PING")
    }

    var pid: Int32 { process?.processIdentifier ?? 0 }

    func kill9() async {
        guard let process else { return }
        kill(process.processIdentifier, SIGKILL)
        while process.isRunning { try? await Task.sleep(for: .milliseconds(10)) }
    }

    /// SIGTERM, then waits for the exit; its status.
    func stop() async -> Int32 {
        guard let process, process.isRunning else { return process?.terminationStatus ?? 0 }
        kill(process.processIdentifier, SIGTERM)
        for _ in 0..<1000 where process.isRunning { try? await Task.sleep(for: .milliseconds(10)) }
        if process.isRunning { await kill9() }
        return process.terminationStatus
    }

    func cli(_ words: String...) async -> String {
        await runTool(which("redis-cli"), ["-p", String(port)] + words, timeout: 20).output.trimmingCharacters(in: .whitespacesAndNewlines)
    }
}

func temporaryDirectory(_ name: String) -> String {
    NSTemporaryDirectory() + "keel-serve-\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
}

@Suite("keel serve, a real process, with real clients", .serialized)
struct ServerProcessTests {
    @Test("redis-cli: replies, errors, inline use, and the state after a restart")
    func redisCLI() async throws {
        let directory = temporaryDirectory("cli")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let server = ServerProcess(directory: directory)
        try await server.start()
        #expect(await server.cli("PING") == "PONG")
        #expect(await server.cli("SET", "name", "keel") == "OK")
        #expect(await server.cli("GET", "name") == "keel")
        #expect(await server.cli("INCR", "visits") == "1")
        // Seconds left, rounded: 100 less the seconds the two commands took (a loaded CI machine
        // can take more than one between them), and never more than 100.
        let before = DispatchTime.now().uptimeNanoseconds
        #expect(await server.cli("SET", "session", "x", "EX", "100") == "OK")
        let left = Int(await server.cli("TTL", "session")) ?? -100
        let elapsed = Int((DispatchTime.now().uptimeNanoseconds - before) / 1_000_000_000) + 1
        #expect(left <= 100 && left >= 100 - elapsed, "TTL \(left) after \(elapsed) s")
        #expect(await server.cli("NOSUCH", "a").hasPrefix("ERR unknown command 'NOSUCH'"))
        #expect(await server.cli("GET").hasPrefix("ERR wrong number of arguments for 'get' command"))
        #expect(await server.cli("SELECT", "16") == "ERR DB index is out of range")
        #expect(await server.cli("INFO", "keel").contains("keel_role:leader"))
        #expect(await server.cli("KEEL.MEMBER", "LIST").contains("id=1 address=127.0.0.1:16379 role=voter leader=yes"))
        // The leader's sweep deletes an expired key through the log (DBSIZE counts stored keys).
        #expect(await server.cli("-n", "5", "SET", "brief", "x", "PX", "100") == "OK")
        var swept = false
        for _ in 0..<100 where !swept {
            try await Task.sleep(for: .milliseconds(50))
            swept = await server.cli("-n", "5", "DBSIZE") == "0"
        }
        #expect(swept, "the expired key was deleted")
        #expect(await server.cli("INFO", "stats").contains("expired_keys:1"))
        #expect(await server.stop() == 0, "SIGTERM stops it cleanly")
        try await server.start()
        #expect(await server.cli("GET", "name") == "keel", "the data survived the restart")
        #expect(await server.cli("INCR", "visits") == "2")
        let ttl = Int(await server.cli("TTL", "session")) ?? -2
        #expect((1...100).contains(ttl), "the expiry survived as an absolute time (\(ttl))")
        _ = await server.stop()
    }

    @Test("a client that pipelines large GETs and reads nothing costs bounded memory, and gets every reply once it reads")
    func slowReader() async throws {
        // Before backpressure on replies the server copied all of them into its buffers (2 GiB
        // here), and a connection's buffer past 4 GiB crashed it.
        for threads in ["1", "2"] {
            let directory = temporaryDirectory("slow-reader-\(threads)")
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let server = ServerProcess(directory: directory, extra: ["--io-threads", threads])
            try await server.start()
            let result = await runTool(which("python3"), [checks, "slow-reader", String(server.port)])
            #expect(result.status == 0 && result.output.contains("ok"), "--io-threads \(threads): \(result.output)")
            #expect(await server.cli("PING") == "PONG", "the server still serves")
            _ = await server.stop()
        }
    }

    @Test("redis-py over RESP2 and RESP3, malformed protocol on raw sockets, transaction and pipelined-batch size limits, and requirepass")
    func redisPy() async throws {
        let directory = temporaryDirectory("py")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let server = ServerProcess(directory: directory)
        try await server.start()
        for protocolVersion in ["2", "3"] {
            let result = await runTool(which("python3"), [checks, "basic", String(server.port), protocolVersion])
            #expect(result.status == 0 && result.output.contains("ok"), "redis-py RESP\(protocolVersion): \(result.output)")
        }
        let malformed = await runTool(which("python3"), [checks, "malformed", String(server.port)])
        #expect(malformed.status == 0, "malformed protocol: \(malformed.output)")
        let limits = await runTool(which("python3"), [checks, "transaction-limits", String(server.port)])
        #expect(limits.status == 0 && limits.output.contains("ok"), "transaction limits: \(limits.output)")
        let batches = await runTool(which("python3"), [checks, "pipelined-limits", String(server.port)])
        #expect(batches.status == 0 && batches.output.contains("ok"), "pipelined writes' limits: \(batches.output)")
        let concurrent = await runTool(which("python3"), [checks, "concurrent-reads", String(server.port)], timeout: 120)
        #expect(concurrent.status == 0 && concurrent.output.contains("ok"), "concurrent readers: \(concurrent.output)")
        let writers = await runTool(which("python3"), [checks, "concurrent-writes", String(server.port)], timeout: 120)
        #expect(writers.status == 0 && writers.output.contains("ok"), "concurrent writers: \(writers.output)")
        #expect(await server.cli("PING") == "PONG", "the server still serves")
        _ = await server.stop()
        // The same with connections spread over two event loops (requests hop to the node's loop:
        // WATCH, MULTI and SELECT state must stay on the connection's own).
        let spread = ServerProcess(directory: directory + "-spread", extra: ["--io-threads", "2"])
        defer { try? FileManager.default.removeItem(atPath: directory + "-spread") }
        try await spread.start()
        for protocolVersion in ["2", "3"] {
            let result = await runTool(which("python3"), [checks, "basic", String(spread.port), protocolVersion])
            #expect(result.status == 0 && result.output.contains("ok"), "--io-threads 2, RESP\(protocolVersion): \(result.output)")
        }
        let spreadMalformed = await runTool(which("python3"), [checks, "malformed", String(spread.port)])
        #expect(spreadMalformed.status == 0, "--io-threads 2, raw protocol: \(spreadMalformed.output)")
        let spreadConcurrent = await runTool(which("python3"), [checks, "concurrent-reads", String(spread.port)], timeout: 120)
        #expect(spreadConcurrent.status == 0 && spreadConcurrent.output.contains("ok"), "--io-threads 2, concurrent readers: \(spreadConcurrent.output)")
        let spreadWriters = await runTool(which("python3"), [checks, "concurrent-writes", String(spread.port)], timeout: 120)
        #expect(spreadWriters.status == 0 && spreadWriters.output.contains("ok"), "--io-threads 2, concurrent writers: \(spreadWriters.output)")
        _ = await spread.stop()
        let secured = ServerProcess(directory: directory + "-auth", extra: ["--requirepass", "s3cret"])
        defer { try? FileManager.default.removeItem(atPath: directory + "-auth") }
        try await secured.start()
        let auth = await runTool(which("python3"), [checks, "auth", String(secured.port), "s3cret"])
        #expect(auth.status == 0, "requirepass: \(auth.output)")
        _ = await secured.stop()
    }

    @Test("checkpoints the thresholds take count in INFO and LASTSAVE, not only SAVE's; the checkpoint a restart recovers does not")
    func automaticCheckpointsCount() async throws {
        let directory = temporaryDirectory("autosave")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let server = ServerProcess(directory: directory, extra: ["--checkpoint-log-bytes", "65536", "--checkpoint-log-growth", "0"])
        try await server.start()
        func taken(_ server: ServerProcess) async -> Int? {
            await server.cli("INFO", "persistence").split(whereSeparator: \.isNewline)
                .first { $0.hasPrefix("keel_checkpoints_taken:") }.flatMap { Int($0.split(separator: ":")[1]) }
        }
        #expect(await taken(server) == 0)
        let result = await runTool(which("redis-benchmark"), ["-p", String(server.port), "-t", "set", "-n", "5000", "-c", "10",
                                                             "-d", "100", "-r", "1000", "-q"])
        #expect(result.status == 0, "\(result.output)")
        var count = 0
        for _ in 0..<100 where count == 0 {
            try await Task.sleep(for: .milliseconds(50))
            count = await taken(server) ?? 0
        }
        #expect(count > 0, "about 750 KB of log at a 64 KiB threshold, no SAVE: checkpoints were taken and counted")
        #expect(await server.stop() == 0)
        // Restarted without the small threshold: a stop during a checkpoint can leave more than
        // 64 KiB of log past the newest one, and the restarted node would then take one at once
        // (rightly), which is not what this part checks.
        let restarted = ServerProcess(directory: directory)
        try await restarted.start()
        try await Task.sleep(for: .milliseconds(400))
        #expect(await taken(restarted) == 0, "the checkpoint recovered at start is not a new one")
        #expect(await restarted.cli("SAVE") == "OK")
        #expect(await taken(restarted) == 1)
        _ = await restarted.stop()
    }

    @Test("--timeout closes a connection idle that long (not an active one), CONFIG GET tells both settings, and client sockets have TCP keepalive unless --tcp-keepalive 0")
    func idleTimeoutAndKeepalive() async throws {
        let directory = temporaryDirectory("timeout")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let server = ServerProcess(directory: directory, extra: ["--timeout", "1", "--tcp-keepalive", "60"])
        try await server.start()
        #expect(await server.cli("CONFIG", "GET", "timeout") == "timeout\n1")
        #expect(await server.cli("CONFIG", "GET", "tcp-keepalive") == "tcp-keepalive\n60")
        // Two raw clients: one silent, one sending PING every 300 ms; after 3 s the silent one's
        // socket reads end-of-stream (closed by the server) and the other still gets PONG.
        let script = """
        import socket, sys, time, subprocess
        port = int(sys.argv[1])
        quiet = socket.create_connection(("127.0.0.1", port))
        busy = socket.create_connection(("127.0.0.1", port))
        # The server's side of each connection: the keepalive timer shows in ss's timer column.
        time.sleep(0.2)
        ss = subprocess.run(["ss", "-tnoH", "state", "established", "( sport = :%d )" % port], capture_output=True, text=True).stdout
        print("keepalive" if ss.count("keepalive") >= 2 else "no keepalive: " + ss)
        start = time.time()
        while time.time() - start < 3.0:
            busy.sendall(b"PING\\r\\n")
            assert busy.recv(64) == b"+PONG\\r\\n"
            time.sleep(0.3)
        quiet.settimeout(5)
        print("quiet closed" if quiet.recv(64) == b"" else "quiet open")
        busy.sendall(b"PING\\r\\n")
        print("busy open" if busy.recv(64) == b"+PONG\\r\\n" else "busy closed")
        """
        let result = await runTool(which("python3"), ["-c", script, String(server.port)])
        #expect(result.output.contains("keepalive\n"), "\(result.output)")
        #expect(result.output.contains("quiet closed"), "\(result.output)")
        #expect(result.output.contains("busy open"), "\(result.output)")
        // Replies pass the idle handler (it counts them as activity): none is sent straight to a socket.
        let info = await server.cli("INFO", "keel")
        let counters = Dictionary(info.split(whereSeparator: \.isNewline).compactMap { line -> (String, Int)? in
            let parts = line.split(separator: ":")
            guard parts.count == 2, let value = Int(parts[1].trimmingCharacters(in: .whitespaces)) else { return nil }
            return (String(parts[0]), value)
        }, uniquingKeysWith: { first, _ in first })
        #expect(counters["keel_direct_writes"] == 0, "\(info)")
        #expect((counters["keel_channel_writes"] ?? 0) > 0, "\(info)")
        _ = await server.stop()

        // The defaults: no idle timeout, keepalive 300 s; --tcp-keepalive 0 turns it off.
        let plain = ServerProcess(directory: directory, extra: ["--tcp-keepalive", "0"])
        try await plain.start()
        #expect(await plain.cli("CONFIG", "GET", "timeout") == "timeout\n0")
        let off = await runTool(which("python3"), ["-c", """
        import socket, sys, time, subprocess
        port = int(sys.argv[1])
        c = socket.create_connection(("127.0.0.1", port))
        time.sleep(0.2)
        ss = subprocess.run(["ss", "-tnoH", "state", "established", "( sport = :%d )" % port], capture_output=True, text=True).stdout
        print("keepalive" if "keepalive" in ss else "none")
        """, String(plain.port)])
        #expect(off.output.contains("none"), "\(off.output)")
        _ = await plain.stop()
    }

    @Test("redis-benchmark as a smoke load: every request answered, nothing refused")
    func redisBenchmark() async throws {
        let directory = temporaryDirectory("bench")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let server = ServerProcess(directory: directory)
        try await server.start()
        let result = await runTool(which("redis-benchmark"), ["-p", String(server.port), "-t", "set,get,incr,mset", "-n", "5000", "-c", "20",
                                                             "-r", "1000", "-P", "4", "-q"])
        #expect(result.status == 0, "\(result.output)")
        for test in ["SET", "GET", "INCR", "MSET"] {
            #expect(result.output.contains("\(test)") && result.output.contains("requests per second"), "\(test) ran: \(result.output)")
        }
        #expect(!result.output.contains("ERR"), "\(result.output)")
        #expect(Int(await server.cli("DBSIZE")) ?? 0 > 0)
        _ = await server.stop()
    }

    #if os(Linux)
    @Test("keel serve starts itself again once with glibc's larger per-thread allocation cache, unless the user set GLIBC_TUNABLES or turned it off")
    func mallocTuning() async throws {
        func environ(_ pid: Int32) throws -> [String] {
            let bytes = try Data(contentsOf: URL(fileURLWithPath: "/proc/\(pid)/environ"))
            return bytes.split(separator: 0).map { String(decoding: $0, as: UTF8.self) }
        }
        let cases: [(environment: [String: String], expected: String?)] = [
            (["GLIBC_TUNABLES": "", "KEEL_MALLOC_TUNING": ""], "GLIBC_TUNABLES=glibc.malloc.tcache_count=256"),
            (["GLIBC_TUNABLES": "glibc.malloc.mxfast=64"], "GLIBC_TUNABLES=glibc.malloc.mxfast=64"),
            (["GLIBC_TUNABLES": "glibc.malloc.tcache_count=50"], "GLIBC_TUNABLES=glibc.malloc.tcache_count=50"),
            (["GLIBC_TUNABLES": "", "KEEL_MALLOC_TUNING": "off"], nil),
            // Already started again (the marker set): never a second time.
            (["GLIBC_TUNABLES": "", "KEEL_MALLOC_TUNED": "1"], nil),
        ]
        for (environment, expected) in cases {
            let directory = temporaryDirectory("malloc")
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let server = ServerProcess(directory: directory, environment: environment)
            try await server.start()
            // The same process (same pid) answers: it replaced itself, it did not fork.
            #expect(await server.cli("SET", "k", "v") == "OK")
            let variables = try environ(server.pid)
            let tunables = variables.first { $0.hasPrefix("GLIBC_TUNABLES=") }
            #expect(tunables == expected, "\(environment): \(tunables ?? "no GLIBC_TUNABLES")")
            #expect(variables.contains("KEEL_MALLOC_TUNED=1") == (expected?.contains("=256") ?? false || environment["KEEL_MALLOC_TUNED"] != nil),
                    "\(environment)")
            // It started with no signal blocked (exec keeps the caller's mask, and the call runs on
            // a thread of Swift's pool, which blocks most), so SIGTERM and SIGHUP act as usual.
            let status = try String(contentsOfFile: "/proc/\(server.pid)/status", encoding: .utf8)
            let blocked = status.split(separator: "\n").first { $0.hasPrefix("SigBlk:") }.map { $0.dropFirst(7).trimmingCharacters(in: .whitespaces) }
            #expect(blocked.map { $0.allSatisfy { $0 == "0" } } == true, "blocked signals: \(blocked ?? "?")")
            // Still named after its executable (ps, pgrep, top).
            let name = try String(contentsOfFile: "/proc/\(server.pid)/comm", encoding: .utf8)
            #expect(name.trimmingCharacters(in: .whitespacesAndNewlines) == "keel")
            _ = await server.stop()
        }
    }
    #endif

    @Test("SIGKILL under redis-benchmark load, then a restart: every acknowledged SET is there (the loop syncing, and the log's writer thread)",
          arguments: ["yes", "no"])
    func killUnderLoad(syncOnLoop: String) async throws {
        let directory = temporaryDirectory("kill-\(syncOnLoop)")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let server = ServerProcess(directory: directory, extra: ["--sync-on-loop", syncOnLoop])
        try await server.start()
        async let load = runTool(which("redis-benchmark"), ["-p", String(server.port), "-t", "set", "-n", "1000000", "-c", "20", "-r", "100000", "-q"],
                                 timeout: 30)
        async let writes = runTool(which("python3"), [checks, "writer", String(server.port)], timeout: 60)
        try await Task.sleep(for: .milliseconds(1500))
        await server.kill9()
        let written = await writes
        _ = await load
        let acknowledged = written.output.split(separator: "\n").filter { Int($0) != nil }
        #expect(acknowledged.count > 10, "the writer got acknowledgements before the kill (\(acknowledged.count))")
        let list = directory + "-acknowledged"
        try written.output.write(toFile: list, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: list) }
        try await server.start()
        let verified = await runTool(which("python3"), [checks, "verify", list, String(server.port)])
        #expect(verified.status == 0, "after the restart: \(verified.output)")
        _ = await server.stop()
    }
}

extension ServerProcessTests {
    @Test("a three-node cluster driven through redis-py while its leader is SIGKILLed: no acknowledged write lost; alone, a node answers every pipelined read with an error")
    func clusterLeaderKilled() async throws {
        let base = temporaryDirectory("cluster")
        defer { try? FileManager.default.removeItem(atPath: base) }
        let peerPorts = (0..<3).map { _ in freePort() }
        let peers = peerPorts.enumerated().map { "\($0.offset + 1)=127.0.0.1:\($0.element)" }.joined(separator: ",")
        let servers = (0..<3).map { i in
            // Nodes 2 and 3 spread their connections over two loops (requests hop to the node's loop).
            ServerProcess(directory: "\(base)/node\(i + 1)", extra: ["--node-id", String(i + 1), "--peer-port", String(peerPorts[i]), "--peers", peers,
                                                                    "--io-threads", i == 0 ? "1" : "2"])
        }
        for server in servers { try await server.start() }
        func leader(among candidates: [ServerProcess]) async -> ServerProcess? {
            for _ in 0..<300 {
                for server in candidates where await server.cli("INFO", "keel").contains("keel_role:leader") { return server }
                try? await Task.sleep(for: .milliseconds(50))
            }
            return nil
        }
        let first = try #require(await leader(among: servers))
        let ports = servers.map { String($0.port) }
        async let writes = runTool(which("python3"), [checks, "writer-limit", "600"] + ports, timeout: 120)
        try await Task.sleep(for: .milliseconds(1000))
        await first.kill9()
        let survivors = servers.filter { $0 !== first }
        let second = await leader(among: survivors)
        #expect(second != nil, "the survivors elected a leader")
        let written = await writes
        let acknowledged = written.output.split(separator: "\n").compactMap { Int($0) }
        #expect(acknowledged.count > 300, "writes went on through the survivors (\(acknowledged.count) of 600 acknowledged)")
        let list = base + "-acknowledged"
        try written.output.write(toFile: list, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(atPath: list) }
        try await first.start()
        let verified = await runTool(which("python3"), [checks, "verify", list] + ports)
        #expect(verified.status == 0, "on every node, the restarted one included: \(verified.output)")
        #expect(await first.cli("INFO", "keel").contains("keel_members:1,2,3"))
        // Left alone, a node has no leader: a pipelined group of reads gets one error each.
        let alone = servers[2]
        for server in servers where server !== alone { await server.kill9() }
        var leaderless = false
        for _ in 0..<200 where !leaderless {
            try await Task.sleep(for: .milliseconds(50))
            leaderless = await alone.cli("INFO", "keel").contains("keel_leader_id:0")
        }
        #expect(leaderless, "the last node knows it has no leader")
        let failures = await runTool(which("python3"), [checks, "pipelined-failures", String(alone.port)])
        #expect(failures.status == 0, "\(failures.output)")
        for server in servers { _ = await server.stop() }
    }
}

extension ServerProcessTests {
    @Test("HTTP: /health, /metrics in the Prometheus text format, and the status page rendered by a headless browser")
    func http() async throws {
        let directory = temporaryDirectory("http")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        // Looked for before the server starts: a missing browser ends the test here, and a server
        // left running would hold the default peer port that later tests' servers take.
        let browser = ["chromium", "chromium-browser", "google-chrome"].map(which).first { FileManager.default.isExecutableFile(atPath: $0) }
        let chromium = try #require(browser, "a headless browser (chromium) is installed (.ci/run installs it)")
        let httpPort = freePort()
        let server = ServerProcess(directory: directory, extra: ["--http-port", String(httpPort)])
        try await server.start()
        let checked = await runTool(which("python3"), [checks, "http", String(server.port), String(httpPort)])
        #expect(checked.status == 0, "\(checked.output)")
        // A real browser renders the page: the DOM it builds shows the node leading and its member row.
        let profile = directory + "-browser"
        defer { try? FileManager.default.removeItem(atPath: profile) }
        let dom = await runTool(chromium, ["--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=\(profile)", "--dump-dom",
                                           "http://127.0.0.1:\(httpPort)/"], timeout: 60)
        #expect(dom.output.contains("<b id=\"role\">leader</b>"), "rendered: \(dom.output.prefix(600))")
        #expect(dom.output.contains("<tr id=\"member-1\">"), "the member table")
        _ = await server.stop()
    }
}

extension ServerProcessTests {
    @Test("a node joins a running single-node server with --join, is promoted once caught up, and serves; a restart rejoins")
    func join() async throws {
        let base = temporaryDirectory("join")
        defer { try? FileManager.default.removeItem(atPath: base) }
        let first = ServerProcess(directory: base + "/node1", extra: ["--peer-port", String(freePort())])
        try await first.start()
        #expect(await first.cli("SET", "before", "1") == "OK")
        let second = ServerProcess(directory: base + "/node2",
                                   extra: ["--node-id", "2", "--peer-port", String(freePort()), "--join", "127.0.0.1:\(first.port)"])
        try await second.start()
        var promoted = false
        var members = ""
        for _ in 0..<300 where !promoted {
            members = await first.cli("KEEL.MEMBER", "LIST")
            promoted = members.contains("id=2 ") && !members.contains("role=learner")
            if !promoted { try await Task.sleep(for: .milliseconds(50)) }
        }
        #expect(promoted, "node 2 was added and promoted: \(members)")
        #expect(await second.cli("GET", "before") == "1", "it caught up")
        #expect(await second.cli("SET", "after", "2") == "OK", "it takes writes (forwarded to the leader)")
        #expect(await first.cli("GET", "after") == "2")
        _ = await second.stop()
        try await second.start()
        var answer = ""
        for _ in 0..<200 where answer != "2" {
            answer = await second.cli("GET", "after")
            if answer != "2" { try await Task.sleep(for: .milliseconds(50)) }
        }
        #expect(answer == "2", "a restart with --join rejoins (an election may come first)")
        // `keel member`: the operator's view and a removal, through a member's client port.
        let keel = products() + "/keel"
        let listed = await runTool(keel, ["member", "list", "--server", "127.0.0.1:\(first.port)"])
        #expect(listed.status == 0 && listed.output.contains("id=1 ") && listed.output.contains("id=2 "), "\(listed.output)")
        #expect(await runTool(keel, ["member", "frob"]).status != 0, "a bad subcommand is refused")
        let removed = await runTool(keel, ["member", "remove", "2", "--server", "127.0.0.1:\(second.port)"])
        #expect(removed.status == 0 && removed.output.contains("OK"), "removed through the member itself: \(removed.output) \(removed.status)")
        let after = await runTool(keel, ["member", "list", "--server", "127.0.0.1:\(first.port)"])
        #expect(after.output.contains("id=1 ") && !after.output.contains("id=2 "), "\(after.output)")
        _ = await second.stop()
        _ = await first.stop()
    }
}

extension ServerProcessTests {
    @Test("a full disk (a small tmpfs): writes are refused with a clear error, reads go on, nothing acknowledged is lost, writes resume once there is room",
          .enabled(if: geteuid() == 0, "mounting a tmpfs needs root (CI runs as root)"))
    func fullDisk() async throws {
        let mountPoint = temporaryDirectory("full")
        try FileManager.default.createDirectory(atPath: mountPoint, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: mountPoint) }
        // 96 MiB: the 64 MiB preallocated log segment, and a filler file for the rest.
        let mounted = await runTool("/bin/mount", ["-t", "tmpfs", "-o", "size=96m", "tmpfs", mountPoint])
        try #require(mounted.status == 0, "mounting a small tmpfs: \(mounted.output)")
        defer { _ = Process.run("/bin/umount", [mountPoint]) }
        let server = ServerProcess(directory: mountPoint + "/data")
        try await server.start()
        // The log prepares its next segment in the background; on this file system there is no
        // room for it, so it gives up and removes the file. Measure the free space once it has.
        func freeBytes() -> Int {
            var info = statvfs()
            return statvfs(mountPoint, &info) == 0 ? Int(info.f_bavail) * Int(info.f_frsize) : 0
        }
        var free = freeBytes()
        var steady = 0
        for _ in 0..<200 where steady < 4 {
            try await Task.sleep(for: .milliseconds(50))
            let now = freeBytes()
            let settled = now == free && !FileManager.default.fileExists(atPath: mountPoint + "/data/log/next-segment.tmp")
            steady = settled ? steady + 1 : 0
            free = now
        }
        let filler = mountPoint + "/filler"
        #expect(FileManager.default.createFile(atPath: filler, contents: Data(count: max(0, free - (256 << 10)))))
        let result = await runTool(which("python3"), [checks, "full-disk", String(server.port), filler], timeout: 120)
        #expect(result.status == 0, "\(result.output)")
        let acknowledged = Int(result.output.split(separator: "\n").last ?? "") ?? 0
        #expect(await server.stop() == 0)
        try await server.start()
        #expect(Int(await server.cli("DBSIZE")) == acknowledged + 1, "every acknowledged write is there after a restart")
        _ = await server.stop()
    }
}

extension Process {
    /// Runs a tool to completion, ignoring its output (for clean-up in `defer`).
    static func run(_ path: String, _ arguments: [String]) -> Int32 {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: path)
        process.arguments = arguments
        process.standardOutput = FileHandle.nullDevice
        process.standardError = FileHandle.nullDevice
        guard (try? process.run()) != nil else { return -1 }
        process.waitUntilExit()
        return process.terminationStatus
    }
}

extension ServerProcessTests {
    @Test("bad values for --log-segment-bytes, --checkpoint-log-growth, --peer-routes, --timeout, --tcp-keepalive, --sync-on-loop and keel torture's flags are refused with a clear error")
    func badFlags() async throws {
        let keel = products() + "/keel"
        let directory = temporaryDirectory("flags")
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let small = await runTool(keel, ["serve", "--port", String(freePort()), "--data-dir", directory, "--log-segment-bytes", "4096"])
        #expect(small.status != 0 && small.output.contains("--log-segment-bytes must be in 1048576...1073741824"), "\(small.output)")
        let growth = await runTool(keel, ["serve", "--port", String(freePort()), "--data-dir", directory, "--checkpoint-log-growth", "1000001"])
        #expect(growth.status != 0 && growth.output.contains("--checkpoint-log-growth must be in 0...1000000"), "\(growth.output)")
        let routes = await runTool(keel, ["serve", "--port", String(freePort()), "--data-dir", directory, "--peer-routes", "2=nowhere"])
        #expect(routes.status != 0 && routes.output.contains("--peer-routes takes id=host:port items"), "\(routes.output)")
        let timeout = await runTool(keel, ["serve", "--port", String(freePort()), "--data-dir", directory, "--timeout=-1"])
        #expect(timeout.status != 0 && timeout.output.contains("--timeout must be in 0...2147483647"), "\(timeout.output)")
        let keepalive = await runTool(keel, ["serve", "--port", String(freePort()), "--data-dir", directory, "--tcp-keepalive", "40000"])
        #expect(keepalive.status != 0 && keepalive.output.contains("--tcp-keepalive must be in 0...32767"), "\(keepalive.output)")
        let sync = await runTool(keel, ["serve", "--port", String(freePort()), "--data-dir", directory, "--sync-on-loop", "maybe"])
        #expect(sync.status != 0 && sync.output.contains("--sync-on-loop takes yes or no"), "\(sync.output)")
        let nodes = await runTool(keel, ["torture", "--nodes", "2", "--work-dir", directory + "/torture"])
        #expect(nodes.status == 2 && nodes.output.contains("--nodes takes 1, 3 or 5"), "\(nodes.output)")
        let kind = await runTool(keel, ["torture", "--faults", "kill,flood"])
        #expect(kind.status != 0 && kind.output.contains("unknown fault kind flood"), "\(kind.output)")
    }
}
