@testable import KeelServer
import KeelKV
import NIOCore
import NIOEmbedded
import Testing

@Suite("The RESP request decoder")
struct RESPDecoderTests {
    func decode(_ chunks: [[UInt8]], limits: RESPLimits = RESPLimits(), authentication: AuthenticationLimits? = nil,
                password: String? = nil) throws -> [RESPRequest] {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(RESPRequestDecoder(limits: limits, authentication: authentication, password: password)))
        var requests: [RESPRequest] = []
        for chunk in chunks {
            try channel.writeInbound(ByteBuffer(bytes: chunk))
            while let request = try channel.readInbound(as: RESPRequest.self) { requests.append(request) }
        }
        _ = try? channel.finish()
        return requests
    }

    @Test("requests fed one byte at a time decode to the same requests as fed whole")
    func dripFed() throws {
        let bytes = Array("*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nva\r\nl\r\nPING\r\n*2\r\n$4\r\nECHO\r\n$0\r\n\r\nGET \"a b\"\r\n".utf8)
        let whole = try decode([bytes])
        #expect(whole == [
            .command(name: "SET", arguments: [Array("k".utf8), Array("va\r\nl".utf8)]), .command(name: "PING", arguments: []),
            .command(name: "ECHO", arguments: [[]]), .command(name: "GET", arguments: [Array("a b".utf8)]),
        ])
        #expect(try decode(bytes.map { [$0] }) == whole)
    }

    @Test("whole requests (the one-pass path) decode exactly as the same bytes fed one at a time (the general path), malformed ones included")
    func onePassMatchesGeneral() throws {
        let valid = Array("*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n*1\r\n$4\r\nPING\r\n".utf8)
        var cases: [[UInt8]] = [
            valid,
            Array("*1\n$4\nPING\n".utf8), // LF-only line ends
            Array("*1\r\n$4\r\nPINGxx*1\r\n$4\r\nPING\r\n".utf8), // no CRLF after the data: skipped, as Redis does
            Array("*0\r\n*-1\r\n*1\r\n$4\r\nPING\r\n".utf8),
            Array("*1\r\n$-0\r\n\r\n".utf8), Array("*1\r\n$-1\r\n".utf8), Array("*1\r\n$+4\r\nPING\r\n".utf8),
            Array("*1\r\n$9999999999999999999\r\nx\r\n".utf8), Array("*99999999999999999999\r\n".utf8),
            Array("*1\r\n$0000000000000000004\r\nPING\r\n".utf8), Array("*2\r\n:4\r\nPING\r\n".utf8),
            Array("*1\r\n$5\r\nabc".utf8), Array("*\r\n".utf8), Array("*1\r\n$\r\n\r\n".utf8),
        ]
        // Seeded corruptions of the valid stream: a byte changed, dropped or doubled.
        var state: UInt64 = 0x5EED
        func next(_ bound: Int) -> Int {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Int((state >> 33) % UInt64(bound))
        }
        let alphabet = Array("*$\r\n-0123456789x".utf8)
        for _ in 0..<300 {
            var bytes = valid
            let at = next(bytes.count)
            switch next(3) {
            case 0: bytes[at] = alphabet[next(alphabet.count)]
            case 1: bytes.remove(at: at)
            default: bytes.insert(bytes[at], at: at)
            }
            cases.append(bytes)
        }
        var shortBulks = RESPLimits()
        shortBulks.bulkLengthMax = 4
        var fewElements = RESPLimits()
        fewElements.multibulkLengthMax = 2
        for limits in [RESPLimits(), shortBulks, fewElements] {
            for bytes in cases {
                #expect(try decode([bytes], limits: limits) == decode(bytes.map { [$0] }, limits: limits), "\(String(decoding: bytes, as: UTF8.self).debugDescription)")
            }
        }
        #expect(try decode([Array("*1\r\n$9999999999999999999\r\nx\r\n".utf8)]) == [.protocolError("ERR Protocol error: invalid bulk length")])
    }

    @Test("a large request arriving in many packets is answered once, and over the query buffer limit it is refused")
    func largeRequestInPieces() throws {
        var request = Array("*1001\r\n$4\r\nMSET\r\n".utf8)
        for i in 0..<1000 { request += Array("$6\r\nv\(String(format: "%05d", i))\r\n".utf8) }
        let pieces = stride(from: 0, to: request.count, by: 7).map { Array(request[$0..<min($0 + 7, request.count)]) }
        let decoded = try decode(pieces)
        #expect(decoded.count == 1)
        if case .command(let name, let arguments) = decoded.first { #expect(name == "MSET" && arguments.count == 1000 && arguments.last == Array("v00999".utf8)) }
        var small = RESPLimits()
        small.queryBufferMax = 1024
        let refused = try decode(pieces, limits: small)
        #expect(refused == [.protocolError("ERR Protocol error: query buffer exceeds the limit")], "elements already taken count toward the limit")
    }

    @Test("before AUTH: at most 10 elements and 16 KiB bulk strings (Redis 7); the right AUTH lifts the limits for what follows it")
    func unauthenticatedLimits() throws {
        func request(_ words: [String]) -> [UInt8] {
            Array("*\(words.count)\r\n".utf8) + words.flatMap { Array("$\($0.utf8.count)\r\n\($0)\r\n".utf8) }
        }
        let wide = request(["MSET"] + (0..<10).map { "k\($0)" })
        let big = request(["SET", "k", String(repeating: "x", count: 16385)])
        let locked = AuthenticationLimits(limited: true)
        #expect(try decode([wide], authentication: locked, password: "pw") == [.protocolError("ERR Protocol error: unauthenticated multibulk length")])
        #expect(try decode([big], authentication: AuthenticationLimits(limited: true), password: "pw")
            == [.protocolError("ERR Protocol error: unauthenticated bulk length")])
        // A wrong password keeps them; the right one (AUTH pw, AUTH default pw, HELLO 3 AUTH default pw) lifts them.
        let wrong = try decode([request(["AUTH", "nope"]) + big], authentication: AuthenticationLimits(limited: true), password: "pw")
        #expect(wrong.last == .protocolError("ERR Protocol error: unauthenticated bulk length"))
        for auth in [["AUTH", "pw"], ["auth", "default", "pw"], ["HELLO", "3", "AUTH", "default", "pw"],
                     ["HELLO", "3", "SETNAME", "auth", "AUTH", "default", "pw"]] {
            let state = AuthenticationLimits(limited: true)
            let decoded = try decode([request(auth) + big + wide], authentication: state, password: "pw")
            #expect(decoded.count == 3 && !state.limited, "\(auth): \(decoded.count) requests")
        }
        // What the connection would refuse lifts nothing (a bad version, a bad option, a bad name).
        for refused in [["HELLO", "4", "AUTH", "default", "pw"], ["HELLO", "3", "AUTH", "default", "pw", "EXTRA"],
                        ["HELLO", "3", "SETNAME", "a b", "AUTH", "default", "pw"], ["AUTH", "someone", "pw"]] {
            let state = AuthenticationLimits(limited: true)
            _ = try decode([request(refused)], authentication: state, password: "pw")
            #expect(state.limited, "\(refused)")
        }
        // Without a password required nothing is limited.
        #expect(try decode([wide, big], authentication: AuthenticationLimits(limited: false)).count == 2)
    }

    @Test("a first line trickled in one byte at a time is scanned once (linear, not quadratic), inline or a multibulk header")
    func trickledLineScannedOnce() throws {
        let words = (0..<6000).map { "w\($0)" }
        let inline = Array(words.joined(separator: " ").utf8) + Array("\r\n".utf8)
        var decoder = RESPRequestDecoder()
        var buffer = ByteBuffer()
        var outcomes: [RESPRequestDecoder.Outcome] = []
        for byte in inline {
            buffer.writeInteger(byte)
            let outcome = decoder.parse(&buffer)
            if outcome != .needMoreData { outcomes.append(outcome) }
        }
        #expect(outcomes == [.request(words.map { Array($0.utf8) })])
        #expect(decoder.bytesScanned <= 2 * inline.count, "\(decoder.bytesScanned) bytes scanned for a \(inline.count)-byte line")
        // A multibulk header that never ends is refused at the inline limit, also scanned once.
        var limits = RESPLimits()
        limits.inlineLengthMax = 4096
        var header = RESPRequestDecoder(limits: limits)
        var pending = ByteBuffer()
        var refused = false
        for byte in [UInt8(ascii: "*")] + [UInt8](repeating: UInt8(ascii: "1"), count: 5000) where !refused {
            pending.writeInteger(byte)
            if case .error(let message) = header.parse(&pending) {
                refused = message == "ERR Protocol error: too big mbulk count string"
            }
        }
        #expect(refused)
        #expect(header.bytesScanned <= 2 * 5001)
    }
}

@Suite("Command names and one-line replies")
struct CommandNameTests {
    @Test("a command's name is lowered as String.lowercased() lowers it, for ASCII and anything else")
    func commandNames() {
        let names: [[UInt8]] = [[], [0], Array("GeT".utf8), Array("set".utf8), Array("SET".utf8), Array("GET".utf8), Array("SETX".utf8), Array("GETS".utf8), Array("KEEL.MEMBER".utf8), Array("@[`{".utf8),
                                Array("ÄbC".utf8), Array("SÉT".utf8), [0xff, 0x41], Array("İ".utf8)]
        for name in names {
            let text = String(decoding: name, as: UTF8.self)
            #expect(RESPConnection.commandName(text) == text.lowercased(), "\(name)")
        }
    }

    @Test("a command's arity is the table's for every command (GET and SET looked up without the table), nil for any other name")
    func arities() {
        for (name, arity) in kvCommandArity { #expect(kvArity(name) == arity, "\(name)") }
        for name in ["SET", "GET", "se", "sett", "gett", "", "ping", "keel.member"] { #expect(kvArity(name) == nil, "\(name)") }
    }

    @Test("a simple reply or error loses its line breaks (CR, LF, CR LF each become one space), and nothing else")
    func oneLine() {
        #expect(ByteBuffer.oneLine("OK") == "OK")
        #expect(ByteBuffer.oneLine("a\r\nb\rc\nd") == "a b c d")
        #expect(ByteBuffer.oneLine("ünïcödé \u{1F600}") == "ünïcödé \u{1F600}")
        #expect(ByteBuffer.oneLine("é\r\n") == "é ")
    }
}

@Suite("Replies on the wire")
struct RESPEncoderTests {
    private func encoded(_ reply: Reply, protocol version: Int) -> String {
        var buffer = ByteBuffer()
        buffer.writeReply(reply, protocol: version)
        return String(buffer: buffer)
    }

    @Test("a number line is the prefix, the decimal digits String gives, and CR LF, for every Int64")
    func numberLines() {
        var values: [Int64] = [0, 1, -1, 9, 10, -10, 99, 100, 1 << 31, Int64.max, Int64.min, Int64.min + 1]
        var random = SystemRandomNumberGenerator()
        for _ in 0..<1000 { values.append(Int64.random(in: Int64.min...Int64.max, using: &random) >> Int64.random(in: 0...63, using: &random)) }
        for value in values {
            var buffer = ByteBuffer()
            buffer.writeNumberLine(UInt8(ascii: ":"), value)
            #expect(String(buffer: buffer) == ":\(value)\r\n")
        }
    }

    @Test("each kind of reply is written as Redis writes it, in RESP2 and RESP3")
    func replies() {
        #expect(encoded(.simple("OK"), protocol: 2) == "+OK\r\n")
        #expect(encoded(.simple("QUEUED"), protocol: 3) == "+QUEUED\r\n")
        #expect(encoded(.simple("a\r\nb"), protocol: 2) == "+a b\r\n")
        #expect(encoded(.error("ERR x"), protocol: 2) == "-ERR x\r\n")
        #expect(encoded(.integer(-42), protocol: 2) == ":-42\r\n")
        #expect(encoded(.bulk(Array("hello".utf8)), protocol: 2) == "$5\r\nhello\r\n")
        #expect(encoded(.bulk([]), protocol: 2) == "$0\r\n\r\n")
        #expect(encoded(.bulk(nil), protocol: 2) == "$-1\r\n")
        #expect(encoded(.bulk(nil), protocol: 3) == "_\r\n")
        #expect(encoded(.array([.integer(1), .bulk(Array("a".utf8))]), protocol: 2) == "*2\r\n:1\r\n$1\r\na\r\n")
        #expect(encoded(.array([]), protocol: 2) == "*0\r\n")
        #expect(encoded(.array(nil), protocol: 2) == "*-1\r\n")
        #expect(encoded(.map([(.bulk(Array("k".utf8)), .integer(7))]), protocol: 3) == "%1\r\n$1\r\nk\r\n:7\r\n")
        #expect(encoded(.map([(.bulk(Array("k".utf8)), .integer(7))]), protocol: 2) == "*2\r\n$1\r\nk\r\n:7\r\n")
        var header = ByteBuffer()
        header.writeAggregateHeader(3, map: true, protocol: 2)
        #expect(String(buffer: header) == "*6\r\n")
    }
}
