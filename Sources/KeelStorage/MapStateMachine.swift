// A small reference state machine: a map from byte strings to byte strings with set, delete and
// add. The tests, the crash writer and the benchmarks use it; KeelKV is the real key-value machine.
//
// Its state is a `TreeDictionary`, whose copies are O(1) and share structure, so a checkpoint of
// a million keys is taken in constant time on the write path and encoded elsewhere.
//
// Command encoding (one log entry each):
//   0x01 set    key (u32 length + bytes), value (u32 length + bytes)   -> .done
//   0x02 delete key                                                    -> .existed(Bool)
//   0x03 add    key, delta (i64)  value as 8-byte little-endian i64    -> .number(new value)
// Checkpoint body: count (u64), then per pair key and value, each u32 length + bytes, in
// ascending byte order of the keys, so equal states give equal checkpoint bytes.

import HashTreeCollections
import KeelCore

/// A byte-string map that can be made durable with ``DurableStore``.
public struct MapStateMachine: DurableStateMachine, Sendable {
    /// What a command returns.
    public enum Output: Sendable, Equatable {
        case done
        case existed(Bool)
        case number(Int64)
        /// A command that does not decode or does not apply (the entry is still consumed).
        case rejected(String)
    }

    /// An O(1) copy of the map that writes a checkpoint.
    public struct Snapshot: CheckpointSource {
        let pairs: TreeDictionary<[UInt8], [UInt8]>

        public func writeCheckpoint(to sink: inout CheckpointSink) throws(StorageError) {
            try sink.write(UInt64(pairs.count))
            // In key order, so the same state always gives the same bytes (hash order changes
            // from process to process). The sort runs on the checkpoint thread, off the write path.
            for key in pairs.keys.sorted(by: { $0.lexicographicallyPrecedes($1) }) {
                try sink.writeLengthPrefixed(key)
                try sink.writeLengthPrefixed(pairs[key]!)
            }
        }
    }

    /// The map.
    public private(set) var pairs: TreeDictionary<[UInt8], [UInt8]> = [:]

    public init() {}

    public init(checkpoint body: [UInt8], limits: Limits) throws(StorageError) {
        var reader = ByteReader(body)
        do {
            let count = try reader.readUInt64("pair count")
            // Each pair takes at least 8 bytes, which bounds a hostile count.
            guard count <= UInt64(reader.remaining / 8) else {
                throw DecodingError("pair count \(count) larger than the body allows", offset: 0)
            }
            for _ in 0..<count {
                let key = try reader.readLengthPrefixed(limit: limits.checkpointItemSizeMax, "key")
                let value = try reader.readLengthPrefixed(limit: limits.checkpointItemSizeMax, "value")
                pairs[Array(key)] = Array(value)
            }
            guard reader.isAtEnd else { throw DecodingError("\(reader.remaining) bytes after the last pair", offset: reader.position) }
        } catch {
            throw .unrecoverable(reason: "the checkpoint body does not decode as a map: \(error)",
                                 remedy: "The checkpoint's checksum was valid, so it was written by another state machine or version.")
        }
    }

    public func snapshot() -> Snapshot { Snapshot(pairs: pairs) }

    public mutating func apply(_ entry: LogEntry) -> Output {
        var reader = ByteReader(entry.payload)
        do {
            let operation = try reader.readUInt8("operation")
            let limit = entry.payload.count
            switch operation {
            case 1:
                let key = Array(try reader.readLengthPrefixed(limit: limit, "key"))
                let value = Array(try reader.readLengthPrefixed(limit: limit, "value"))
                pairs[key] = value
                return .done
            case 2:
                let key = Array(try reader.readLengthPrefixed(limit: limit, "key"))
                return .existed(pairs.removeValue(forKey: key) != nil)
            case 3:
                let key = Array(try reader.readLengthPrefixed(limit: limit, "key"))
                let delta = Int64(bitPattern: try reader.readUInt64("delta"))
                let current = pairs[key].flatMap(Self.decodeNumber) ?? 0
                let (sum, overflow) = current.addingReportingOverflow(delta)
                if overflow { return .rejected("increment would overflow") }
                pairs[key] = Self.encodeNumber(sum)
                return .number(sum)
            default:
                return .rejected("unknown operation \(operation)")
            }
        } catch {
            return .rejected("\(error)")
        }
    }

    /// The value of a key.
    public subscript(key: [UInt8]) -> [UInt8]? { pairs[key] }

    /// The number stored under a key by `add`, if any.
    public func number(_ key: [UInt8]) -> Int64? { pairs[key].flatMap(Self.decodeNumber) }

    static func encodeNumber(_ value: Int64) -> [UInt8] {
        var writer = ByteWriter(capacity: 8)
        writer.write(UInt64(bitPattern: value))
        return writer.bytes
    }

    static func decodeNumber(_ bytes: [UInt8]) -> Int64? {
        guard bytes.count == 8 else { return nil }
        var reader = ByteReader(bytes)
        guard let raw = try? reader.readUInt64() else { return nil }
        return Int64(bitPattern: raw)
    }

    // MARK: - Commands

    /// The command that sets `key` to `value`.
    public static func set(_ key: [UInt8], _ value: [UInt8]) -> [UInt8] {
        var writer = ByteWriter(capacity: 9 + key.count + value.count)
        writer.write(UInt8(1))
        writer.writeLengthPrefixed(key)
        writer.writeLengthPrefixed(value)
        return writer.bytes
    }

    /// The command that deletes `key`.
    public static func delete(_ key: [UInt8]) -> [UInt8] {
        var writer = ByteWriter(capacity: 5 + key.count)
        writer.write(UInt8(2))
        writer.writeLengthPrefixed(key)
        return writer.bytes
    }

    /// The command that adds `delta` to the number under `key`.
    public static func add(_ key: [UInt8], _ delta: Int64) -> [UInt8] {
        var writer = ByteWriter(capacity: 13 + key.count)
        writer.write(UInt8(3))
        writer.writeLengthPrefixed(key)
        writer.write(UInt64(bitPattern: delta))
        return writer.bytes
    }
}
