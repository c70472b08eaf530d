// The key-value commands as typed values: parsed from a client's arguments (to check them before
// anything is logged) and parsed again from the log when applied, with the entry's time as "now".

import KeelCore

/// When a key expires.
public enum Expiry: Sendable, Equatable {
    /// Remove any expiry.
    case none
    /// Keep the key's expiry (SET KEEPTTL).
    case keep
    /// At this absolute time (Unix milliseconds).
    case at(Int64)
}

/// A parsed key-value command.
public enum KVCommand: Sendable, Equatable {
    public enum SetCondition: Sendable, Equatable { case always, ifAbsent, ifPresent }
    /// How a SET-like command answers.
    public enum SetReply: Sendable, Equatable { case ok, integer, oldValue }
    public enum ExpireCondition: Sendable, Equatable { case always, ifNone, ifSome, ifGreater, ifLess }

    case get([UInt8])
    case set(key: [UInt8], value: [UInt8], condition: SetCondition, expiry: Expiry, reply: SetReply)
    case getDelete([UInt8])
    case getExpire([UInt8], Expiry?)
    case delete([[UInt8]])
    case exists([[UInt8]])
    case incrementBy([UInt8], Int64)
    case incrementByFloat([UInt8], Double)
    case append([UInt8], [UInt8])
    case length([UInt8])
    case getRange([UInt8], Int64, Int64)
    case setRange([UInt8], Int, [UInt8])
    case multiGet([[UInt8]])
    case multiSet([KeyValue], onlyIfNoneExist: Bool)
    /// EXPIRE and friends: the absolute time, the condition, and whether the reply is 1/0.
    case expire([UInt8], at: Int64, ExpireCondition)
    case timeToLive([UInt8], milliseconds: Bool)
    case persist([UInt8])
    case type([UInt8])
    case rename([UInt8], [UInt8], onlyIfAbsent: Bool)
    case copy([UInt8], [UInt8], database: Int?, replace: Bool)
    case keys([UInt8])
    /// The cursor is a position in hash order (see `HashTrie`), 0 to start.
    case scan(cursor: UInt64, match: [UInt8]?, count: Int, type: String?)
    case databaseSize
    case randomKey
    case flushDatabase
    case flushAll
    case swapDatabases(Int, Int)

    /// A key and its value (MSET's pairs).
    public struct KeyValue: Sendable, Equatable {
        public var key: [UInt8]
        public var value: [UInt8]
    }

    /// Whether it changes the state (and so goes through the log).
    public var isWrite: Bool {
        switch self {
        case .get, .exists, .length, .getRange, .multiGet, .timeToLive, .type, .keys, .scan, .databaseSize, .randomKey: false
        case .getExpire(_, let expiry): expiry != nil
        default: true
        }
    }

    /// The keys it names (for WATCH-free bookkeeping and tests).
    public var keys: [[UInt8]] {
        switch self {
        case .get(let key), .getDelete(let key), .getExpire(let key, _), .incrementBy(let key, _), .incrementByFloat(let key, _),
             .append(let key, _), .length(let key), .getRange(let key, _, _), .setRange(let key, _, _), .expire(let key, _, _),
             .timeToLive(let key, _), .persist(let key), .type(let key):
            [key]
        case .set(let key, _, _, _, _): [key]
        case .delete(let keys), .exists(let keys), .multiGet(let keys): keys
        case .multiSet(let pairs, _): pairs.map(\.key)
        case .rename(let a, let b, _), .copy(let a, let b, _, _): [a, b]
        default: []
        }
    }
}

/// Why a command was refused before it ran: the Redis error text.
public struct CommandError: Error, Sendable, Equatable {
    public var message: String
    public init(_ message: String) { self.message = message }

    static let syntax = CommandError("ERR syntax error")
    static let notInteger = CommandError("ERR value is not an integer or out of range")
    static let notFloat = CommandError("ERR value is not a valid float")
    static let databaseRange = CommandError("ERR DB index is out of range")
    static func arity(_ name: String) -> CommandError { CommandError("ERR wrong number of arguments for '\(name)' command") }
}

/// A command's arity (`kvCommandArity`), nil for a name this module does not execute. GET and SET,
/// nearly every request, are answered without hashing the name (a small string compares in one step).
@inlinable
public func kvArity(_ name: String) -> Int? {
    if name == "set" { return -3 }
    if name == "get" { return 2 }
    return kvCommandArity[name]
}

/// The names this module executes, with their arity (Redis's convention: negative means at least).
public let kvCommandArity: [String: Int] = [
    "get": 2, "set": -3, "setnx": 3, "setex": 4, "psetex": 4, "getset": 3, "getdel": 2, "getex": -2,
    "del": -2, "unlink": -2, "exists": -2, "incr": 2, "decr": 2, "incrby": 3, "decrby": 3, "incrbyfloat": 3,
    "append": 3, "strlen": 2, "getrange": 4, "substr": 4, "setrange": 4, "mget": -2, "mset": -3, "msetnx": -3,
    "expire": -3, "pexpire": -3, "expireat": -3, "pexpireat": -3, "ttl": 2, "pttl": 2, "persist": 2, "type": 2,
    "rename": 3, "renamenx": 3, "copy": -3, "keys": 2, "scan": -2, "dbsize": 1, "randomkey": 1,
    "flushdb": -1, "flushall": -1, "swapdb": 3,
]

/// Parses a signed 64-bit integer as Redis does (no spaces, no '+', no leading zeros).
public func parseInteger(_ bytes: [UInt8]) -> Int64? {
    guard !bytes.isEmpty, bytes.count <= 20 else { return nil }
    var index = 0
    let negative = bytes[0] == UInt8(ascii: "-")
    if negative { index = 1 }
    guard index < bytes.count else { return nil }
    if bytes[index] == UInt8(ascii: "0") { return bytes.count == index + 1 && !negative ? 0 : nil }
    var magnitude: UInt64 = 0
    while index < bytes.count {
        let digit = bytes[index] &- UInt8(ascii: "0")
        guard digit <= 9 else { return nil }
        let (times, overflow1) = magnitude.multipliedReportingOverflow(by: 10)
        let (sum, overflow2) = times.addingReportingOverflow(UInt64(digit))
        guard !overflow1, !overflow2 else { return nil }
        magnitude = sum
        index += 1
    }
    if negative { return magnitude <= UInt64(Int64.max) + 1 ? Int64(truncatingIfNeeded: 0 &- magnitude) : nil }
    return magnitude <= UInt64(Int64.max) ? Int64(magnitude) : nil
}

/// Parses a float as Redis does (no spaces; "inf" allowed where Redis allows it; never NaN).
public func parseFloat(_ bytes: [UInt8]) -> Double? {
    guard !bytes.isEmpty, bytes.count <= 64, bytes.allSatisfy({ $0 > 32 && $0 < 127 }) else { return nil }
    let text = String(decoding: bytes, as: UTF8.self).lowercased()
    if ["inf", "+inf", "infinity", "+infinity"].contains(text) { return .infinity }
    if ["-inf", "-infinity"].contains(text) { return -.infinity }
    guard let value = Double(text), !value.isNaN else { return nil }
    return value
}

/// Formats a float as Redis's INCRBYFLOAT does: the shortest digits that read back the same,
/// with no exponent and no trailing zeros ("10.6", "0.00003", "100000000000000000000").
public func formatFloat(_ value: Double) -> String {
    if value.isInfinite { return value < 0 ? "-inf" : "inf" }
    let text = "\(value)"
    guard let e = text.firstIndex(where: { $0 == "e" || $0 == "E" }) else {
        return text.hasSuffix(".0") ? String(text.dropLast(2)) : text
    }
    let exponent = Int(text[text.index(after: e)...]) ?? 0
    var mantissa = String(text[..<e])
    let negative = mantissa.hasPrefix("-")
    if negative { mantissa.removeFirst() }
    let parts = mantissa.split(separator: ".", omittingEmptySubsequences: false)
    let whole = String(parts[0])
    let fraction = parts.count > 1 ? String(parts[1]) : ""
    var digits = whole + fraction
    var point = whole.count + exponent
    if point <= 0 {
        digits = String(repeating: "0", count: -point + 1) + digits
        point = 1
    } else if point > digits.count {
        digits += String(repeating: "0", count: point - digits.count)
    }
    var result = String(digits.prefix(point))
    var tail = String(digits.dropFirst(point))
    while tail.hasSuffix("0") { tail.removeLast() }
    if !tail.isEmpty { result += "." + tail }
    while result.count > 1, result.hasPrefix("0"), !result.hasPrefix("0.") { result.removeFirst() }
    return (negative ? "-" : "") + result
}

extension KVCommand {
    /// Parses a command; `name` lowercased, `arguments` after the name; `now` in Unix milliseconds
    /// turns relative expiry times into absolute ones.
    public static func parse(_ name: String, _ arguments: [[UInt8]], now: Int64) throws(CommandError) -> KVCommand {
        guard let arity = kvArity(name) else { throw CommandError("ERR unknown command '\(name)'") }
        let count = arguments.count + 1
        guard arity >= 0 ? count == arity : count >= -arity else { throw .arity(name) }
        let a = arguments
        func integer(_ bytes: [UInt8]) throws(CommandError) -> Int64 {
            guard let value = parseInteger(bytes) else { throw .notInteger }
            return value
        }
        func expireTime(_ bytes: [UInt8], unit: Int64, absolute: Bool, command: String) throws(CommandError) -> Int64 {
            let value = try integer(bytes)
            let (scaled, overflow) = value.multipliedReportingOverflow(by: unit)
            guard !overflow else { throw CommandError("ERR invalid expire time in '\(command)' command") }
            if absolute { return scaled }
            let (sum, overflow2) = scaled.addingReportingOverflow(now)
            guard !overflow2 else { throw CommandError("ERR invalid expire time in '\(command)' command") }
            return sum
        }
        switch name {
        case "get": return .get(a[0])
        case "set":
            var condition = SetCondition.always
            var expiry = Expiry.none
            var expirySet = false
            var reply = SetReply.ok
            var index = 2
            while index < a.count {
                let option = String(decoding: a[index], as: UTF8.self).lowercased()
                switch option {
                case "nx", "xx":
                    guard condition == .always else { throw .syntax }
                    condition = option == "nx" ? .ifAbsent : .ifPresent
                case "get":
                    reply = .oldValue
                case "keepttl":
                    guard !expirySet else { throw .syntax }
                    expiry = .keep
                    expirySet = true
                case "ex", "px", "exat", "pxat":
                    guard !expirySet, index + 1 < a.count else { throw .syntax }
                    index += 1
                    let value = try integer(a[index])
                    guard value > 0 else { throw CommandError("ERR invalid expire time in 'set' command") }
                    let unit: Int64 = option.hasPrefix("p") ? 1 : 1000
                    expiry = .at(try expireTime(a[index], unit: unit, absolute: option.hasSuffix("at"), command: "set"))
                    expirySet = true
                default:
                    throw .syntax
                }
                index += 1
            }
            return .set(key: a[0], value: a[1], condition: condition, expiry: expiry, reply: reply)
        case "setnx": return .set(key: a[0], value: a[1], condition: .ifAbsent, expiry: .none, reply: .integer)
        case "setex", "psetex":
            let value = try integer(a[1])
            guard value > 0 else { throw CommandError("ERR invalid expire time in '\(name)' command") }
            let at = try expireTime(a[1], unit: name == "setex" ? 1000 : 1, absolute: false, command: name)
            return .set(key: a[0], value: a[2], condition: .always, expiry: .at(at), reply: .ok)
        case "getset": return .set(key: a[0], value: a[1], condition: .always, expiry: .none, reply: .oldValue)
        case "getdel": return .getDelete(a[0])
        case "getex":
            guard a.count > 1 else { return .getExpire(a[0], nil) }
            let option = String(decoding: a[1], as: UTF8.self).lowercased()
            if option == "persist" {
                guard a.count == 2 else { throw .syntax }
                return .getExpire(a[0], Expiry.none)
            }
            guard ["ex", "px", "exat", "pxat"].contains(option), a.count == 3 else { throw .syntax }
            let value = try integer(a[2])
            guard value > 0 else { throw CommandError("ERR invalid expire time in 'getex' command") }
            return .getExpire(a[0], .at(try expireTime(a[2], unit: option.hasPrefix("p") ? 1 : 1000, absolute: option.hasSuffix("at"), command: "getex")))
        case "del", "unlink": return .delete(a)
        case "exists": return .exists(a)
        case "incr": return .incrementBy(a[0], 1)
        case "decr": return .incrementBy(a[0], -1)
        case "incrby": return .incrementBy(a[0], try integer(a[1]))
        case "decrby":
            let value = try integer(a[1])
            guard value != .min else { throw CommandError("ERR decrement would overflow") }
            return .incrementBy(a[0], -value)
        case "incrbyfloat":
            guard let value = parseFloat(a[1]) else { throw .notFloat }
            return .incrementByFloat(a[0], value)
        case "append": return .append(a[0], a[1])
        case "strlen": return .length(a[0])
        case "getrange", "substr": return .getRange(a[0], try integer(a[1]), try integer(a[2]))
        case "setrange":
            let offset = try integer(a[1])
            guard offset >= 0 else { throw CommandError("ERR offset is out of range") }
            guard offset <= Int64(Int32.max) else { throw CommandError("ERR string exceeds maximum allowed size (proto-max-bulk-len)") }
            return .setRange(a[0], Int(offset), a[2])
        case "mget": return .multiGet(a)
        case "mset", "msetnx":
            guard a.count.isMultiple(of: 2) else { throw .arity(name) }
            return .multiSet(stride(from: 0, to: a.count, by: 2).map { KeyValue(key: a[$0], value: a[$0 + 1]) }, onlyIfNoneExist: name == "msetnx")
        case "expire", "pexpire", "expireat", "pexpireat":
            let at = try expireTime(a[1], unit: name.hasPrefix("p") ? 1 : 1000, absolute: name.hasSuffix("at"), command: name)
            var condition = ExpireCondition.always
            for option in a.dropFirst(2) {
                let next: ExpireCondition
                switch String(decoding: option, as: UTF8.self).lowercased() {
                case "nx": next = .ifNone
                case "xx": next = .ifSome
                case "gt": next = .ifGreater
                case "lt": next = .ifLess
                default: throw CommandError("ERR Unsupported option \(String(decoding: option, as: UTF8.self))")
                }
                if condition != .always, condition != next {
                    throw CommandError("ERR NX and XX, GT or LT options at the same time are not compatible")
                }
                condition = next
            }
            return .expire(a[0], at: at, condition)
        case "ttl", "pttl": return .timeToLive(a[0], milliseconds: name == "pttl")
        case "persist": return .persist(a[0])
        case "type": return .type(a[0])
        case "rename", "renamenx": return .rename(a[0], a[1], onlyIfAbsent: name == "renamenx")
        case "copy":
            var database: Int?
            var replace = false
            var index = 2
            while index < a.count {
                switch String(decoding: a[index], as: UTF8.self).lowercased() {
                case "replace": replace = true
                case "db":
                    guard index + 1 < a.count else { throw .syntax }
                    index += 1
                    let value = try integer(a[index])
                    guard value >= 0, value < Int64(KVStore.databaseCount) else { throw CommandError("ERR DB index is out of range") }
                    database = Int(value)
                default: throw .syntax
                }
                index += 1
            }
            return .copy(a[0], a[1], database: database, replace: replace)
        case "keys": return .keys(a[0])
        case "scan":
            // As Redis: an unsigned 64-bit decimal.
            guard !a[0].isEmpty, a[0].count <= 20, a[0].allSatisfy({ $0 >= UInt8(ascii: "0") && $0 <= UInt8(ascii: "9") }),
                  let cursor = UInt64(String(decoding: a[0], as: UTF8.self)) else { throw CommandError("ERR invalid cursor") }
            var match: [UInt8]?
            var count = 10
            var type: String?
            var index = 1
            while index < a.count {
                guard index + 1 < a.count else { throw .syntax }
                switch String(decoding: a[index], as: UTF8.self).lowercased() {
                case "match": match = a[index + 1]
                case "count":
                    let value = try integer(a[index + 1])
                    guard value >= 1 else { throw .syntax }
                    count = Int(min(value, 100_000))
                case "type": type = String(decoding: a[index + 1], as: UTF8.self).lowercased()
                default: throw .syntax
                }
                index += 2
            }
            return .scan(cursor: cursor, match: match, count: count, type: type)
        case "dbsize": return .databaseSize
        case "randomkey": return .randomKey
        case "flushdb", "flushall":
            if let option = a.first {
                guard a.count == 1, ["async", "sync"].contains(String(decoding: option, as: UTF8.self).lowercased()) else { throw .syntax }
            }
            return name == "flushdb" ? .flushDatabase : .flushAll
        case "swapdb":
            guard let first = parseInteger(a[0]), let second = parseInteger(a[1]) else { throw CommandError("ERR invalid first DB index") }
            guard (0..<Int64(KVStore.databaseCount)).contains(first), (0..<Int64(KVStore.databaseCount)).contains(second) else {
                throw .databaseRange
            }
            return .swapDatabases(Int(first), Int(second))
        default:
            throw CommandError("ERR unknown command '\(name)'")
        }
    }
}
