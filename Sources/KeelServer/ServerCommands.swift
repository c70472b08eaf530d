// The commands a connection answers itself (or with the node's status): connection state,
// transactions, introspection, persistence and membership.

import Foundation
import Keel
import KeelCore
import KeelKV
import KeelRaft
import NIOConcurrencyHelpers
import NIOCore

/// Server command names with Redis's arity convention (negative: at least).
let serverCommandArity: [String: Int] = [
    "ping": -1, "echo": 2, "hello": -1, "auth": -2, "client": -2, "quit": -1, "reset": 1, "command": -1, "config": -2,
    "time": 1, "info": -1, "select": 2, "multi": 1, "exec": 1, "discard": 1, "watch": -2, "unwatch": 1, "wait": 3,
    "waitaof": 4, "save": 1, "bgsave": -1, "lastsave": 1, "readonly": 1, "readwrite": 1, "keel.member": -2,
    "keel.statehash": 1,
]
let serverCommandNames = Set(serverCommandArity.keys)

/// The Redis version clients are told (the command set and replies follow Redis 7).
let redisVersion = "7.0.0"

extension RESPConnection {
    func runServerCommand(_ name: String, _ a: [[UInt8]], original: String) {
        guard let arity = serverCommandArity[name] else {
            return write(.error(unknownCommand(original, a)))
        }
        let count = a.count + 1
        guard arity >= 0 ? count == arity : count >= -arity else {
            return write(.error("ERR wrong number of arguments for '\(name)' command"))
        }
        func text(_ index: Int) -> String { String(decoding: a[index], as: UTF8.self) }
        switch name {
        case "ping":
            if a.count > 1 { return write(.error("ERR wrong number of arguments for 'ping' command")) }
            write(a.isEmpty ? .simple("PONG") : .bulk(a[0]))
        case "echo":
            write(.bulk(a[0]))
        case "quit":
            write(.ok)
            closeAfterFlush()
        case "reset":
            transaction = nil
            transactionFailed = false
            transactionLocal = []
            transactionDatabase = nil
            watched = []
            queuedBytes = 0
            watchedBytes = 0
            database = 0
            readonly = false
            protocolVersion = 2
            self.name = ""
            authenticated = server.configuration.requirePassword == nil
            write(.simple("RESET"))
        case "auth":
            guard a.count <= 2 else { return write(.error("ERR syntax error")) }
            authenticate(user: a.count == 2 ? a[0] : Array("default".utf8), password: a[a.count - 1], reply: true)
        case "hello":
            hello(a)
        case "select":
            guard let number = parseInteger(a[0]) else { return write(.error("ERR value is not an integer or out of range")) }
            guard (0..<Int64(KVStore.databaseCount)).contains(number) else { return write(.error("ERR DB index is out of range")) }
            select(Int(number))
            write(.ok)
        case "readonly":
            readonly = true
            write(.ok)
        case "readwrite":
            readonly = false
            write(.ok)
        case "multi":
            guard transaction == nil else { return write(.error("ERR MULTI calls can not be nested")) }
            transaction = []
            transactionFailed = false
            transactionLocal = []
            transactionDatabase = nil
            queuedBytes = 0
            write(.ok)
        case "discard":
            guard transaction != nil else { return write(.error("ERR DISCARD without MULTI")) }
            transaction = nil
            transactionLocal = []
            transactionDatabase = nil
            watched = []
            queuedBytes = 0
            watchedBytes = 0
            write(.ok)
        case "exec":
            exec()
        case "watch":
            guard transaction == nil else { return write(.error("ERR WATCH inside MULTI is not allowed")) }
            let size = a.reduce(0) { $0 + KVEntry.watchedKeySize($1) }
            guard KVEntry.transactionHeaderSize + watchedBytes + size <= transactionBytesMax else {
                return write(.error("ERR keel: too many watched keys: they and the transaction must fit in one log entry of at most \(transactionBytesMax) bytes"))
            }
            let database = self.database
            let keys = a
            let node = server.node
            // The revisions are read on the node's loop; `watched` changes on this connection's.
            let found = NIOLockedValueBox<[KVEntry.WatchedKey]>([])
            answerLater(then: { replies in
                if replies.first == .ok {
                    self.watched += found.withLockedValue { $0 }
                    self.watchedBytes += size
                }
            }) { done in
                node.read(consistency: .linearizable, { store in
                    keys.map { KVEntry.WatchedKey(database: database, key: $0, revision: store.currentRevision(database: database, key: $0)) }
                }, completion: { result in
                    switch result {
                    case .success(let keys):
                        found.withLockedValue { $0 = keys }
                        done([.ok])
                    case .failure(let error):
                        done([.error(RESPConnection.describe(error))])
                    }
                })
            }
        case "unwatch":
            watched = []
            watchedBytes = 0
            write(.ok)
        case "client":
            client(a)
        case "command":
            command(a)
        case "config":
            config(a)
        case "time":
            let now = KeelServer.nowMilliseconds()
            write(.array([.bulk(String(now / 1000)), .bulk(String((now % 1000) * 1000))]))
        case "info":
            publishCounters()
            let sections = Set(a.map { String(decoding: $0, as: UTF8.self).lowercased() })
            let server = self.server
            self.answerLater(server.node.eventLoop.makeFutureWithTask { [.bulk(await server.info(sections: sections))] })
        case "wait":
            guard let wanted = parseInteger(a[0]), let timeout = parseInteger(a[1]), timeout >= 0 else {
                return write(.error("ERR value is not an integer or out of range"))
            }
            let server = self.server
            self.answerLater(server.node.eventLoop.makeFutureWithTask { [.integer(Int64(await server.replicasCaughtUp(wanted: Int(wanted), timeoutMilliseconds: timeout)))] })
        case "waitaof":
            guard parseInteger(a[0]) != nil, let wanted = parseInteger(a[1]), let timeout = parseInteger(a[2]), timeout >= 0 else {
                return write(.error("ERR value is not an integer or out of range"))
            }
            let server = self.server
            let local: Int64 = server.configuration.fsync == .always ? 1 : 0
            self.answerLater(server.node.eventLoop.makeFutureWithTask {
                let replicas = await server.replicasCaughtUp(wanted: Int(wanted), timeoutMilliseconds: timeout)
                return [.array([.integer(local), .integer(Int64(server.configuration.fsync == .always ? replicas : 0))])]
            })
        case "save":
            let server = self.server
            self.answerLater(server.node.eventLoop.makeFutureWithTask {
                do {
                    try await server.checkpoint()
                    return [.ok]
                } catch {
                    return [.error(RESPConnection.describe(error))]
                }
            })
        case "bgsave":
            let server = self.server
            Task { try? await server.checkpoint() }
            write(.simple("Background saving started"))
        case "lastsave":
            write(.integer(server.stats.withLockedValue { $0.lastCheckpointUnixSeconds }))
        case "keel.member":
            member(a)
        case "keel.statehash":
            // This node's applied index, a digest of its state there, and its key count: replicas
            // that agree at the same index have converged (keel torture compares them).
            answerLater(server.node.inspect { store, applied in
                let keys = (0..<KVStore.databaseCount).reduce(0) { $0 + store.keyCount(database: $1) }
                return [.array([.integer(Int64(applied.rawValue)), .bulk(Array(String(store.stateDigest(), radix: 16).utf8)), .integer(Int64(keys))])]
            })
        default:
            write(.error(unknownCommand(name, a)))
        }
    }

    private func authenticate(user: [UInt8], password: [UInt8], reply: Bool) {
        guard let required = server.configuration.requirePassword.map({ Array($0.utf8) }) else {
            if reply {
                write(.error("ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?"))
            }
            return
        }
        guard credentialsMatch(user: user, password: password, required: required) else {
            // (A failed AUTH leaves an authenticated connection authenticated, as Redis.)
            if reply { write(.error("WRONGPASS invalid username-password pair or user is disabled.")) }
            return
        }
        authenticated = true
        if reply { write(.ok) }
    }

    private func hello(_ a: [[UInt8]]) {
        let request: HelloRequest
        switch HelloRequest.parse(a) {
        case .success(let parsed): request = parsed
        case .failure(.message(let message)): return write(.error(message))
        }
        if let credentials = request.credentials {
            guard credentialsMatch(user: credentials.user, password: credentials.password, required: server.configuration.requirePassword.map { Array($0.utf8) }) else {
                return write(.error("WRONGPASS invalid username-password pair or user is disabled."))
            }
            authenticated = true
        }
        let version = request.version ?? protocolVersion
        let newName = request.name
        guard authenticated else { return write(.error("NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO <proto> AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time")) }
        if let newName { name = newName }
        protocolVersion = version
        server.clients.withLockedValue {
            $0[id]?.protocolVersion = version
            $0[id]?.name = name
        }
        write(.map([
            (.bulk("server"), .bulk("redis")), (.bulk("version"), .bulk(redisVersion)), (.bulk("proto"), .integer(Int64(version))),
            (.bulk("id"), .integer(Int64(id))), (.bulk("mode"), .bulk("standalone")), (.bulk("role"), .bulk("master")),
            (.bulk("modules"), .array([])),
        ]))
    }

    private func exec() {
        guard let queued = transaction else { return write(.error("ERR EXEC without MULTI")) }
        transaction = nil
        let local = transactionLocal
        let selected = transactionDatabase
        transactionLocal = []
        transactionDatabase = nil
        let watched = self.watched
        self.watched = []
        queuedBytes = 0
        watchedBytes = 0
        if transactionFailed {
            transactionFailed = false
            return write(.error("EXECABORT Transaction discarded because of previous errors."))
        }
        if queued.isEmpty && watched.isEmpty {
            if let selected { select(selected) }
            return write(.array(local.map(\.reply)))
        }
        let entry = KVEntry.transaction(watched: watched, commands: queued).encoded(now: KeelServer.nowMilliseconds())
        let node = server.node
        answerLater(then: { replies in
            // Not aborted by a WATCH: a SELECT inside it takes effect.
            if let selected, case .array(_?) = replies.first { self.select(selected) }
        }) { done in
            node.propose(entry) { result in
                switch result {
                case .success(let bytes):
                    guard case .array(var replies?) = Reply(decoding: bytes) else { return done([Reply(decoding: bytes)]) }
                    // The connection's own replies go in their places.
                    for (position, reply) in local { replies.insert(reply, at: min(position, replies.count)) }
                    done([.array(replies)])
                case .failure(let error):
                    done([.error(RESPConnection.describe(error))])
                }
            }
        }
    }

    /// Makes `number` the connection's database.
    func select(_ number: Int) {
        database = number
        server.clients.withLockedValue { $0[id]?.database = number }
    }

    private func client(_ a: [[UInt8]]) {
        publishLastCommand()
        let sub = String(decoding: a[0], as: UTF8.self).lowercased()
        switch (sub, a.count) {
        case ("setname", 2):
            let newName = String(decoding: a[1], as: UTF8.self)
            guard !newName.contains(" "), !newName.contains("\n") else {
                return write(.error("ERR Client names cannot contain spaces, newlines or special characters."))
            }
            name = newName
            server.clients.withLockedValue { $0[id]?.name = newName }
            write(.ok)
        case ("getname", 1):
            write(name.isEmpty ? .null : .bulk(name))
        case ("id", 1):
            write(.integer(Int64(id)))
        case ("info", 1):
            write(.bulk(clientLine(server.clients.withLockedValue { $0[id] }) + "\n"))
        case ("list", _):
            let all = server.clients.withLockedValue { Array($0.values) }.sorted { $0.id < $1.id }
            write(.bulk(all.map(clientLine).joined(separator: "\n") + "\n"))
        case ("setinfo", 3):
            write(.ok)
        case ("no-evict", 2), ("no-touch", 2), ("reply", 2):
            write(.ok)
        default:
            write(.error("ERR unknown subcommand '\(sub)'. Try CLIENT HELP."))
        }
    }

    private func clientLine(_ info: ClientInfo?) -> String {
        guard let info else { return "" }
        let age = Int(Date().timeIntervalSince(info.connectedAt))
        return "id=\(info.id) addr=\(info.address) name=\(info.name) age=\(age) db=\(info.database) cmd=\(info.lastCommand) resp=\(info.protocolVersion)"
    }

    private func command(_ a: [[UInt8]]) {
        let all = kvCommandArity.merging(serverCommandArity) { first, _ in first }
        guard let sub = a.first.map({ String(decoding: $0, as: UTF8.self).lowercased() }) else {
            return write(.array(all.keys.sorted().map { commandInfo($0, all[$0]!) }))
        }
        switch sub {
        case "count": write(.integer(Int64(all.count)))
        case "info":
            let names = a.dropFirst().map { String(decoding: $0, as: UTF8.self).lowercased() }
            write(.array((names.isEmpty ? all.keys.sorted() : names).map { command in all[command].map { commandInfo(command, $0) } ?? .array(nil) }))
        case "docs": write(.map([]))
        case "list": write(.array(all.keys.sorted().map { .bulk($0) }))
        default: write(.error("ERR unknown subcommand '\(sub)'. Try COMMAND HELP."))
        }
    }

    private func commandInfo(_ name: String, _ arity: Int) -> Reply {
        let isWrite = (try? KVCommand.parse(name, [], now: 0)).map(\.isWrite) ?? ["set", "del", "incr", "mset"].contains(name)
        return .array([.bulk(name), .integer(Int64(arity)), .array([.simple(isWrite ? "write" : "readonly")]),
                       .integer(kvCommandArity[name] != nil && name != "dbsize" && name != "randomkey" && !name.hasPrefix("flush") ? 1 : 0),
                       .integer(kvCommandArity[name] != nil && name != "dbsize" ? 1 : 0), .integer(1)])
    }

    private func config(_ a: [[UInt8]]) {
        let sub = String(decoding: a[0], as: UTF8.self).lowercased()
        guard sub == "get" else {
            if sub == "set" { return write(.error("ERR keel: settings are given on the command line (keel serve --help); CONFIG SET is not supported")) }
            if sub == "resetstat" { return write(.ok) }
            return write(.error("ERR unknown subcommand '\(sub)'. Try CONFIG HELP."))
        }
        let configuration = server.configuration
        let settings: [(String, String)] = [
            ("bind", configuration.bind), ("port", String(server.localPort)), ("databases", String(KVStore.databaseCount)),
            ("appendonly", "yes"), ("appendfsync", configuration.fsync.rawValue), ("save", ""), ("maxmemory", "0"),
            ("maxmemory-policy", "noeviction"), ("maxclients", String(configuration.maxClients)),
            ("proto-max-bulk-len", String(configuration.limits.bulkLengthMax)),
            ("client-query-buffer-limit", String(configuration.limits.queryBufferMax)), ("dir", configuration.dataDirectory),
            ("requirepass", configuration.requirePassword == nil ? "" : "********"), ("timeout", String(configuration.timeout)), ("tcp-keepalive", String(configuration.tcpKeepalive)),
            ("cluster-enabled", "no"), ("replica-read-only", "yes"),
            // Checkpoints play the part of AOF rewrites.
            ("auto-aof-rewrite-percentage", String(configuration.checkpointLogGrowth)),
            ("auto-aof-rewrite-min-size", String(configuration.checkpointLogBytes)),
        ]
        var pairs: [(Reply, Reply)] = []
        for pattern in a.dropFirst() {
            for (key, value) in settings where globMatch(pattern[...], Array(key.utf8)[...]) && !pairs.contains(where: { $0.0 == .bulk(key) }) {
                pairs.append((.bulk(key), .bulk(value)))
            }
        }
        write(.map(pairs))
    }

    private func member(_ a: [[UInt8]]) {
        let sub = String(decoding: a[0], as: UTF8.self).lowercased()
        let node = server.node
        func address(_ bytes: [UInt8]) -> PeerAddress? {
            let text = String(decoding: bytes, as: UTF8.self)
            guard let colon = text.lastIndex(of: ":"), let port = Int(text[text.index(after: colon)...]) else { return nil }
            return PeerAddress(host: String(text[..<colon]), port: port)
        }
        func run(_ body: @escaping @Sendable () async throws -> Void) {
            self.answerLater(node.eventLoop.makeFutureWithTask {
                do {
                    try await body()
                    return [.ok]
                } catch {
                    return [.error(RESPConnection.describe(error))]
                }
            })
        }
        switch (sub, a.count) {
        case ("list", 1):
            self.answerLater(node.eventLoop.makeFutureWithTask {
                guard let status = try? await node.status() else { return [.error("ERR keel: the node is shutting down")] }
                return [.array(status.members.map { member in
                    .bulk("id=\(member.id.rawValue) address=\(member.address?.description ?? "?") role=\(member.isVoter ? "voter" : "learner")"
                          + " leader=\(status.leader == member.id ? "yes" : "no") match=\(member.matchIndex.map { String($0.rawValue) } ?? "?")")
                })]
            })
        case ("add", 3), ("add", 4):
            guard let id = parseInteger(a[1]), id > 0, let peer = address(a[2]) else { return write(.error("ERR syntax: KEEL.MEMBER ADD id host:port [LEARNER|VOTER]")) }
            let asVoter = a.count == 4 && String(decoding: a[3], as: UTF8.self).lowercased() == "voter"
            if a.count == 4, !["voter", "learner"].contains(String(decoding: a[3], as: UTF8.self).lowercased()) { return write(.error("ERR syntax error")) }
            run { asVoter ? try await node.addMember(NodeID(UInt64(id)), address: peer) : try await node.addLearner(NodeID(UInt64(id)), address: peer) }
        case ("remove", 2):
            guard let id = parseInteger(a[1]), id > 0 else { return write(.error("ERR value is not an integer or out of range")) }
            run { try await node.removeMember(NodeID(UInt64(id))) }
        case ("promote", 2):
            guard let id = parseInteger(a[1]), id > 0 else { return write(.error("ERR value is not an integer or out of range")) }
            run { try await node.promote(NodeID(UInt64(id))) }
        default:
            write(.error("ERR syntax: KEEL.MEMBER LIST | ADD id host:port [LEARNER|VOTER] | REMOVE id | PROMOTE id"))
        }
    }
}

extension KeelServer {
    /// Takes a checkpoint now and records when.
    func checkpoint() async throws {
        let index = try await node.checkpoint()
        stats.withLockedValue {
            $0.lastCheckpointUnixSeconds = Int64(Date().timeIntervalSince1970)
            $0.checkpointsTaken += 1
            $0.checkpointIndexSeen = max($0.checkpointIndexSeen ?? 0, index.rawValue)
        }
    }

    /// Counts a checkpoint the node took by itself (its thresholds) or received, for LASTSAVE,
    /// INFO and /metrics: the sweeper reports the node's checkpoint index every 100 ms.
    func noteCheckpoint(at index: UInt64) {
        stats.withLockedValue { stats in
            defer { stats.checkpointIndexSeen = max(stats.checkpointIndexSeen ?? index, index) }
            guard let seen = stats.checkpointIndexSeen, index > seen else { return }
            stats.lastCheckpointUnixSeconds = Int64(Date().timeIntervalSince1970)
            stats.checkpointsTaken += 1
        }
    }

    /// Followers whose log holds everything committed now, waiting up to the timeout (0: no
    /// limit, as Redis; bounded here by 60 s) for `wanted` of them.
    func replicasCaughtUp(wanted: Int, timeoutMilliseconds: Int64) async -> Int {
        let deadline = ContinuousClock.now + .milliseconds(timeoutMilliseconds == 0 ? 60_000 : min(timeoutMilliseconds, 3_600_000))
        var caughtUp = 0
        while true {
            guard let status = try? await node.status(), status.role == .leader else { return 0 }
            caughtUp = status.members.filter { $0.id != status.id && ($0.matchIndex ?? .zero) >= status.commitIndex }.count
            if caughtUp >= wanted || ContinuousClock.now >= deadline { return caughtUp }
            try? await Task.sleep(for: .milliseconds(10))
        }
    }

    /// The INFO text.
    func info(sections requested: Set<String>) async -> String {
        let all = requested.isEmpty || requested.contains("all") || requested.contains("everything") || requested.contains("default")
        func wants(_ section: String) -> Bool { all || requested.contains(section) }
        var text = ""
        let status = try? await node.status()
        let stats = self.stats.withLockedValue { $0 }
        let clients = self.clients.withLockedValue { $0.count }
        if wants("server") {
            text += "# Server\r\nredis_version:\(redisVersion)\r\nkeel_version:0.1.0\r\nredis_mode:standalone\r\nos:Linux\r\n"
            text += "process_id:\(getpid())\r\ntcp_port:\(localPort)\r\nuptime_in_seconds:\(Int(Date().timeIntervalSince(startedAt)))\r\n\r\n"
        }
        if wants("clients") {
            text += "# Clients\r\nconnected_clients:\(clients)\r\nmaxclients:\(configuration.maxClients)\r\n\r\n"
        }
        if wants("memory") {
            text += "# Memory\r\nused_memory:\(residentBytes())\r\nused_memory_rss:\(residentBytes())\r\nmaxmemory:0\r\nmaxmemory_policy:noeviction\r\n\r\n"
        }
        if wants("persistence") {
            text += "# Persistence\r\nloading:0\r\naof_enabled:1\r\nappendfsync:\(configuration.fsync.rawValue)\r\n"
            text += "rdb_last_save_time:\(stats.lastCheckpointUnixSeconds)\r\nkeel_checkpoints_taken:\(stats.checkpointsTaken)\r\n"
            text += "keel_snapshot_index:\(status?.snapshotIndex.rawValue ?? 0)\r\n\r\n"
        }
        if wants("stats") {
            text += "# Stats\r\ntotal_connections_received:\(stats.connectionsReceived)\r\ntotal_commands_processed:\(stats.commandsProcessed)\r\n"
            text += "rejected_connections:\(stats.connectionsRejected)\r\nexpired_keys:\(stats.expiredKeys)\r\ntotal_error_replies:\(stats.errorReplies)\r\n\r\n"
        }
        if wants("replication") {
            let followers = status?.members.filter { $0.id != status?.id } ?? []
            text += "# Replication\r\nrole:\(status?.role == .leader ? "master" : "slave")\r\nconnected_slaves:\(status?.role == .leader ? followers.count : 0)\r\n"
            if status?.role == .leader {
                for (position, member) in followers.enumerated() {
                    let address = member.address ?? PeerAddress(host: "?", port: 0)
                    text += "slave\(position):ip=\(address.host),port=\(address.port),state=online,offset=\(member.matchIndex?.rawValue ?? 0),lag=0\r\n"
                }
            }
            text += "master_repl_offset:\(status?.commitIndex.rawValue ?? 0)\r\n\r\n"
        }
        if wants("keyspace") {
            let counts = (try? await node.read(consistency: .local) { store in
                (0..<KVStore.databaseCount).map { (store.keyCount(database: $0), store.volatileCount(database: $0)) }
            }) ?? []
            text += "# Keyspace\r\n"
            for (database, count) in counts.enumerated() where count.0 > 0 {
                text += "db\(database):keys=\(count.0),expires=\(count.1),avg_ttl=0\r\n"
            }
            text += "\r\n"
        }
        if wants("keel") {
            text += "# Keel\r\nkeel_node_id:\(configuration.nodeID.rawValue)\r\nkeel_role:\(status?.role.rawValue ?? "stopped")\r\n"
            text += "keel_term:\(status?.term.rawValue ?? 0)\r\nkeel_leader_id:\(status?.leader?.rawValue ?? 0)\r\n"
            text += "keel_commit_index:\(status?.commitIndex.rawValue ?? 0)\r\nkeel_applied_index:\(status?.appliedIndex.rawValue ?? 0)\r\n"
            text += "keel_members:\(status?.members.map { "\($0.id.rawValue)\($0.isVoter ? "" : "(learner)")" }.joined(separator: ",") ?? "")\r\n"
            if let stopped = status?.stopped { text += "keel_stopped:\(stopped)\r\n" }
            text += "keel_shared_write_entries:\(stats.sharedWriteEntries)\r\nkeel_shared_writes:\(stats.sharedWrites)\r\n"
            text += "keel_direct_writes:\(stats.directWrites)\r\nkeel_channel_writes:\(stats.channelWrites)\r\n"
            text += "\r\n"
        }
        return text
    }

    /// Resident memory of this process, from /proc.
    func residentBytes() -> Int {
        guard let statm = try? String(contentsOfFile: "/proc/self/statm", encoding: .utf8) else { return 0 }
        let fields = statm.split(separator: " ")
        guard fields.count > 1, let pages = Int(fields[1]) else { return 0 }
        return pages * Int(sysconf(Int32(_SC_PAGESIZE)))
    }
}
