// `keel serve`: the Redis-protocol server. Flags, or the same names in a config file
// (`--config FILE`, one "name value" per line, # comments); a flag wins over the file.

import ArgumentParser
import Dispatch
import Foundation
import Keel
import KeelCore
import KeelServer
import KeelStorage
import Logging

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a durable, strongly consistent key-value server that Redis clients speak to.",
        discussion: """
        With no arguments: one node on 127.0.0.1:6379, data in ./keel-data, fsync always.
        A three-node cluster on one machine:
          keel serve --port 6379 --node-id 1 --peer-port 16379 --data-dir d1 --peers 1=127.0.0.1:16379,2=127.0.0.1:16380,3=127.0.0.1:16381
          keel serve --port 6380 --node-id 2 --peer-port 16380 --data-dir d2 --peers (the same)
          keel serve --port 6381 --node-id 3 --peer-port 16381 --data-dir d3 --peers (the same)
        A fourth node joins a running cluster through any member's client port:
          keel serve --port 6382 --node-id 4 --peer-port 16382 --data-dir d4 --join 127.0.0.1:6379
        """)

    @Option(help: "A config file with the same names as the flags (\"port 6380\"); flags win.") var config: String?
    @Option(help: "Address for clients (default 127.0.0.1).") var bind: String?
    @Option(help: "Port for clients (default 6379).") var port: Int?
    @Option(name: .customLong("data-dir"), help: "Data directory (default ./keel-data).") var dataDir: String?
    @Option(help: "always (default), everysec or never.") var fsync: String?
    @Option(help: "Password every command but AUTH, HELLO and QUIT needs.") var requirepass: String?
    @Option(name: .customLong("http-port"), help: "HTTP port for /metrics, /health and the status page (0 turns it off; default 0).") var httpPort: Int?
    @Option(name: .customLong("checkpoint-entries"), help: "Applied entries between checkpoints (default 1000000).") var checkpointEntries: UInt64?
    @Option(name: .customLong("checkpoint-log-bytes"), help: "Log bytes written between checkpoints (default 67108864; 0 turns this trigger off).") var checkpointLogBytes: UInt64?
    @Option(name: .customLong("checkpoint-log-growth"), help: "A due checkpoint also waits until the log since the last one is this percentage of that checkpoint's size (default 100; 0 turns this off).") var checkpointLogGrowth: UInt64?
    @Option(name: .customLong("log-segment-bytes"), help: "Size at which a log segment is sealed and the next begun (default 67108864; 1 MiB to 1 GiB).") var logSegmentBytes: Int?
    @Option(help: "Most client connections (default 10000).") var maxclients: Int?
    @Option(help: "Close a client connection idle this many seconds (default 0: never).") var timeout: Int?
    @Option(name: .customLong("tcp-keepalive"), help: "Seconds of silence before TCP keepalive probes a client (default 300; 0 turns it off).") var tcpKeepalive: Int?
    @Option(name: .customLong("proto-max-bulk-len"), help: "Longest bulk string in bytes (default 536870912).") var protoMaxBulkLen: Int?
    @Option(name: .customLong("client-query-buffer-limit"), help: "Most unparsed bytes per client (default 1073741824).") var queryBufferLimit: Int?
    @Option(name: .customLong("sync-on-loop"), help: "With --fsync always on a single node: yes (default), the node's loop writes and syncs each group commit and waits for the disk, as Redis does; no, the log's writer thread does, and the loop goes on meanwhile.") var syncOnLoop: String?
    @Option(name: .customLong("io-threads"), help: "Event loop threads for connections and the node (default: half the cores, 1 to 8; with 1 nothing hops between threads).") var ioThreads: Int?
    @Option(name: .customLong("node-id"), help: "This node's id in a cluster (default 1).") var nodeID: UInt64?
    @Option(name: .customLong("peer-port"), help: "Port for the other nodes (default 16379).") var peerPort: Int?
    @Option(help: "Every founding member as id=host:peerport, comma-separated (this node included).") var peers: String?
    @Option(name: .customLong("peer-routes"), help: "Where to dial members instead of the addresses the cluster records, as id=host:port items (a proxy or a tunnel).") var peerRoutes: String?
    @Option(name: .customLong("cluster-token"), help: "A secret every peer presents (default \"keel\").") var clusterToken: String?
    @Option(help: "Join a running cluster through a member's client address (HOST:PORT): it adds this node as a learner, promoted once caught up.") var join: String?

    func validate() throws {
        if let fsync, FsyncPolicy(rawValue: fsync) == nil { throw ValidationError("--fsync takes always, everysec or never") }
        if let syncOnLoop, !["yes", "no"].contains(syncOnLoop) { throw ValidationError("--sync-on-loop takes yes or no") }
    }

    func run() async throws {
        MallocTuning.restartIfNeeded()
        let file = try config.map(Self.readConfig) ?? [:]
        func value(_ flag: String?, _ name: String) -> String? { flag ?? file[name] }
        func number<T: FixedWidthInteger>(_ flag: T?, _ name: String) throws -> T? {
            if let flag { return flag }
            guard let text = file[name] else { return nil }
            guard let parsed = T(text) else { throw ValidationError("\(name) in \(config ?? "") is not a number: \(text)") }
            return parsed
        }
        var settings = ServerConfiguration()
        settings.bind = value(bind, "bind") ?? settings.bind
        settings.port = try number(port, "port") ?? settings.port
        settings.dataDirectory = value(dataDir, "data-dir") ?? settings.dataDirectory
        if let policy = value(fsync, "fsync") {
            guard let parsed = FsyncPolicy(rawValue: policy) else { throw ValidationError("fsync takes always, everysec or never") }
            settings.fsync = parsed
        }
        if let choice = value(syncOnLoop, "sync-on-loop") {
            guard ["yes", "no"].contains(choice) else { throw ValidationError("sync-on-loop takes yes or no") }
            settings.syncOnLoop = choice == "yes"
        }
        settings.requirePassword = value(requirepass, "requirepass")
        settings.httpPort = try number(httpPort, "http-port") ?? settings.httpPort
        settings.checkpointEntries = try number(checkpointEntries, "checkpoint-entries") ?? settings.checkpointEntries
        settings.checkpointLogBytes = try number(checkpointLogBytes, "checkpoint-log-bytes") ?? settings.checkpointLogBytes
        settings.checkpointLogGrowth = try number(checkpointLogGrowth, "checkpoint-log-growth") ?? settings.checkpointLogGrowth
        settings.logSegmentBytes = try number(logSegmentBytes, "log-segment-bytes") ?? settings.logSegmentBytes
        settings.maxClients = try number(maxclients, "maxclients") ?? settings.maxClients
        settings.timeout = try number(timeout, "timeout") ?? settings.timeout
        settings.tcpKeepalive = try number(tcpKeepalive, "tcp-keepalive") ?? settings.tcpKeepalive
        settings.limits.bulkLengthMax = try number(protoMaxBulkLen, "proto-max-bulk-len") ?? settings.limits.bulkLengthMax
        settings.limits.queryBufferMax = try number(queryBufferLimit, "client-query-buffer-limit") ?? settings.limits.queryBufferMax
        settings.ioThreads = try number(ioThreads, "io-threads") ?? settings.ioThreads
        settings.nodeID = NodeID(try number(nodeID, "node-id") ?? 1)
        settings.peerPort = try number(peerPort, "peer-port") ?? settings.peerPort
        settings.clusterToken = value(clusterToken, "cluster-token") ?? settings.clusterToken
        let joinTarget = value(join, "join")
        if let list = value(peerRoutes, "peer-routes") { settings.peerRoutes = try Self.parsePeers(list, flag: "--peer-routes") }
        if let list = value(peers, "peers") {
            settings.peers = try Self.parsePeers(list, flag: "--peers")
            if let own = settings.peers[settings.nodeID], peerPort == nil, file["peer-port"] == nil { settings.peerPort = own.port }
        }
        if let joinTarget {
            let own = PeerAddress(host: settings.bind, port: settings.peerPort)
            do {
                settings.peers = try joinCluster(target: joinTarget, node: settings.nodeID, peerAddress: own)
            } catch {
                FileHandle.standardError.write(Data("keel serve: cannot join through \(joinTarget): \(error)\n".utf8))
                throw ExitCode(1)
            }
            settings.join = true
        }

        var logger = Logger(label: "keel")
        logger.logLevel = .notice
        let server: KeelServer
        do {
            server = try await KeelServer.start(configuration: settings, logger: logger)
        } catch {
            FileHandle.standardError.write(Data("keel serve: \(error)\n".utf8))
            throw ExitCode(1)
        }
        // SIGTERM and SIGINT: stop accepting, finish what is in flight, sync, close.
        let stop = AsyncStream<Int32> { continuation in
            for signal in [SIGTERM, SIGINT] {
                Foundation.signal(signal, SIG_IGN)
                let source = DispatchSource.makeSignalSource(signal: signal, queue: .global())
                source.setEventHandler { continuation.yield(signal) }
                source.resume()
                Self.signalSources.append(source)
            }
        }
        for await signal in stop {
            logger.notice("keel serve: \(signal == SIGTERM ? "SIGTERM" : "SIGINT"), shutting down")
            break
        }
        await server.shutdown()
        logger.notice("keel serve: stopped")
    }

    /// "1=host:port,2=host:port" as addresses by node id.
    static func parsePeers(_ list: String, flag: String) throws -> [NodeID: PeerAddress] {
        var table: [NodeID: PeerAddress] = [:]
        for item in list.split(separator: ",") {
            let parts = item.split(separator: "=", maxSplits: 1)
            guard parts.count == 2, let id = UInt64(parts[0]), id > 0, let colon = parts[1].lastIndex(of: ":"),
                  let port = Int(parts[1][parts[1].index(after: colon)...]), (1...65535).contains(port) else {
                throw ValidationError("\(flag) takes id=host:port items, comma-separated (got \(item))")
            }
            table[NodeID(id)] = PeerAddress(host: String(parts[1][..<colon]), port: port)
        }
        return table
    }

    nonisolated(unsafe) static var signalSources: [any DispatchSourceSignal] = []

    static func readConfig(_ path: String) throws -> [String: String] {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { throw ValidationError("cannot read config file \(path)") }
        var values: [String: String] = [:]
        for (number, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") { continue }
            let parts = line.split(separator: " ", maxSplits: 1).map { $0.trimmingCharacters(in: .whitespaces) }
            guard parts.count == 2 else { throw ValidationError("\(path):\(number + 1): expected \"name value\"") }
            values[parts[0].hasPrefix("--") ? String(parts[0].dropFirst(2)) : parts[0]] = parts[1]
        }
        return values
    }
}
