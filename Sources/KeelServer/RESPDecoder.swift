// The Redis protocol's requests: multibulk arrays of bulk strings (what clients send) and inline
// commands (what a person types into telnet), with Redis's limits and error texts. A protocol
// error is reported once and the connection is closed after the reply, as Redis does.

import KeelCore
import NIOCore

/// Limits on what a client may send.
public struct RESPLimits: Sendable, Equatable {
    /// The longest bulk string (Redis's proto-max-bulk-len).
    public var bulkLengthMax = 512 << 20
    /// The most elements in one request.
    public var multibulkLengthMax = 1024 * 1024
    /// The longest inline request (Redis's PROTO_INLINE_MAX_SIZE).
    public var inlineLengthMax = 64 << 10
    /// The most bytes buffered for one connection's unparsed requests (client-query-buffer-limit).
    public var queryBufferMax = 1 << 30
    public init() {}
}

/// What the decoder produces.
public enum RESPRequest: Equatable, Sendable {
    /// A command: its name as sent (a short name is a string with no allocation of its own) and
    /// the arguments after it.
    case command(name: String, arguments: [[UInt8]])
    /// A protocol error: reply with it, then close the connection.
    case protocolError(String)
}

/// Whether a connection's requests are held to the smaller limits of a client that has not
/// authenticated (Redis 7: at most 10 elements, bulk strings of at most 16 KiB), shared by the
/// decoder and the connection on the connection's event loop.
public final class AuthenticationLimits: @unchecked Sendable {
    // @unchecked Sendable: used only on one channel's event loop. @exclusivity(unchecked): for
    // the same reason no two accesses overlap, and it is read for every request.
    @exclusivity(unchecked) public var limited: Bool
    public init(limited: Bool) { self.limited = limited }
}

/// Decodes requests; stateless between requests except for the partial one it waits on.
public struct RESPRequestDecoder: ByteToMessageDecoder {
    public typealias InboundOut = RESPRequest
    let limits: RESPLimits
    /// With a password required: the decoder lifts the smaller limits itself as soon as it decodes
    /// an AUTH (or HELLO … AUTH) with the right password, so what follows it in the same packet is
    /// judged as Redis judges it (Redis handles AUTH before it parses the next request).
    let authentication: AuthenticationLimits?
    let password: [UInt8]?
    static let unauthenticatedMultibulkMax: Int64 = 10
    static let unauthenticatedBulkMax: Int64 = 16384
    private var failed = false
    /// A multibulk request being received: its elements so far are consumed from the buffer as
    /// they complete, so a request arriving in many packets is never parsed again from its start.
    private var inMultibulk = false
    private var remaining: Int64 = 0
    private var partial: [[UInt8]] = []
    private var partialBytes = 0
    /// How many bytes from the reader index are known to hold no line end (a request's first
    /// line still arriving): the next packet is scanned from there, not from the start, so a line
    /// trickled in byte by byte costs linear time, not quadratic.
    private(set) var lineScanned = 0
    /// Bytes compared while looking for line ends (for tests).
    private(set) var bytesScanned = 0

    public init(limits: RESPLimits = RESPLimits(), authentication: AuthenticationLimits? = nil, password: String? = nil) {
        self.limits = limits
        self.authentication = authentication
        self.password = password.map { Array($0.utf8) }
    }

    private var limited: Bool { authentication?.limited ?? false }

    /// AUTH [default] PASSWORD, or a valid HELLO with AUTH default PASSWORD, with the right
    /// password: exactly what the connection accepts (`HelloRequest`, `credentialsMatch`).
    private func authenticates(_ arguments: [[UInt8]]) -> Bool {
        guard let password, let first = arguments.first else { return false }
        switch lowercasedASCII(first) {
        case Array("auth".utf8):
            if arguments.count == 2 { return credentialsMatch(user: Array("default".utf8), password: arguments[1], required: password) }
            return arguments.count == 3 && credentialsMatch(user: arguments[1], password: arguments[2], required: password)
        case Array("hello".utf8):
            guard case .success(let hello) = HelloRequest.parse(Array(arguments.dropFirst())), let credentials = hello.credentials else { return false }
            return credentialsMatch(user: credentials.user, password: credentials.password, required: password)
        default:
            return false
        }
    }

    /// The next request from the front of `buffer` (consumed), or nil when more bytes are
    /// needed. A protocol error is returned once; everything after it is dropped.
    public mutating func next(_ buffer: inout ByteBuffer) -> RESPRequest? {
        while !failed {
            switch parse(&buffer) {
            case .needMoreData:
                guard buffer.readableBytes + partialBytes > limits.queryBufferMax else { return nil }
                return fail("ERR Protocol error: query buffer exceeds the limit", &buffer)
            case .request(let arguments):
                if limited, authenticates(arguments) { authentication?.limited = false }
                if let first = arguments.first {
                    return .command(name: String(decoding: first, as: UTF8.self), arguments: Array(arguments.dropFirst()))
                }
                // An empty multibulk ("*0"), as Redis: nothing to answer.
            case .command(let name, let arguments):
                return .command(name: name, arguments: arguments)
            case .error(let message):
                return fail(message, &buffer)
            }
        }
        buffer.moveReaderIndex(to: buffer.writerIndex)
        return nil
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let request = next(&buffer) else { return .needMoreData }
        context.fireChannelRead(wrapInboundOut(request))
        return .continue
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while try decode(context: context, buffer: &buffer) == .continue, buffer.readableBytes > 0 {}
        return .needMoreData
    }

    private mutating func fail(_ message: String, _ buffer: inout ByteBuffer) -> RESPRequest {
        failed = true
        buffer.moveReaderIndex(to: buffer.writerIndex)
        return .protocolError(message)
    }

    enum Outcome: Equatable {
        case needMoreData
        case request([[UInt8]])
        /// A request whose name is already taken apart (the one-pass path).
        case command(name: String, arguments: [[UInt8]])
        case error(String)
    }

    /// Parses one request from the front of `buffer`: a multibulk request's header and elements
    /// are consumed as each completes; an inline request when its line is complete.
    mutating func parse(_ buffer: inout ByteBuffer) -> Outcome {
        if inMultibulk { return continueMultibulk(&buffer) }
        guard let first = buffer.getInteger(at: buffer.readerIndex, as: UInt8.self) else { return .needMoreData }
        if first == UInt8(ascii: "*") {
            // A fresh request already whole in the buffer (what pipelining clients send): one pass
            // over the bytes. Anything else takes the general path below.
            if lineScanned == 0, !limited, let (name, arguments) = wholeMultibulk(&buffer) { return .command(name: name, arguments: arguments) }
            return parseMultibulk(&buffer)
        }
        return parseInline(&buffer)
    }

    /// The multibulk request at the reader index if all of it has arrived and it is plainly well
    /// formed ("\r\n" line ends, lengths in digits within the limits, at least one element);
    /// nil, having consumed nothing, otherwise (the general path then answers exactly as before).
    /// Reads each byte at most once, so a failed attempt costs no more than the bytes present;
    /// the general path then consumes the header, so the attempt is not repeated for the request.
    private func wholeMultibulk(_ buffer: inout ByteBuffer) -> (name: String, arguments: [[UInt8]])? {
        let bulkMax = limits.bulkLengthMax
        let countMax = limits.multibulkLengthMax
        let result = buffer.withUnsafeReadableBytes { bytes -> (name: String, arguments: [[UInt8]], consumed: Int)? in
            let end = bytes.count
            var at = 1
            /// Digits up to "\r\n" at `at` (at most 18: no overflow), then past the line end.
            func number() -> Int? {
                var value = 0
                let start = at
                while at < end, at - start <= 18 {
                    let byte = bytes[at]
                    if byte == UInt8(ascii: "\r") {
                        guard at > start, at + 1 < end, bytes[at + 1] == UInt8(ascii: "\n") else { return nil }
                        at += 2
                        return value
                    }
                    guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9"), at - start < 18 else { return nil }
                    value = value * 10 + Int(byte - UInt8(ascii: "0"))
                    at += 1
                }
                return nil
            }
            guard let count = number(), count > 0, count <= countMax else { return nil }
            var name = ""
            var arguments: [[UInt8]] = []
            arguments.reserveCapacity(min(count - 1, 1024))
            for element in 0..<count {
                guard at < end, bytes[at] == UInt8(ascii: "$") else { return nil }
                at += 1
                guard let length = number(), length <= bulkMax, end - at >= length + 2,
                      bytes[at + length] == UInt8(ascii: "\r"), bytes[at + length + 1] == UInt8(ascii: "\n") else { return nil }
                let value = UnsafeRawBufferPointer(rebasing: bytes[at..<(at + length)])
                if element == 0 {
                    name = String(decoding: value, as: UTF8.self)
                } else {
                    arguments.append(Array(value))
                }
                at += length + 2
            }
            return (name, arguments, at)
        }
        guard let result else { return nil }
        buffer.moveReaderIndex(forwardBy: result.consumed)
        return (result.name, result.arguments)
    }

    /// The index of the "\r\n" (or "\n") ending the line at `start`, and the line's length.
    private func lineEnd(_ buffer: ByteBuffer, from start: Int, limit: Int) -> (length: Int, next: Int)? {
        let available = buffer.writerIndex - start
        let view = buffer.readableBytesView
        let base = view.startIndex + (start - buffer.readerIndex)
        guard let newline = view[base..<(base + min(available, limit + 2))].firstIndex(of: UInt8(ascii: "\n")) else { return nil }
        var length = newline - base
        if length > 0, view[newline - 1] == UInt8(ascii: "\r") { length -= 1 }
        return (length, start + (newline - base) + 1)
    }

    /// The end of the line at the reader index (an inline request, or a multibulk header), up to
    /// the inline limit, resuming where the last call stopped.
    private mutating func firstLineEnd(_ buffer: ByteBuffer) -> (length: Int, next: Int)? {
        let view = buffer.readableBytesView
        let end = min(buffer.readableBytes, limits.inlineLengthMax + 2)
        let from = min(lineScanned, end)
        bytesScanned += end - from
        guard let newline = view[(view.startIndex + from)..<(view.startIndex + end)].firstIndex(of: UInt8(ascii: "\n")) else {
            lineScanned = end
            return nil
        }
        lineScanned = 0
        var length = newline - view.startIndex
        if length > 0, view[newline - 1] == UInt8(ascii: "\r") { length -= 1 }
        return (length, buffer.readerIndex + (newline - view.startIndex) + 1)
    }

    private func parseNumber(_ buffer: ByteBuffer, at start: Int, length: Int) -> Int64? {
        guard length > 0, length <= 20, start >= buffer.readerIndex, start + length <= buffer.writerIndex else { return nil }
        let view = buffer.readableBytesView
        let base = view.startIndex + (start - buffer.readerIndex)
        var value: Int64 = 0
        var negative = false
        for offset in 0..<length {
            let byte = view[base + offset]
            if offset == 0, byte == UInt8(ascii: "-") {
                negative = true
                continue
            }
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return nil }
            let (times, o1) = value.multipliedReportingOverflow(by: 10)
            let (sum, o2) = times.addingReportingOverflow(Int64(byte - UInt8(ascii: "0")))
            guard !o1, !o2 else { return nil }
            value = sum
        }
        return negative ? -value : value
    }

    private mutating func parseMultibulk(_ buffer: inout ByteBuffer) -> Outcome {
        let position = buffer.readerIndex
        guard let header = firstLineEnd(buffer) else {
            return buffer.readableBytes > limits.inlineLengthMax ? .error("ERR Protocol error: too big mbulk count string") : .needMoreData
        }
        guard let count = parseNumber(buffer, at: position + 1, length: header.length - 1), count <= Int64(limits.multibulkLengthMax) else {
            return .error("ERR Protocol error: invalid multibulk length")
        }
        if limited, count > Self.unauthenticatedMultibulkMax { return .error("ERR Protocol error: unauthenticated multibulk length") }
        buffer.moveReaderIndex(to: header.next)
        if count <= 0 { return .request([]) }
        inMultibulk = true
        remaining = count
        partial = []
        partialBytes = 0
        partial.reserveCapacity(Int(min(count, 1024)))
        return continueMultibulk(&buffer)
    }

    /// Takes the elements that have arrived, one at a time; the request once all have.
    private mutating func continueMultibulk(_ buffer: inout ByteBuffer) -> Outcome {
        while remaining > 0 {
            var position = buffer.readerIndex
            guard let line = lineEnd(buffer, from: position, limit: 64) else {
                return buffer.writerIndex - position > 66 ? .error("ERR Protocol error: too big bulk count string") : .needMoreData
            }
            guard let marker = buffer.getInteger(at: position, as: UInt8.self), marker == UInt8(ascii: "$") else {
                let got = buffer.getInteger(at: position, as: UInt8.self).map { String(UnicodeScalar($0)) } ?? "?"
                return .error("ERR Protocol error: expected '$', got '\(got)'")
            }
            guard let length = parseNumber(buffer, at: position + 1, length: line.length - 1), length >= 0,
                  length <= Int64(limits.bulkLengthMax) else {
                return .error("ERR Protocol error: invalid bulk length")
            }
            if limited, length > Self.unauthenticatedBulkMax { return .error("ERR Protocol error: unauthenticated bulk length") }
            position = line.next
            guard buffer.writerIndex - position >= Int(length) + 2 else { return .needMoreData }
            partial.append(buffer.getBytes(at: position, length: Int(length))!)
            partialBytes += Int(length)
            buffer.moveReaderIndex(to: position + Int(length) + 2)
            remaining -= 1
        }
        inMultibulk = false
        let arguments = partial
        partial = []
        partialBytes = 0
        return .request(arguments)
    }

    private mutating func parseInline(_ buffer: inout ByteBuffer) -> Outcome {
        guard let line = firstLineEnd(buffer) else {
            return buffer.readableBytes > limits.inlineLengthMax ? .error("ERR Protocol error: too big inline request") : .needMoreData
        }
        let bytes = buffer.getBytes(at: buffer.readerIndex, length: line.length) ?? []
        buffer.moveReaderIndex(to: line.next)
        guard let arguments = splitInline(bytes) else { return .error("ERR Protocol error: unbalanced quotes in request") }
        return .request(arguments)
    }
}

/// Splits an inline request into arguments as Redis's sdssplitargs does: spaces separate,
/// "double quotes" take \n \r \t \b \a \\ \" and \xHH escapes, 'single quotes' take \'.
func splitInline(_ line: [UInt8]) -> [[UInt8]]? {
    var arguments: [[UInt8]] = []
    var index = 0
    func isSpace(_ byte: UInt8) -> Bool { byte == 32 || byte == 9 || byte == 10 || byte == 13 || byte == 11 || byte == 12 }
    func hex(_ byte: UInt8) -> UInt8? {
        switch byte {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): byte - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): byte - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): byte - UInt8(ascii: "A") + 10
        default: nil
        }
    }
    while true {
        while index < line.count, isSpace(line[index]) { index += 1 }
        guard index < line.count else { return arguments }
        var current: [UInt8] = []
        var inDouble = false
        var inSingle = false
        var done = false
        while !done {
            if inDouble {
                guard index < line.count else { return nil }
                let byte = line[index]
                if byte == UInt8(ascii: "\\"), index + 3 < line.count, line[index + 1] == UInt8(ascii: "x"),
                   let high = hex(line[index + 2]), let low = hex(line[index + 3]) {
                    current.append(high << 4 | low)
                    index += 3
                } else if byte == UInt8(ascii: "\\"), index + 1 < line.count {
                    index += 1
                    switch line[index] {
                    case UInt8(ascii: "n"): current.append(10)
                    case UInt8(ascii: "r"): current.append(13)
                    case UInt8(ascii: "t"): current.append(9)
                    case UInt8(ascii: "b"): current.append(8)
                    case UInt8(ascii: "a"): current.append(7)
                    default: current.append(line[index])
                    }
                } else if byte == UInt8(ascii: "\"") {
                    // A closing quote must be followed by a space or the end.
                    if index + 1 < line.count, !isSpace(line[index + 1]) { return nil }
                    done = true
                } else {
                    current.append(byte)
                }
            } else if inSingle {
                guard index < line.count else { return nil }
                let byte = line[index]
                if byte == UInt8(ascii: "\\"), index + 1 < line.count, line[index + 1] == UInt8(ascii: "'") {
                    index += 1
                    current.append(UInt8(ascii: "'"))
                } else if byte == UInt8(ascii: "'") {
                    if index + 1 < line.count, !isSpace(line[index + 1]) { return nil }
                    done = true
                } else {
                    current.append(byte)
                }
            } else if index >= line.count || isSpace(line[index]) {
                done = true
            } else if line[index] == UInt8(ascii: "\"") {
                inDouble = true
            } else if line[index] == UInt8(ascii: "'") {
                inSingle = true
            } else {
                current.append(line[index])
            }
            if index < line.count { index += 1 }
        }
        arguments.append(current)
    }
}

/// ASCII letters lowered (command names and options).
func lowercasedASCII(_ bytes: [UInt8]) -> [UInt8] { bytes.map { $0 >= 65 && $0 <= 90 ? $0 + 32 : $0 } }

/// Whether the credentials, as sent, are the default user's required password (bytes compared).
func credentialsMatch(user: [UInt8], password: [UInt8], required: [UInt8]?) -> Bool {
    guard let required else { return false }
    return user == Array("default".utf8) && constantTimeEquals(password, secret: required)
}

/// HELLO [protover [AUTH username password] [SETNAME clientname]], parsed and checked whole
/// before anything takes effect (as Redis).
struct HelloRequest {
    var version: Int?
    var credentials: (user: [UInt8], password: [UInt8])?
    var name: String?

    static func parse(_ a: [[UInt8]]) -> Result<HelloRequest, HelloError> {
        var hello = HelloRequest()
        var index = 0
        if let first = a.first {
            guard let requested = Int64(String(decoding: first, as: UTF8.self)) else { return .failure(.message("ERR Protocol version is not an integer or out of range")) }
            guard requested == 2 || requested == 3 else { return .failure(.message("NOPROTO unsupported protocol version")) }
            hello.version = Int(requested)
            index = 1
        }
        while index < a.count {
            let option = lowercasedASCII(a[index])
            if option == Array("auth".utf8), index + 2 < a.count {
                hello.credentials = (a[index + 1], a[index + 2])
                index += 3
            } else if option == Array("setname".utf8), index + 1 < a.count {
                let name = String(decoding: a[index + 1], as: UTF8.self)
                guard !a[index + 1].contains(where: { $0 == UInt8(ascii: " ") || $0 == UInt8(ascii: "\n") || $0 == UInt8(ascii: "\r") }) else {
                    return .failure(.message("ERR Client names cannot contain spaces, newlines or special characters."))
                }
                hello.name = name
                index += 2
            } else {
                return .failure(.message("ERR Syntax error in HELLO option '\(String(decoding: a[index], as: UTF8.self).lowercased())'"))
            }
        }
        return .success(hello)
    }
}

enum HelloError: Error {
    case message(String)
}
