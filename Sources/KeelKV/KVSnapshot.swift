// The key-value store's snapshot: an O(1) copy of its databases, written out in key order (so two
// replicas with the same state write the same bytes). Format: docs/formats/kv.md.

#if canImport(Glibc)
import Glibc
#endif
import KeelCore
import KeelStorage

/// A frozen copy of the store, written on the checkpoint thread.
public struct KVSnapshot: CheckpointSource {
    let databases: [Database]
    let now: Int64
    let revision: UInt64

    public func writeCheckpoint(to sink: inout CheckpointSink) throws(StorageError) {
        var writer = ByteWriter(capacity: 1 << 16)
        writer.write(UInt8(1))
        writer.write(UInt64(bitPattern: now))
        writer.write(revision)
        writer.write(UInt8(databases.count))
        for (number, database) in databases.enumerated() {
            writer.write(UInt8(number))
            writer.write(UInt64(database.keys.count))
            // The pairs themselves are sorted (not the keys, then looked up again): the checkpoint
            // is written sooner, and the loop's writes copy the tree's shared nodes for less time.
            for (key, value) in database.keys.sorted(by: { bytesPrecede($0.key.bytes, $1.key.bytes) }) {
                writer.writeLengthPrefixed(key.bytes)
                writer.writeLengthPrefixed(value.bytes)
                writer.write(UInt64(bitPattern: value.expiresAt))
                writer.write(value.revision)
                if writer.count >= 1 << 16 {
                    try sink.write(writer.bytes)
                    writer.removeAll()
                }
            }
        }
        try sink.write(writer.bytes)
    }
}

/// Byte order (as `lexicographicallyPrecedes`, by memcmp).
func bytesPrecede(_ a: [UInt8], _ b: [UInt8]) -> Bool {
    let common = min(a.count, b.count)
    let order = a.withUnsafeBufferPointer { x in b.withUnsafeBufferPointer { y in common == 0 ? 0 : memcmp(x.baseAddress!, y.baseAddress!, common) } }
    return order != 0 ? order < 0 : a.count < b.count
}

extension KVStore {
    /// An O(1) copy of the state.
    public func snapshot() -> KVSnapshot { KVSnapshot(databases: databases, now: now, revision: revision) }

    /// Replaces the state with a snapshot's bytes.
    public func restore(from bytes: [UInt8]) throws {
        var reader = ByteReader(bytes)
        guard try reader.readUInt8("version") == 1 else { throw DecodingError("unknown kv snapshot version", offset: 0) }
        let restoredNow = Int64(bitPattern: try reader.readUInt64("now"))
        let restoredRevision = try reader.readUInt64("revision")
        let count = Int(try reader.readUInt8("database count"))
        guard count == Self.databaseCount else { throw DecodingError("\(count) databases", offset: 17) }
        var restored = Array(repeating: Database(), count: Self.databaseCount)
        for _ in 0..<count {
            let number = Int(try reader.readUInt8("database"))
            guard number < Self.databaseCount else { throw DecodingError("database \(number)", offset: reader.position - 1) }
            let keyCount = try reader.readUInt64("key count")
            guard keyCount <= UInt64(reader.remaining / 24) else { throw DecodingError("key count \(keyCount)", offset: reader.position - 8) }
            var database = Database()
            for _ in 0..<keyCount {
                let key = Array(try reader.readLengthPrefixed(limit: bytes.count, "key"))
                let value = Array(try reader.readLengthPrefixed(limit: bytes.count, "value"))
                let expiresAt = Int64(bitPattern: try reader.readUInt64("expiry"))
                let revision = try reader.readUInt64("revision")
                database.keys[KeyBytes(key)] = StoredValue(bytes: value, expiresAt: expiresAt, revision: revision)
                if expiresAt != 0 { database.volatile[KeyBytes(key)] = expiresAt }
            }
            restored[number] = database
        }
        guard reader.isAtEnd else { throw DecodingError("bytes after the snapshot", offset: reader.position) }
        databases = restored
        now = restoredNow
        revision = restoredRevision
    }
}
