// A command's reply, independent of the wire protocol: KeelServer writes it as RESP2 or RESP3.
// Replies computed by `apply` travel back to the proposer as bytes (`encoded` / `init(decoding:)`).

import KeelCore

/// A reply to a command. (Not `indirect`: nested replies live in arrays, already on the heap, so
/// a reply needs no box of its own; an `indirect` enum allocated one for every reply.)
public enum Reply: Sendable, Equatable {
    case simple(String)
    case error(String)
    case integer(Int64)
    /// A bulk string; nil is the null reply.
    case bulk([UInt8]?)
    /// An array; nil is the null array (an aborted transaction).
    case array([Reply]?)
    case double(Double)
    /// A map (RESP3); a flat array of key, value, ... in RESP2.
    case map([(Reply, Reply)])

    public static let ok = Reply.simple("OK")
    public static let null = Reply.bulk(nil)

    public static func bulk(_ text: String) -> Reply { .bulk(Array(text.utf8)) }

    public static func == (lhs: Reply, rhs: Reply) -> Bool {
        switch (lhs, rhs) {
        case (.simple(let a), .simple(let b)), (.error(let a), .error(let b)): a == b
        case (.integer(let a), .integer(let b)): a == b
        case (.bulk(let a), .bulk(let b)): a == b
        case (.array(let a), .array(let b)): a == b
        case (.double(let a), .double(let b)): a == b || (a.isNaN && b.isNaN)
        case (.map(let a), .map(let b)): a.count == b.count && zip(a, b).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: false
        }
    }

    /// Whether this is an error reply.
    public var isError: Bool {
        if case .error = self { return true }
        return false
    }

    // MARK: - Binary form (tag byte, then the value)

    public var encoded: [UInt8] {
        // OK, the commonest result of a write, is encoded once (an allocation a write).
        if case .simple(let text) = self, text == "OK" { return Self.encodedOK }
        // Sized exactly: a pipelined batch's array of replies grew through four allocations.
        var writer = ByteWriter(capacity: encodedSize)
        encode(into: &writer)
        return writer.bytes
    }

    static let encodedOK: [UInt8] = {
        var writer = ByteWriter(capacity: 7)
        Reply.ok.encode(into: &writer)
        return writer.bytes
    }()

    /// The length of `encoded` (its buffer is allocated once, at this size).
    public var encodedSize: Int {
        switch self {
        case .simple(let text), .error(let text): 5 + text.utf8.count
        case .integer, .double: 9
        case .bulk(let bytes): bytes.map { 5 + $0.count } ?? 1
        case .array(let items): items.map { $0.reduce(5) { $0 + $1.encodedSize } } ?? 1
        case .map(let pairs): pairs.reduce(5) { $0 + $1.0.encodedSize + $1.1.encodedSize }
        }
    }

    func encode(into writer: inout ByteWriter) {
        switch self {
        case .simple(let text):
            writer.write(UInt8(1))
            writer.writeLengthPrefixed(text)
        case .error(let text):
            writer.write(UInt8(2))
            writer.writeLengthPrefixed(text)
        case .integer(let value):
            writer.write(UInt8(3))
            writer.write(UInt64(bitPattern: value))
        case .bulk(let bytes):
            if let bytes {
                writer.write(UInt8(4))
                writer.writeLengthPrefixed(bytes)
            } else {
                writer.write(UInt8(5))
            }
        case .array(let items):
            if let items {
                writer.write(UInt8(6))
                writer.write(UInt32(items.count))
                for item in items { item.encode(into: &writer) }
            } else {
                writer.write(UInt8(7))
            }
        case .double(let value):
            writer.write(UInt8(8))
            writer.write(value.bitPattern)
        case .map(let pairs):
            writer.write(UInt8(9))
            writer.write(UInt32(pairs.count))
            for (key, value) in pairs {
                key.encode(into: &writer)
                value.encode(into: &writer)
            }
        }
    }

    /// Decodes a reply; a malformed one becomes an error reply (it never traps).
    public init(decoding bytes: [UInt8]) {
        var reader = ByteReader(bytes)
        do {
            self = try Reply.decode(&reader, depth: 0)
        } catch {
            self = .error("ERR internal: malformed reply (\(error))")
        }
    }

    static func decode(_ reader: inout ByteReader<[UInt8]>, depth: Int) throws(DecodingError) -> Reply {
        guard depth < 8 else { throw DecodingError("reply nested too deeply", offset: reader.position) }
        let limit = reader.bytes.count
        switch try reader.readUInt8("reply tag") {
        case 1: return .simple(String(decoding: try reader.readLengthPrefixed(limit: limit), as: UTF8.self))
        case 2: return .error(String(decoding: try reader.readLengthPrefixed(limit: limit), as: UTF8.self))
        case 3: return .integer(Int64(bitPattern: try reader.readUInt64()))
        case 4: return .bulk(Array(try reader.readLengthPrefixed(limit: limit)))
        case 5: return .bulk(nil)
        case 6:
            let count = Int(try reader.readUInt32())
            guard count <= reader.remaining else { throw DecodingError("array count", offset: reader.position) }
            var items: [Reply] = []
            items.reserveCapacity(count)
            for _ in 0..<count { items.append(try decode(&reader, depth: depth + 1)) }
            return .array(items)
        case 7: return .array(nil)
        case 8: return .double(Double(bitPattern: try reader.readUInt64()))
        case 9:
            let count = Int(try reader.readUInt32())
            guard count <= reader.remaining else { throw DecodingError("map count", offset: reader.position) }
            var pairs: [(Reply, Reply)] = []
            for _ in 0..<count { pairs.append((try decode(&reader, depth: depth + 1), try decode(&reader, depth: depth + 1))) }
            return .map(pairs)
        default:
            throw DecodingError("unknown reply tag", offset: reader.position - 1)
        }
    }
}
