import Foundation
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// The directory with the built executables (beside the test bundle).
func builtProducts() -> String {
    if let override = ProcessInfo.processInfo.environment["KEEL_PRODUCTS_DIR"] { return override }
    var url = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
    while url.path != "/" {
        url.deleteLastPathComponent()
        if FileManager.default.isExecutableFile(atPath: url.appendingPathComponent("keel-node-harness").path) { return url.path }
    }
    return FileManager.default.currentDirectoryPath + "/.build/debug"
}

/// A `keel-node-harness` process: tagged request lines in, tagged reply lines out.
final class NodeProcess: @unchecked Sendable {
    // @unchecked Sendable: `state` is behind a lock; the rest is set once.
    let id: UInt64
    let arguments: [String]
    private let process = Process()
    private let input = Pipe()
    private struct State {
        var waiting: [String: CheckedContinuation<String, Never>] = [:]
        var ready: CheckedContinuation<Void, Never>?
        var isReady = false
        var next = 0
        var exited = false
    }
    private let state = NIOLockedValueBox(State())

    init(id: UInt64, arguments: [String]) throws {
        self.id = id
        self.arguments = arguments
        process.executableURL = URL(fileURLWithPath: builtProducts() + "/keel-node-harness")
        process.arguments = arguments
        process.standardInput = input
        let output = Pipe()
        process.standardOutput = output
        process.standardError = FileHandle.nullDevice
        let reader = output.fileHandleForReading
        process.terminationHandler = { [state] _ in
            let (waiting, ready) = state.withLockedValue { state -> ([CheckedContinuation<String, Never>], CheckedContinuation<Void, Never>?) in
                state.exited = true
                defer {
                    state.waiting = [:]
                    state.ready = nil
                }
                return (Array(state.waiting.values), state.ready)
            }
            for continuation in waiting { continuation.resume(returning: "exited") }
            // A node that exits before it is ready (a port taken meanwhile) must not hang its test.
            ready?.resume()
        }
        try process.run()
        Thread.detachNewThread { [state] in
            var buffer = Data()
            while true {
                let chunk = reader.availableData
                if chunk.isEmpty { break }
                buffer.append(chunk)
                while let newline = buffer.firstIndex(of: 10) {
                    let line = String(decoding: buffer[buffer.startIndex..<newline], as: UTF8.self)
                    buffer.removeSubrange(buffer.startIndex...newline)
                    if line == "ready" {
                        let continuation = state.withLockedValue { state -> CheckedContinuation<Void, Never>? in
                            state.isReady = true
                            defer { state.ready = nil }
                            return state.ready
                        }
                        continuation?.resume()
                        continue
                    }
                    let parts = line.split(separator: " ", maxSplits: 1)
                    guard parts.count == 2 else { continue }
                    let continuation = state.withLockedValue { $0.waiting.removeValue(forKey: String(parts[0])) }
                    continuation?.resume(returning: String(parts[1]))
                }
            }
        }
    }

    var pid: Int32 { process.processIdentifier }
    /// Whether the process is still there: not if Foundation saw it exit, or if it is gone or a
    /// zombie by /proc. (A full-suite run once hung for good in a test of this file with every
    /// node process gone; a wait that trusted `Process.isRunning` alone, unbounded, is one way
    /// that could happen, so it is not the only word on it.)
    var isRunning: Bool {
        guard process.isRunning, !state.withLockedValue({ $0.exited }) else { return false }
        guard let stat = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return false }
        return !stat[stat.index(after: close)...].trimmingCharacters(in: .whitespaces).hasPrefix("Z")
    }

    /// Waits for the node's "ready" line; false if the process exited first or 60 s passed.
    @discardableResult
    func waitUntilReady(seconds: Double = 60) async -> Bool {
        await withCheckedContinuation { continuation in
            let now = state.withLockedValue { state -> Bool in
                if state.isReady || state.exited { return true }
                state.ready = continuation
                return false
            }
            if now { return continuation.resume() }
            DispatchQueue.global().asyncAfter(deadline: .now() + seconds) { [state] in
                state.withLockedValue { state -> CheckedContinuation<Void, Never>? in
                    defer { state.ready = nil }
                    return state.ready
                }?.resume()
            }
        }
        return state.withLockedValue { $0.isReady }
    }

    /// Sends a request and returns the reply (without its tag); "timeout" after `seconds`.
    func request(_ text: String, seconds: Double = 10) async -> String {
        let tag = state.withLockedValue { state -> String? in
            if state.exited { return nil }
            state.next += 1
            return "r\(state.next)"
        }
        guard let tag else { return "exited" }
        return await withCheckedContinuation { continuation in
            state.withLockedValue { $0.waiting[tag] = continuation }
            input.fileHandleForWriting.write(Data("\(tag) \(text)\n".utf8))
            DispatchQueue.global().asyncAfter(deadline: .now() + seconds) { [state] in
                state.withLockedValue { $0.waiting.removeValue(forKey: tag) }?.resume(returning: "timeout")
            }
        }
    }

    /// The status fields (role, term, leader, applied, commit, members).
    func status() async -> [String: String]? {
        let reply = await request("status", seconds: 3)
        guard reply.hasPrefix("status ") else { return nil }
        var fields: [String: String] = [:]
        for pair in reply.dropFirst(7).split(separator: " ") {
            let parts = pair.split(separator: "=", maxSplits: 1)
            if parts.count == 2 { fields[String(parts[0])] = String(parts[1]) }
        }
        return fields
    }

    func signal(_ signal: Int32) { kill(process.processIdentifier, signal) }

    /// SIGKILL, then waits for the exit (at most 30 s).
    func kill9() async {
        signal(SIGKILL)
        for _ in 0..<3000 where isRunning { try? await Task.sleep(for: .milliseconds(10)) }
    }

    /// Closes its input (it shuts down cleanly) and waits, or kills it after 10 s.
    func stop() async {
        if isRunning { try? input.fileHandleForWriting.close() }
        for _ in 0..<1000 where isRunning { try? await Task.sleep(for: .milliseconds(10)) }
        if isRunning { await kill9() }
    }
}

/// A TCP proxy a test can cut and restore: forwards every connection to `target`.
final class CuttableProxy: @unchecked Sendable {
    // @unchecked Sendable: `state` is behind a lock; the rest is set once.
    let target: Int
    private let group: any EventLoopGroup
    private var server: (any Channel)?
    private let state = NIOLockedValueBox((cut: false, channels: [any Channel](), accepted: 0))
    private(set) var port = 0

    init(target: Int, group: any EventLoopGroup) {
        self.target = target
        self.group = group
    }

    func start() async throws {
        let server = try await ServerBootstrap(group: group)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { inbound in
                if self.state.withLockedValue({ $0.cut }) { return inbound.close() }
                return ClientBootstrap(group: inbound.eventLoop)
                    .connect(host: "127.0.0.1", port: self.target)
                    .flatMap { outbound in
                        self.state.withLockedValue {
                            $0.channels += [inbound, outbound]
                            $0.accepted += 1
                        }
                        return inbound.pipeline.addHandler(Forwarder(peer: outbound)).flatMap {
                            outbound.pipeline.addHandler(Forwarder(peer: inbound))
                        }.map {
                            inbound.read()
                        }
                    }
            }
            .bind(host: "127.0.0.1", port: 0).get()
        self.server = server
        port = server.localAddress!.port!
    }

    /// Closes every forwarded connection and refuses new ones until `restore()`.
    func cut() {
        let channels = state.withLockedValue { state -> [any Channel] in
            state.cut = true
            defer { state.channels = [] }
            return state.channels
        }
        for channel in channels { channel.close(promise: nil) }
    }

    func restore() { state.withLockedValue { $0.cut = false } }

    /// Connections forwarded so far.
    var accepted: Int { state.withLockedValue { $0.accepted } }

    func stop() async {
        cut()
        try? await server?.close()
    }

    /// Copies bytes to the peer channel; closes it when this side closes.
    private final class Forwarder: ChannelInboundHandler, @unchecked Sendable {
        typealias InboundIn = ByteBuffer
        let peer: any Channel
        init(peer: any Channel) { self.peer = peer }

        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            peer.writeAndFlush(unwrapInboundIn(data), promise: nil)
        }

        func channelReadComplete(context: ChannelHandlerContext) { context.read() }
        func channelActive(context: ChannelHandlerContext) { context.read() }
        func channelInactive(context: ChannelHandlerContext) { peer.close(promise: nil) }
        func errorCaught(context: ChannelHandlerContext, error: any Error) { context.close(promise: nil) }
    }
}
