// HTTP on --http-port: /metrics (Prometheus text format), /health, and a status page (/) that
// shows the cluster at a glance. Plain server-rendered HTML; nothing is loaded from elsewhere.

import Foundation
import Keel
import KeelCore
import KeelRaft
import NIOConcurrencyHelpers
import NIOCore
import NIOHTTP1
import NIOPosix

/// Command latencies in fixed buckets (seconds), for /metrics.
struct LatencyHistogram: Sendable {
    static let bounds: [Double] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
    var counts = Array(repeating: 0, count: LatencyHistogram.bounds.count + 1)
    var sum = 0.0
    var total = 0

    mutating func record(_ seconds: Double, times: Int = 1) {
        let bucket = Self.bounds.firstIndex { seconds <= $0 } ?? Self.bounds.count
        counts[bucket] += times
        sum += seconds * Double(times)
        total += times
    }
}

extension KeelServer {
    func startHTTP(port: Int) async throws -> any Channel {
        try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.pipeline.configureHTTPServerPipeline().flatMap {
                    channel.pipeline.addHandler(HTTPHandler(server: self))
                }
            }
            .bind(host: configuration.bind, port: port).get()
    }

    /// The Prometheus text.
    func metrics() async -> String {
        let status = try? await node.status()
        let stats = self.stats.withLockedValue { $0 }
        let clients = self.clients.withLockedValue { $0.count }
        var text = ""
        func metric(_ name: String, _ type: String, _ help: String, _ samples: [(String, Double)]) {
            text += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
            for (labels, value) in samples {
                let shown = value == value.rounded() && abs(value) < 1e15 ? String(Int64(value)) : String(value)
                text += "\(name)\(labels) \(shown)\n"
            }
        }
        metric("keel_commands_total", "counter", "Commands received.", [("", Double(stats.commandsProcessed))])
        metric("keel_error_replies_total", "counter", "Error replies sent.", [("", Double(stats.errorReplies))])
        metric("keel_connections_received_total", "counter", "Client connections accepted.", [("", Double(stats.connectionsReceived))])
        metric("keel_connected_clients", "gauge", "Client connections open.", [("", Double(clients))])
        metric("keel_expired_keys_total", "counter", "Keys deleted through the log because they expired.", [("", Double(stats.expiredKeys))])
        metric("keel_shared_write_entries_total", "counter", "Log entries applied that carried the single writes of several clients together.",
               [("", Double(stats.sharedWriteEntries))])
        metric("keel_shared_writes_total", "counter", "Single writes applied in an entry shared with other clients' writes.",
               [("", Double(stats.sharedWrites))])
        metric("keel_direct_writes_total", "counter", "Writes of replies sent straight to a client's socket.", [("", Double(stats.directWrites))])
        metric("keel_channel_writes_total", "counter", "Writes of replies handed to a client's channel (NIO).", [("", Double(stats.channelWrites))])
        text += "# HELP keel_command_duration_seconds Time from a key-value command's arrival to its reply.\n"
        text += "# TYPE keel_command_duration_seconds histogram\n"
        for (kind, histogram) in [("write", stats.writeLatency), ("read", stats.readLatency)] {
            var cumulative = 0
            for (index, bound) in LatencyHistogram.bounds.enumerated() {
                cumulative += histogram.counts[index]
                text += "keel_command_duration_seconds_bucket{kind=\"\(kind)\",le=\"\(bound)\"} \(cumulative)\n"
            }
            text += "keel_command_duration_seconds_bucket{kind=\"\(kind)\",le=\"+Inf\"} \(histogram.total)\n"
            text += "keel_command_duration_seconds_sum{kind=\"\(kind)\"} \(histogram.sum)\n"
            text += "keel_command_duration_seconds_count{kind=\"\(kind)\"} \(histogram.total)\n"
        }
        let log = node.logStatistics
        metric("keel_fsyncs_total", "counter", "fdatasync calls on the log since the start.", [("", Double(log.syncs))])
        metric("keel_log_bytes_written_total", "counter", "Bytes written to the log since the start.", [("", Double(log.bytesWritten))])
        metric("keel_checkpoint_age_seconds", "gauge", "Seconds since the last checkpoint (or the start).",
               [("", Double(Int64(Date().timeIntervalSince1970) - stats.lastCheckpointUnixSeconds))])
        if let status {
            metric("keel_raft_term", "gauge", "The Raft term.", [("", Double(status.term.rawValue))])
            let roles: [Role] = [.follower, .preCandidate, .candidate, .leader]
            metric("keel_raft_role", "gauge", "1 for this node's role.", roles.map { ("{role=\"\($0.rawValue)\"}", status.role == $0 ? 1 : 0) })
            metric("keel_raft_commit_index", "gauge", "The commit index.", [("", Double(status.commitIndex.rawValue))])
            metric("keel_raft_applied_index", "gauge", "The applied index.", [("", Double(status.appliedIndex.rawValue))])
            metric("keel_raft_snapshot_index", "gauge", "The newest checkpoint's index.", [("", Double(status.snapshotIndex.rawValue))])
            let lag = status.members.filter { $0.id != status.id && $0.matchIndex != nil }.map { member in
                ("{peer=\"\(member.id.rawValue)\"}", Double(status.lastIndex.rawValue - min(status.lastIndex.rawValue, member.matchIndex!.rawValue)))
            }
            metric("keel_raft_peer_lag_entries", "gauge", "Entries a peer is behind the leader's log (on the leader).", lag)
        }
        return text
    }

    /// The status page.
    func statusPage() async -> String {
        let status = try? await node.status()
        func escape(_ text: String) -> String {
            text.replacingOccurrences(of: "&", with: "&amp;").replacingOccurrences(of: "<", with: "&lt;").replacingOccurrences(of: ">", with: "&gt;")
        }
        var rows = ""
        for member in status?.members ?? [] {
            let lag = member.matchIndex.map { String((status?.lastIndex.rawValue ?? 0) - min(status?.lastIndex.rawValue ?? 0, $0.rawValue)) } ?? "?"
            let role = status?.leader == member.id ? "leader" : (member.isVoter ? "voter" : "learner")
            rows += "<tr id=\"member-\(member.id.rawValue)\"><td>\(member.id.rawValue)\(member.id == status?.id ? " (this node)" : "")</td>"
            rows += "<td>\(escape(member.address?.description ?? "?"))</td><td class=\"role\">\(role)</td>"
            rows += "<td>\(member.matchIndex.map { String($0.rawValue) } ?? "?")</td><td>\(lag)</td></tr>\n"
        }
        let summary = status.map {
            "Node \($0.id.rawValue) is <b id=\"role\">\($0.role.rawValue)</b> in term <b id=\"term\">\($0.term.rawValue)</b>; leader: <b id=\"leader\">\($0.leader.map { String($0.rawValue) } ?? "none")</b>; commit <b id=\"commit\">\($0.commitIndex.rawValue)</b>, applied <b id=\"applied\">\($0.appliedIndex.rawValue)</b>, checkpoint \($0.snapshotIndex.rawValue)."
                + ($0.stopped.map { " <b class=\"stopped\">Stopped: \(escape($0))</b>" } ?? "")
        } ?? "The node is shutting down."
        return """
        <!doctype html>
        <html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="2"><title>Keel node \(configuration.nodeID.rawValue)</title>
        <style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.3em .8em;text-align:left}</style>
        </head><body><h1>Keel</h1><p id="summary">\(summary)</p>
        <table id="members"><thead><tr><th>member</th><th>peer address</th><th>role</th><th>match index</th><th>lag (entries)</th></tr></thead>
        <tbody>
        \(rows)</tbody></table>
        <p>Match indexes and lag are known on the leader. <a href="/metrics">/metrics</a> · <a href="/health">/health</a></p>
        </body></html>
        """
    }
}

final class HTTPHandler: ChannelInboundHandler, @unchecked Sendable {
    // @unchecked Sendable: used on its channel's event loop only.
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let server: KeelServer
    private var path: String?

    init(server: KeelServer) { self.server = server }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch unwrapInboundIn(data) {
        case .head(let head):
            path = head.method == .GET ? String(head.uri.split(separator: "?").first ?? "/") : nil
        case .body:
            break
        case .end:
            let path = self.path
            let server = self.server
            let channel = context.channel
            let loop = context.eventLoop
            let future: EventLoopFuture<(HTTPResponseStatus, String, String)> = loop.makeFutureWithTask {
                switch path {
                case "/metrics": return (.ok, "text/plain; version=0.0.4; charset=utf-8", await server.metrics())
                case "/health":
                    guard let status = try? await server.node.status(), status.stopped == nil else {
                        return (.serviceUnavailable, "application/json", "{\"status\":\"stopped\"}\n")
                    }
                    let healthy = status.leader != nil
                    return (healthy ? .ok : .serviceUnavailable, "application/json",
                            "{\"status\":\"\(healthy ? "ok" : "no leader")\",\"role\":\"\(status.role.rawValue)\",\"term\":\(status.term.rawValue),\"leader\":\(status.leader?.rawValue ?? 0),\"applied\":\(status.appliedIndex.rawValue)}\n")
                case "/": return (.ok, "text/html; charset=utf-8", await server.statusPage())
                case nil: return (.methodNotAllowed, "text/plain", "only GET\n")
                default: return (.notFound, "text/plain", "not found\n")
                }
            }
            future.whenSuccess { status, type, body in
                var headers = HTTPHeaders()
                headers.add(name: "Content-Type", value: type)
                headers.add(name: "Content-Length", value: String(body.utf8.count))
                headers.add(name: "Cache-Control", value: "no-store")
                channel.write(HTTPServerResponsePart.head(HTTPResponseHead(version: .http1_1, status: status, headers: headers)), promise: nil)
                channel.write(HTTPServerResponsePart.body(.byteBuffer(ByteBuffer(string: body))), promise: nil)
                channel.writeAndFlush(HTTPServerResponsePart.end(nil), promise: nil)
            }
        }
    }
}
