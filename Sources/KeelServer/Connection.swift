// One client connection: its state (database, protocol, authentication, transaction, watches,
// read consistency) and the order of its replies.
//
// Requests are handled in order. Consecutive key-value reads go to the node as one read (one
// read index for all of them); consecutive writes are proposed together (the node batches them
// into one log write); anything else runs alone. A read waits for the writes before it, so a
// connection always reads its own writes. Replies are written in request order and flushed when
// the connection has nothing more to do. A single write (not pipelined) waits for the end of the
// loop's turn and goes to the log with the other connections' of that turn, as one entry
// (`WriteBatch`); a few reads likewise run together (`ReadBatch`).

import DequeModule
import Foundation
import Keel
import KeelCore
import KeelKV
import KeelStorage
import NIOCore

/// What CLIENT LIST and INFO show of a connection.
struct ClientInfo: Sendable {
    var id: UInt64
    var address: String
    var name: String
    var database: Int
    var connectedAt: Date
    var lastCommand: String
    var protocolVersion: Int
}

enum CommandKind { case read, write }

final class RESPConnection: ChannelInboundHandler, @unchecked Sendable {
    // @unchecked Sendable: every field is touched only on the channel's event loop.
    // @exclusivity(unchecked) on the stored fields: for the same reason, and as no method
    // reaches a field while a mutation of the same field is under way, no two accesses overlap;
    // the runtime's dynamic check of each access (begin and end, a thread-local access set) was
    // 8% of the loop under pipelined SETs.
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let server: KeelServer
    let id: UInt64
    @exclusivity(unchecked) var database = 0
    @exclusivity(unchecked) var protocolVersion = 2
    var authenticated: Bool {
        didSet { authentication.limited = !authenticated }
    }
    /// The smaller request limits of a client that has not authenticated (shared with the decoder).
    let authentication: AuthenticationLimits
    @exclusivity(unchecked) var name = ""
    @exclusivity(unchecked) var readonly = false
    /// Queued commands while in MULTI.
    @exclusivity(unchecked) var transaction: [KVEntry.QueuedCommand]?
    @exclusivity(unchecked) var transactionFailed = false
    /// Commands of the transaction the connection answers itself (PING, ECHO, SELECT): their
    /// replies, at their place among the transaction's replies.
    @exclusivity(unchecked) var transactionLocal: [(position: Int, reply: Reply)] = []
    /// The database a SELECT inside the transaction chose (for the commands queued after it, and
    /// for the connection once EXEC runs).
    @exclusivity(unchecked) var transactionDatabase: Int?
    /// About the bytes the queued commands (and their locally answered replies) and the watched
    /// keys take in the transaction's log entry: both must fit in one (`commandSizeMax`), so
    /// nothing past that is kept (a client could otherwise queue or watch without bound).
    @exclusivity(unchecked) var queuedBytes = 0
    @exclusivity(unchecked) var watchedBytes = 0
    @exclusivity(unchecked) var watched: [KVEntry.WatchedKey] = []
    @exclusivity(unchecked) private var pending = Deque<RESPRequest>()
    @exclusivity(unchecked) private var busy = false
    @exclusivity(unchecked) private var closing = false
    @exclusivity(unchecked) private var output: ByteBuffer?
    /// The last buffer handed to the channel, when small: once the channel has written it (at
    /// once, as a rule) nothing else holds its storage, and the next replies are written into it
    /// again instead of a new one (two allocations a flush). Cleared while the channel still
    /// holds it, it is copied first (ByteBuffer's copy on write), so nothing unsent is touched.
    @exclusivity(unchecked) private var spare: ByteBuffer?
    static let spareCapacityMax = 4096
    /// Held from channelActive until the handler is removed (not weak: a weak reference gives the
    /// context a side table, and NIO retains and releases it many times per request).
    @exclusivity(unchecked) private var context: ChannelHandlerContext?
    @exclusivity(unchecked) private var address = "?"
    /// The batch of the connection's loop (`WriteBatch`).
    @exclusivity(unchecked) private var writeBatch: WriteBatch?

    /// Decodes the bytes as they arrive, here rather than in a handler of its own: no pipeline
    /// step per request.
    @exclusivity(unchecked) private var decoder: RESPRequestDecoder
    /// Bytes received and not yet decoded (the start of a request that continues in a later read).
    @exclusivity(unchecked) private var unread: ByteBuffer?

    init(server: KeelServer, authentication: AuthenticationLimits) {
        self.server = server
        self.authentication = authentication
        decoder = RESPRequestDecoder(limits: server.configuration.limits, authentication: authentication,
                                     password: server.configuration.requirePassword)
        id = server.newClientID()
        authenticated = server.configuration.requirePassword == nil
        authentication.limited = !authenticated
    }

    func channelActive(context: ChannelHandlerContext) {
        self.context = context
        address = context.remoteAddress.map { "\($0.ipAddress ?? "?"):\($0.port ?? 0)" } ?? "?"
        writeBatch = server.writeBatches[ObjectIdentifier(context.eventLoop)]
        let admitted = server.clients.withLockedValue { clients -> Bool in
            guard clients.count < server.configuration.maxClients else { return false }
            clients[id] = ClientInfo(id: id, address: address, name: "", database: 0, connectedAt: Date(), lastCommand: "NULL", protocolVersion: 2)
            return true
        }
        server.stats.withLockedValue {
            $0.connectionsReceived += 1
            if !admitted { $0.connectionsRejected += 1 }
        }
        if !admitted {
            var buffer = context.channel.allocator.buffer(capacity: 64)
            buffer.writeReply(.error("ERR max number of clients reached"), protocol: 2)
            let channel = context.channel
            channel.writeAndFlush(buffer).whenComplete { _ in channel.close(promise: nil) }
            closing = true
        } else if (try? context.pipeline.syncOperations.handler(type: IdleStateHandler.self)) == nil {
            // (With --timeout, replies must pass the idle handler, which counts them as activity.)
            descriptor = Self.socketDescriptor(of: context.channel)
        }
        context.fireChannelActive()
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelInactive(context: ChannelHandlerContext) {
        server.clients.withLockedValue { $0[id] = nil }
        publishCounters()
        closing = true
        pending.removeAll()
        unsent.removeAll()
        unread = nil
        context.fireChannelInactive()
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !closing else { return }
        var incoming = unwrapInboundIn(data)
        if unread == nil {
            unread = incoming
        } else {
            unread!.writeBuffer(&incoming)
        }
        while let request = decoder.next(&unread!) { pending.append(request) }
        if unread!.readableBytes == 0 {
            unread = nil
        } else if unread!.readerIndex >= 1 << 20 {
            // Elements of a large request already taken: give their bytes back.
            unread!.discardReadBytes()
        }
        updateReading()
        // Handled when the read is complete: everything one read brought is grouped (and
        // answered with one write).
    }

    func channelReadComplete(context: ChannelHandlerContext) {
        if !busy { pump() }
        context.fireChannelReadComplete()
    }

    func channelWritabilityChanged(context: ChannelHandlerContext) {
        if context.channel.isWritable, awaitingWritable {
            awaitingWritable = false
            drainUnsent()
            flush()
            if !busy { pump() }
            updateReading()
        }
        context.fireChannelWritabilityChanged()
    }

    /// Backpressure on both sides, so that a client costs bounded memory however it behaves: the
    /// socket is not read while `pendingMax` parsed requests wait (behind a slow one), nor while
    /// replies the client has not taken fill the channel's buffer past its high watermark; the
    /// kernel's buffers then push back on the client. Reading resumes once the requests are down
    /// to a quarter and the replies have drained.
    private func updateReading() {
        let read = !awaitingWritable && pending.count < (paused ? Self.pendingMax / 4 : Self.pendingMax)
        guard read == paused, let context else { return }
        paused = !read
        context.channel.setOption(ChannelOptions.autoRead, value: read).whenFailure { _ in }
    }

    /// The most reads of one group served on the connection's own loop (see `runKeyValue`).
    static let directReadsMax = 4
    /// Parsed requests kept waiting before the socket stops being read.
    static let pendingMax = 4096
    /// Replies are handed to the channel once this many bytes wait in `output` (besides at the
    /// end of every burst): requests stop being handled while the client does not take them, and
    /// no buffer nears ByteBuffer's 4 GiB limit (a long MGET of large values included).
    static let outputChunkBytes = 1 << 20
    @exclusivity(unchecked) private var paused = false
    /// Replies filled the channel past its high watermark: requests wait until it drains.
    @exclusivity(unchecked) private var awaitingWritable = false
    /// Replies of requests already handled (a group of reads) held back meanwhile, as values: the
    /// bytes they show are shared with the store, not copied into buffers. An aggregate is held
    /// as its elements still to write (its header is out), so a long MGET stops where the channel
    /// filled up too.
    @exclusivity(unchecked) private var unsent = Deque<Held>()
    /// QUIT or a protocol error: the connection closes once everything before it has been written.
    @exclusivity(unchecked) private var closeWhenWritten = false

    private enum Held {
        case reply(Reply)
        /// Elements of an array whose header is written.
        case elements(ArraySlice<Reply>)
        /// Pairs of a map whose header is written.
        case pairs(ArraySlice<(Reply, Reply)>)
    }
    @exclusivity(unchecked) private var pumping = false
    /// Counted here and added to the server's counters once per burst.
    @exclusivity(unchecked) private var processed = 0
    @exclusivity(unchecked) private var errors = 0
    @exclusivity(unchecked) private var lastCommand = ""
    @exclusivity(unchecked) private var lastCommandChanged = false

    /// `--timeout`: nothing read or written for that long closes the connection, unless a
    /// request is still being answered (a long WAIT) or waits its turn.
    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let idle = event as? IdleStateHandler.IdleStateEvent, idle == .all {
            if !busy, pending.isEmpty, unsent.isEmpty { context.close(promise: nil) }
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        context.close(promise: nil)
    }

    // MARK: - Order

    /// Handles requests in order until one must wait, then flushes. Never nested: an answer that
    /// arrives while the loop below runs (a read served at once) only clears `busy`, and the loop
    /// goes on.
    private func pump() {
        guard !pumping else { return }
        pumping = true
        defer {
            pumping = false
            updateReading()
        }
        while !busy, !closing, !awaitingWritable, let request = pending.popFirst() {
            switch request {
            case .protocolError(let message):
                write(.error(message))
                closeAfterFlush()
            case .command(let name, let arguments):
                processed += 1
                handle(name, arguments)
            }
        }
        // The shared counters and CLIENT LIST's last command: once per burst, not per request.
        publishCounters()
        publishLastCommand()
        flush()
    }

    /// Adds this connection's counts to the server's (INFO, /metrics).
    func publishCounters() {
        guard processed > 0 || errors > 0 || sentDirectly > 0 || sentThroughChannel > 0 else { return }
        let (count, failed, direct, through) = (processed, errors, sentDirectly, sentThroughChannel)
        server.stats.withLockedValue {
            $0.commandsProcessed += count
            $0.errorReplies += failed
            $0.directWrites += direct
            $0.channelWrites += through
        }
        processed = 0
        errors = 0
        sentDirectly = 0
        sentThroughChannel = 0
    }

    /// Puts this connection's last command where CLIENT LIST and INFO read it.
    func publishLastCommand() {
        guard lastCommandChanged else { return }
        lastCommandChanged = false
        let name = lastCommand
        server.clients.withLockedValue { $0[id]?.lastCommand = name }
    }

    func write(_ reply: Reply) {
        if reply.isError { errors += 1 }
        if awaitingWritable || !unsent.isEmpty { return unsent.append(.reply(reply)) }
        append(reply)
        if !unsent.isEmpty { drainUnsent() }
    }

    /// Writes held-back replies (and the rest of aggregates) until the channel fills up again.
    private func drainUnsent() {
        while !awaitingWritable, let held = unsent.popFirst() {
            switch held {
            case .reply(let reply):
                append(reply)
            case .elements(var rest):
                guard let next = rest.popFirst() else { continue }
                if !rest.isEmpty { unsent.prepend(.elements(rest)) }
                append(next)
            case .pairs(var rest):
                guard let (key, value) = rest.popFirst() else { continue }
                if !rest.isEmpty { unsent.prepend(.pairs(rest)) }
                unsent.prepend(.reply(value))
                append(key)
            }
        }
        if unsent.isEmpty, closeWhenWritten { close() }
    }

    /// Writes one reply into `output`; an aggregate's header only, its elements go to the front
    /// of `unsent` (written by `drainUnsent`, element by element, so that a large aggregate is
    /// handed over in pieces and held back when the client does not take it).
    private func append(_ reply: Reply) {
        if output == nil {
            // (A flush may have closed the channel: a failed write closes it at once.)
            guard let context else { return }
            if var reused = spare {
                spare = nil
                reused.clear()
                output = reused
            } else {
                output = context.channel.allocator.buffer(capacity: 256)
            }
        }
        switch reply {
        case .array(let items?) where !items.isEmpty:
            output!.writeAggregateHeader(items.count, map: false, protocol: protocolVersion)
            unsent.prepend(.elements(items[...]))
        case .map(let pairs) where !pairs.isEmpty:
            output!.writeAggregateHeader(pairs.count, map: true, protocol: protocolVersion)
            unsent.prepend(.pairs(pairs[...]))
        default:
            output!.writeReply(reply, protocol: protocolVersion)
            if output!.readableBytes >= Self.outputChunkBytes { flush() }
        }
    }

    /// Hands the replies written so far to the socket: straight to it when the channel holds
    /// nothing unwritten (see "Direct writes" below), else, and for whatever the socket does not
    /// take at once, to the channel.
    private func flush() {
        guard let context, var buffer = output else { return }
        output = nil
        if buffer.capacity <= Self.spareCapacityMax { spare = buffer }
        if descriptor >= 0, channelWrites == 0, context.channel.isActive {
            let written = buffer.withUnsafeReadableBytes { bytes in
                send(descriptor, bytes.baseAddress, bytes.count, Self.sendFlags)
            }
            if written == buffer.readableBytes {
                sentDirectly += 1
                return
            }
            // The rest (all of it after EAGAIN or an error, which the channel then meets and
            // handles as its own) goes through the channel, and so does everything after it
            // until the channel has written it.
            if written > 0 { buffer.moveReaderIndex(forwardBy: written) }
            channelWrites += 1
            context.writeAndFlush(wrapOutboundOut(buffer)).whenComplete { _ in self.channelWrites -= 1 }
        } else if descriptor >= 0 {
            channelWrites += 1
            context.writeAndFlush(wrapOutboundOut(buffer)).whenComplete { _ in self.channelWrites -= 1 }
        } else {
            context.writeAndFlush(wrapOutboundOut(buffer), promise: nil)
        }
        sentThroughChannel += 1
        if !context.channel.isWritable { awaitingWritable = true }
    }

    // MARK: - Direct writes

    // A reply written through the channel costs about 1.5 µs of the loop's CPU in NIO (the
    // pipeline, the pending-writes queue and its bookkeeping), the largest single cost of a SET
    // sent one at a time. When the channel holds nothing of ours unwritten, the reply goes to the
    // socket with one send(2) instead; whatever the socket does not take goes to the channel, and
    // replies after it follow it there until the channel has written all it was given (each
    // write's promise completes once its bytes are out), so the bytes keep their order. The
    // writes that close the connection go through the channel too. `isActive` turns false before
    // any code of ours runs after NIO closes the descriptor, so a descriptor number reused by a
    // later connection is never written. NIO has no public way to name an accepted socket's
    // descriptor: it is read once per connection by reflection and checked against the
    // channel's addresses; if NIO's layout changes, nothing is found and every write goes
    // through the channel (DirectWriteTests notices).

    /// The socket's descriptor, or -1: replies go through the channel only.
    @exclusivity(unchecked) private var descriptor: CInt = -1
    /// Writes handed to the channel and not yet complete.
    @exclusivity(unchecked) private var channelWrites = 0
    /// Flushes sent straight to the socket, and handed to the channel (part or all), since the
    /// counters were last published (INFO keel, /metrics).
    @exclusivity(unchecked) private var sentDirectly = 0
    @exclusivity(unchecked) private var sentThroughChannel = 0
    #if canImport(Glibc)
    /// A peer gone: EPIPE, not SIGPIPE.
    static let sendFlags = Int32(MSG_NOSIGNAL)
    #else
    /// (NIO turns SIGPIPE off on Darwin's sockets: F_SETNOSIGPIPE.)
    static let sendFlags: Int32 = 0
    #endif

    /// The descriptor of a connected TCP channel's socket, if found and its local and remote
    /// ports are the channel's; else -1.
    static func socketDescriptor(of channel: any Channel) -> CInt {
        guard let local = channel.localAddress?.port, let remote = channel.remoteAddress?.port else { return -1 }
        var mirror: Mirror? = Mirror(reflecting: channel)
        while let level = mirror {
            if let socket = level.children.first(where: { $0.label == "socket" })?.value {
                var inner: Mirror? = Mirror(reflecting: socket)
                while let socketLevel = inner {
                    if let fd = socketLevel.children.first(where: { $0.label == "descriptor" })?.value as? CInt {
                        return port(of: fd, peer: false) == local && port(of: fd, peer: true) == remote ? fd : -1
                    }
                    inner = socketLevel.superclassMirror
                }
                return -1
            }
            mirror = level.superclassMirror
        }
        return -1
    }

    /// The port of a TCP socket's own address or its peer's.
    private static func port(of descriptor: CInt, peer: Bool) -> Int? {
        var storage = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let result = withUnsafeMutablePointer(to: &storage) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                peer ? getpeername(descriptor, $0, &length) : getsockname(descriptor, $0, &length)
            }
        }
        guard result == 0 else { return nil }
        switch Int32(storage.ss_family) {
        case AF_INET:
            return withUnsafeBytes(of: &storage) { Int(UInt16(bigEndian: $0.load(as: sockaddr_in.self).sin_port)) }
        case AF_INET6:
            return withUnsafeBytes(of: &storage) { Int(UInt16(bigEndian: $0.load(as: sockaddr_in6.self).sin6_port)) }
        default:
            return nil
        }
    }

    /// Stops handling requests and closes the connection once the replies written so far (the
    /// last being QUIT's OK or a protocol error) have reached the socket, as Redis does: a client
    /// slow to read still gets them.
    func closeAfterFlush() {
        closing = true
        pending.removeAll()
        closeWhenWritten = true
        if unsent.isEmpty { close() }
    }

    private func close() {
        guard let context else { return }
        closeWhenWritten = false
        // The last bytes go through the channel, and nothing may overtake them.
        descriptor = -1
        let channel = context.channel
        if let buffer = output {
            output = nil
            context.writeAndFlush(wrapOutboundOut(buffer)).whenComplete { _ in channel.close(promise: nil) }
        } else {
            // Written earlier: a flush of nothing completes once they have.
            context.writeAndFlush(wrapOutboundOut(channel.allocator.buffer(capacity: 0))).whenComplete { _ in
                channel.close(promise: nil)
            }
        }
    }

    /// Runs work that answers later; requests behind it wait. Key-value commands record their
    /// latency (`kind`) for /metrics.
    func answerLater(_ future: EventLoopFuture<[Reply]>, kind: CommandKind? = nil) {
        answerLater(kind: kind) { done in
            future.whenComplete { result in
                switch result {
                case .success(let replies): done(replies)
                case .failure(let error): done([.error(RESPConnection.describe(error))])
                }
            }
        }
    }

    /// Runs `start`, which calls its argument once with the replies (on any thread); requests
    /// behind it wait. The hot path: no futures, and no hop when the node shares this loop.
    /// `then` runs on this connection's loop with the replies, before they are written.
    func answerLater(kind: CommandKind? = nil, then: (@Sendable ([Reply]) -> Void)? = nil,
                     _ start: (@escaping @Sendable ([Reply]) -> Void) -> Void) {
        guard let loop = context?.eventLoop else { return }
        busy = true
        let started = kind == nil ? 0 : DispatchTime.now().uptimeNanoseconds
        start { replies in
            if loop.inEventLoop {
                then?(replies)
                self.answered(replies, kind: kind, started: started)
            } else {
                loop.execute {
                    then?(replies)
                    self.answered(replies, kind: kind, started: started)
                }
            }
        }
    }

    /// `answerLater` for one write, the commonest request: no array of replies, and one closure
    /// (the callback's context) instead of three allocations.
    func proposeOne(_ entry: [UInt8], started: UInt64 = DispatchTime.now().uptimeNanoseconds) {
        guard let loop = context?.eventLoop else { return }
        busy = true
        server.node.propose(entry) { result in
            let reply: Reply
            switch result {
            case .success(let bytes): reply = Reply(decoding: bytes)
            case .failure(let error): reply = .error(RESPConnection.describe(error))
            }
            if loop.inEventLoop {
                self.answeredOne(reply, started: started)
            } else {
                loop.execute { self.answeredOne(reply, started: started) }
            }
        }
    }

    /// `started`: nil when the caller recorded the latency.
    func answeredOne(_ reply: Reply, started: UInt64?) {
        if let started { recordLatency(.write, count: 1, started: started) }
        busy = false
        write(reply)
        pump()
    }

    private func answered(_ replies: [Reply], kind: CommandKind?, started: UInt64) {
        if let kind { recordLatency(kind, count: replies.count, started: started) }
        busy = false
        replies.forEach(write)
        pump()
    }

    /// Adds `count` requests answered since `started` to /metrics' latency histograms.
    private func recordLatency(_ kind: CommandKind, count: Int, started: UInt64) {
        let seconds = Double(DispatchTime.now().uptimeNanoseconds - started) / 1e9
        server.stats.withLockedValue {
            if kind == .write { $0.writeLatency.record(seconds, times: count) } else { $0.readLatency.record(seconds, times: count) }
        }
    }

    /// A node error as a Redis error reply.
    static func describe(_ error: any Error) -> String {
        guard let error = error as? NodeError else { return "ERR \(error)" }
        switch error {
        case .noLeader: return "CLUSTERDOWN keel: no leader is known (an election is under way); try again"
        case .notLeader(let leader): return "ERR keel: this node is not the leader" + (leader.map { " (node \($0.rawValue) is)" } ?? "")
        case .notMember: return "ERR keel: this node is not a member of the cluster"
        case .shuttingDown: return "ERR keel: the server is shutting down"
        case .storageFailed(let reason): return "MISCONF keel: the log failed and this node has stopped accepting writes: \(reason)"
        case .timedOut: return "ERR keel: timed out; the write may or may not have been applied"
        case .leaderChanged: return "ERR keel: the leader changed; the write may or may not have been applied"
        case .noSpace(let reason): return "ERR keel: no space left on the disk; the write was refused (\(reason))"
        case .invalidArgument(let reason): return "ERR \(reason)"
        case .refused(let reason): return "ERR keel: \(reason)"
        case .interrupted(let reason): return "ERR keel: interrupted (\(reason)); the write may or may not have been applied"
        }
    }

    // MARK: - Commands

    private func handle(_ original: String, _ rest: [[UInt8]]) {
        let name = Self.commandName(original)
        if name != lastCommand {
            lastCommand = name
            lastCommandChanged = true
        }
        if !authenticated, !["auth", "hello", "quit"].contains(name) {
            return write(.error("NOAUTH Authentication required."))
        }
        if transaction != nil, !["exec", "discard", "multi", "watch", "quit", "reset"].contains(name) {
            return queue(name, rest, originalName: original)
        }
        if kvArity(name) != nil {
            return runKeyValue(name, rest)
        }
        runServerCommand(name, rest, original: original)
    }

    private func queue(_ name: String, _ arguments: [[UInt8]], originalName: String) {
        if ["ping", "echo", "select"].contains(name) { return queueLocal(name, arguments) }
        guard let arity = kvCommandArity[name] else {
            transactionFailed = true
            if serverCommandNames.contains(name) {
                return write(.error("ERR keel: only key-value commands can be queued in a transaction ('\(name)' cannot)"))
            }
            return write(.error(unknownCommand(originalName, arguments)))
        }
        let count = arguments.count + 1
        guard arity >= 0 ? count == arity : count >= -arity else {
            transactionFailed = true
            return write(.error("ERR wrong number of arguments for '\(name)' command"))
        }
        if ["randomkey", "keys", "scan"].contains(name) {
            // Inside a transaction they would run in apply on every replica, whose key orders differ.
            transactionFailed = true
            return write(.error("ERR keel: '\(name)' cannot be queued in a transaction (its reply would differ between replicas)"))
        }
        guard admitToTransaction(name, arguments) else { return }
        transaction?.append(KVEntry.QueuedCommand(database: transactionDatabase ?? database, name: name, arguments: arguments))
        write(.simple("QUEUED"))
    }

    /// The most bytes a transaction's entry may take (watched keys and queued commands).
    var transactionBytesMax: Int { server.node.configuration.commandSizeMax }

    /// Counts a command into the transaction's size; past the limit, answers the error that will
    /// abort it (EXECABORT) and keeps nothing more of it. A command after an earlier error is
    /// answered QUEUED, as Redis does, but not kept either: EXEC aborts anyway.
    private func admitToTransaction(_ name: String, _ arguments: [[UInt8]]) -> Bool {
        let size = KVEntry.queuedCommandSize(name, arguments)
        if !transactionFailed, KVEntry.transactionHeaderSize + queuedBytes + watchedBytes + size > transactionBytesMax {
            transactionFailed = true
            transaction = []
            transactionLocal = []
            write(.error("ERR keel: the transaction is over the limit of \(transactionBytesMax) bytes (its commands and watched keys must fit in one log entry)"))
            return false
        }
        guard !transactionFailed else {
            write(.simple("QUEUED"))
            return false
        }
        queuedBytes += size
        return true
    }

    /// PING, ECHO and SELECT inside MULTI: answered by the connection at EXEC, in their place.
    private func queueLocal(_ name: String, _ arguments: [[UInt8]]) {
        let arityOK = switch name {
        case "ping": arguments.count <= 1
        default: arguments.count == 1
        }
        guard arityOK else {
            transactionFailed = true
            return write(.error("ERR wrong number of arguments for '\(name)' command"))
        }
        guard admitToTransaction(name, arguments) else { return }
        let reply: Reply
        switch name {
        case "ping": reply = arguments.isEmpty ? .simple("PONG") : .bulk(arguments[0])
        case "echo": reply = .bulk(arguments[0])
        default:
            // As Redis: a bad index is an error in EXEC's replies; the other commands still run.
            if let number = parseInteger(arguments[0]), (0..<Int64(KVStore.databaseCount)).contains(number) {
                transactionDatabase = Int(number)
                reply = .ok
            } else {
                reply = .error(parseInteger(arguments[0]) == nil ? "ERR value is not an integer or out of range" : "ERR DB index is out of range")
            }
        }
        transactionLocal.append(((transaction?.count ?? 0) + transactionLocal.count, reply))
        write(.simple("QUEUED"))
    }

    /// A key-value command, with the ones right behind it of the same kind.
    private func runKeyValue(_ name: String, _ arguments: [[UInt8]]) {
        let now = KeelServer.nowMilliseconds()
        let command: KVCommand
        do { command = try KVCommand.parse(name, arguments, now: now) } catch {
            return write(.error(error.message))
        }
        if command.isWrite {
            let node = server.node
            // A command joins the batch only if the batch's encoded commands stay within the
            // bound (counted as the entry encodes them, 4 bytes more for every argument, so that a
            // command of a million empty arguments counts its 4 MB), so a batch is never refused
            // for its size: a command over the entry's limit goes alone and is refused alone (it
            // used to take the writes batched with it down too).
            var bytes = KVEntry.queuedCommandSize(name, arguments)
            guard let second = nextKeyValue(now: now), second.command.isWrite,
                  case let secondBytes = KVEntry.queuedCommandSize(second.name, second.arguments),
                  bytes + secondBytes <= Self.batchBytesMax else {
                // A single write: with the other connections' of this turn (`WriteBatch`).
                if bytes <= WriteBatch.commandBytesMax, context != nil, let batch = writeBatch {
                    busy = true
                    return batch.add(WriteBatch.Item(connection: self, database: database, name: name, arguments: arguments,
                                                     started: DispatchTime.now().uptimeNanoseconds), bytes: bytes)
                }
                return proposeOne(KVEntry.command(database: database, name: name, arguments: arguments).encoded(now: now))
            }
            // Pipelined writes travel as one log entry (applied together, in order: a stronger
            // guarantee than Redis gives them, at a fraction of the cost per command), written as
            // they are taken: up to 1,024 commands, and 1 MiB of encoded commands.
            var writer = KVEntry.BatchWriter(now: now, capacity: min(bytes * min(pending.count + 1, Self.batchCommandsMax),
                                                                     Self.batchBytesMax))
            writer.append(database: database, name: name, arguments: arguments)
            var next: (name: String, arguments: [[UInt8]], command: KVCommand)? = second
            var nextBytes = secondBytes
            while let taken = next {
                bytes += nextBytes
                pending.removeFirst()
                processed += 1
                writer.append(database: database, name: taken.name, arguments: taken.arguments)
                guard writer.count < Self.batchCommandsMax, let following = nextKeyValue(now: now), following.command.isWrite,
                      case let followingBytes = KVEntry.queuedCommandSize(following.name, following.arguments),
                      bytes + followingBytes <= Self.batchBytesMax else { break }
                next = following
                nextBytes = followingBytes
            }
            let count = writer.count
            let batch = writer.finish()
            answerLater(kind: .write) { done in
                node.propose(batch) { result in
                    switch result {
                    case .success(let bytes):
                        guard case .array(let replies?) = Reply(decoding: bytes), replies.count == count else {
                            return done(Array(repeating: .error("ERR keel: internal: a batch's reply did not match it"), count: count))
                        }
                        done(replies)
                    case .failure(let error):
                        done(Array(repeating: .error(RESPConnection.describe(error)), count: count))
                    }
                }
            }
        } else {
            var group = [command]
            while group.count < Self.batchCommandsMax, let next = nextKeyValue(now: now), !next.command.isWrite {
                pending.removeFirst()
                processed += 1
                group.append(next.command)
            }
            let database = self.database
            let server = self.server
            let reads = group
            // A sole voter that has applied all it committed answers on this thread: a few reads
            // at the end of this turn of the loop, with the other connections' (`ReadBatch`); a
            // burst of pipelined reads at once if the node shares this loop, else on the node's
            // loop, which then serves it while this loop parses what follows.
            let started = DispatchTime.now().uptimeNanoseconds
            if reads.count <= Self.directReadsMax, let loop = context?.eventLoop, let batch = server.readBatches[ObjectIdentifier(loop)] {
                busy = true
                return batch.add(ReadBatch.Item(connection: self, reads: reads, database: database, now: now, started: started))
            }
            if server.node.eventLoop.inEventLoop, let results = server.node.readDirectly({ store in
                store.willRead(reads, database: database)
                return reads.map { store.read($0, database: database, now: now) }
            }) {
                let expired = results.flatMap(\.1)
                if !expired.isEmpty { Task { await server.deleteExpired(expired) } }
                recordLatency(.read, count: reads.count, started: started)
                return results.forEach { write($0.0) }
            }
            readThroughNode(reads, database: database)
        }
    }

    /// The end of a read `ReadBatch` ran directly: its replies, then the requests behind it.
    func answeredDirectly(_ results: [(Reply, [ExpiredKey])], started: UInt64) {
        let expired = results.flatMap(\.1)
        if !expired.isEmpty {
            let server = self.server
            Task { await server.deleteExpired(expired) }
        }
        answered(results.map(\.0), kind: .read, started: started)
    }

    /// Reads answered through the node (which hops to its loop, and, but for a sole voter that
    /// has applied everything it committed, confirms its leadership first).
    func readThroughNode(_ reads: [KVCommand], database: Int) {
        let consistency: Consistency = readonly ? .local : .linearizable
        let server = self.server
        answerLater(kind: .read) { done in
            server.node.read(consistency: consistency, { store in
                store.willRead(reads, database: database)
                return reads.map { store.read($0, database: database, now: KeelServer.nowMilliseconds()) }
            }, completion: { result in
                switch result {
                case .success(let results):
                    let expired = results.flatMap(\.1)
                    if !expired.isEmpty { Task { await server.deleteExpired(expired) } }
                    done(results.map(\.0))
                case .failure(let error):
                    // One reply per request of the group.
                    done(Array(repeating: .error(RESPConnection.describe(error)), count: reads.count))
                }
            })
        }
    }

    /// A batch of writes (one log entry: a connection's pipelined writes, or one turn's single
    /// writes, `WriteBatch`) takes at most this many commands, and at most the second's bytes of
    /// encoded commands (`KVEntry.queuedCommandSize`; well under the entry's limit, `commandSizeMax`).
    static let batchCommandsMax = 1024
    static let batchBytesMax = 1 << 20

    /// The next pending request if it is a key-value command that parses (for grouping).
    private func nextKeyValue(now: Int64) -> (name: String, arguments: [[UInt8]], command: KVCommand)? {
        guard let next = pending.first, case .command(let original, let rest) = next, transaction == nil else { return nil }
        let name = Self.commandName(original)
        guard authenticated, kvArity(name) != nil else { return nil }
        guard let command = try? KVCommand.parse(name, rest, now: now) else { return nil }
        return (name, rest, command)
    }

    /// A command's name in lower case. ASCII (every command's) is lowered byte by byte into the
    /// string's own storage (`lowercased()` takes the Unicode path, for every request); a name
    /// already in lower case is returned as it is.
    static func commandName(_ name: String) -> String {
        // The two names of nearly every request, as clients send them.
        if name == "SET" { return "set" }
        if name == "GET" { return "get" }
        let bytes = name.utf8
        guard bytes.allSatisfy({ $0 < 0x80 }) else { return name.lowercased() }
        guard bytes.contains(where: { $0 >= UInt8(ascii: "A") && $0 <= UInt8(ascii: "Z") }) else { return name }
        return String(unsafeUninitializedCapacity: bytes.count) { buffer in
            for (offset, byte) in bytes.enumerated() {
                buffer[offset] = byte >= UInt8(ascii: "A") && byte <= UInt8(ascii: "Z") ? byte | 0x20 : byte
            }
            return bytes.count
        }
    }

    func unknownCommand(_ name: String, _ arguments: [[UInt8]]) -> String {
        let shown = arguments.prefix(16).map { "'\(String(decoding: $0.prefix(128), as: UTF8.self))' " }.joined()
        return "ERR unknown command '\(String(name.prefix(128)))', with args beginning with: \(shown)"
    }
}

/// The few direct reads (`RESPConnection.directReadsMax` or fewer each) that one event loop's
/// connections parsed in one turn of the loop, run together once the turn has read every
/// connection (a task runs after the turn's reads): one hold of the machine's lock for all of
/// them, and their keys prefetched together (`KVStore.willRead`), so that their cache misses
/// overlap instead of coming one request at a time. Each connection waits (`busy`) until its
/// reads are answered, so its replies keep their order. Touched on its loop only.
final class ReadBatch: @unchecked Sendable {
    // @unchecked Sendable: used on `loop` only.
    struct Item {
        let connection: RESPConnection
        let reads: [KVCommand]
        let database: Int
        let now: Int64
        let started: UInt64
    }

    let loop: any EventLoop
    private var items: [Item] = []
    private var scheduled = false

    init(loop: any EventLoop) { self.loop = loop }

    func add(_ item: Item) {
        items.append(item)
        guard !scheduled else { return }
        scheduled = true
        loop.execute { self.run() }
    }

    private func run() {
        scheduled = false
        let batch = items
        items.removeAll(keepingCapacity: true)
        guard let node = batch.first?.connection.server.node else { return }
        let results = node.readDirectly { store -> [[(Reply, [ExpiredKey])]] in
            let database = batch[0].database
            if batch.allSatisfy({ $0.database == database }) {
                store.willRead(batch.flatMap(\.reads), database: database)
            } else {
                for database in Set(batch.map(\.database)) {
                    store.willRead(batch.filter { $0.database == database }.flatMap(\.reads), database: database)
                }
            }
            return batch.map { item in item.reads.map { store.read($0, database: item.database, now: item.now) } }
        }
        for (index, item) in batch.enumerated() {
            // Not a sole voter that has applied all it committed: through the node.
            if let results { item.connection.answeredDirectly(results[index], started: item.started) } else {
                item.connection.readThroughNode(item.reads, database: item.database)
            }
        }
    }
}

/// The single writes (one command, not pipelined) that one event loop's connections parsed in one
/// turn of the loop, proposed together once the turn has read every connection: one log entry (a
/// transaction without watched keys, whose commands are applied in order, each with its own
/// reply) instead of one per client, so that Raft, the log and the apply pay their per-entry
/// costs once per turn. The writes of different clients that one turn reads are concurrent, so
/// any order between them is linearizable; each client's own requests keep their order, as its
/// connection waits (`busy`) until its write is answered. Touched on its loop only.
final class WriteBatch: @unchecked Sendable {
    // @unchecked Sendable: used on `loop` only.
    struct Item {
        let connection: RESPConnection
        let database: Int
        let name: String
        let arguments: [[UInt8]]
        let started: UInt64
    }

    /// A write whose encoded command (`KVEntry.queuedCommandSize`) is larger than this is
    /// proposed alone. A batch holds at most `RESPConnection.batchCommandsMax` writes and
    /// `RESPConnection.batchBytesMax` bytes of them.
    static let commandBytesMax = 64 << 10

    let loop: any EventLoop
    let node: KeelNode<KVStore>
    private var items: [Item] = []
    private var bytes = 0
    private var scheduled = false

    init(loop: any EventLoop, node: KeelNode<KVStore>) {
        self.loop = loop
        self.node = node
    }

    /// `bytes`: the write's encoded command (`KVEntry.queuedCommandSize`).
    func add(_ item: Item, bytes: Int) {
        // (A proposal refused at once answers inside `run`, and the connections it answers may
        // add again meanwhile: hence a loop.)
        while !items.isEmpty, items.count >= RESPConnection.batchCommandsMax || self.bytes + bytes > RESPConnection.batchBytesMax { run() }
        items.append(item)
        self.bytes += bytes
        guard !scheduled else { return }
        scheduled = true
        loop.execute {
            self.scheduled = false
            self.run()
        }
    }

    private func run() {
        guard !items.isEmpty else { return }
        let batch = items
        items.removeAll(keepingCapacity: true)
        let size = bytes
        bytes = 0
        let now = KeelServer.nowMilliseconds()
        if batch.count == 1 {
            let item = batch[0]
            let entry = KVEntry.command(database: item.database, name: item.name, arguments: item.arguments).encoded(now: now)
            return item.connection.proposeOne(entry, started: item.started)
        }
        var writer = KVEntry.BatchWriter(now: now, capacity: size)
        for item in batch { writer.append(database: item.database, name: item.name, arguments: item.arguments) }
        let loop = self.loop
        let server = batch[0].connection.server
        node.propose(writer.finish()) { result in
            let replies: [Reply]
            switch result {
            case .success(let bytes):
                server.stats.withLockedValue {
                    $0.sharedWriteEntries += 1
                    $0.sharedWrites += batch.count
                }
                if case .array(let decoded?) = Reply(decoding: bytes), decoded.count == batch.count {
                    replies = decoded
                } else {
                    replies = Array(repeating: .error("ERR keel: internal: a batch's reply did not match it"), count: batch.count)
                }
            case .failure(let error):
                replies = Array(repeating: .error(RESPConnection.describe(error)), count: batch.count)
            }
            if loop.inEventLoop {
                Self.answer(batch, replies, server: server)
            } else {
                loop.execute { Self.answer(batch, replies, server: server) }
            }
        }
    }

    /// Answers each write of a batch, their latencies recorded under one lock.
    private static func answer(_ batch: [Item], _ replies: [Reply], server: KeelServer) {
        let now = DispatchTime.now().uptimeNanoseconds
        server.stats.withLockedValue { stats in
            for item in batch { stats.writeLatency.record(Double(now &- item.started) / 1e9) }
        }
        for (item, reply) in zip(batch, replies) { item.connection.answeredOne(reply, started: nil) }
    }
}
