// What a node adds around its state machine's commands and snapshots (part of the storage format,
// docs/formats/node.md): never change a version's layout; add a version.

import KeelCore
import KeelRaft
import KeelStorage

/// Who proposed an entry: the origin node, its run, and the request id within that run.
struct RequestTag: Equatable {
    var origin: UInt64
    var run: UInt64
    var request: UInt64
}

/// A normal entry: version 1, origin node, origin run, request id, then the command.
enum CommandRecord {
    static let headerSize = 25

    static func encode(_ tag: RequestTag, command: [UInt8]) -> [UInt8] {
        var writer = ByteWriter(capacity: headerSize + command.count)
        writer.write(UInt8(1))
        writer.write(tag.origin)
        writer.write(tag.run)
        writer.write(tag.request)
        writer.write(bytes: command)
        return writer.bytes
    }

    /// The tag and the command, or nil for an entry that is not a command (a no-op).
    static func decode(_ data: [UInt8]) -> (RequestTag, ArraySlice<UInt8>)? {
        guard data.count >= headerSize, data[0] == 1 else { return nil }
        var reader = ByteReader(data)
        guard (try? reader.readUInt8()) == 1, let origin = try? reader.readUInt64(), let run = try? reader.readUInt64(),
              let request = try? reader.readUInt64() else { return nil }
        return (RequestTag(origin: origin, run: run, request: request), data[headerSize...])
    }
}

/// The context of a configuration change: version 1, the request tag, and the member's address
/// (host length u32 and bytes, port u32; an empty host for none).
enum ChangeContext {
    static func encode(_ tag: RequestTag, address: PeerAddress?) -> [UInt8] {
        var writer = ByteWriter(capacity: 40)
        writer.write(UInt8(1))
        writer.write(tag.origin)
        writer.write(tag.run)
        writer.write(tag.request)
        writer.writeLengthPrefixed(Array((address?.host ?? "").utf8))
        writer.write(UInt32(address?.port ?? 0))
        return writer.bytes
    }

    static func decode(_ context: [UInt8]) -> (RequestTag, PeerAddress?)? {
        var reader = ByteReader(context)
        do {
            guard try reader.readUInt8() == 1 else { return nil }
            let tag = RequestTag(origin: try reader.readUInt64(), run: try reader.readUInt64(), request: try reader.readUInt64())
            let host = String(decoding: try reader.readLengthPrefixed(limit: 1024), as: UTF8.self)
            let port = Int(try reader.readUInt32())
            return (tag, host.isEmpty ? nil : PeerAddress(host: host, port: port))
        } catch {
            return nil
        }
    }
}

/// A node's snapshot state: version 1, the member addresses (count u32; id u64, host length u32
/// and bytes, port u32 each, in id order), then the state machine's bytes.
struct NodeSnapshot<Inner: CheckpointSource>: CheckpointSource {
    let addresses: [NodeID: PeerAddress]
    let inner: Inner

    func writeCheckpoint(to sink: inout CheckpointSink) throws(StorageError) {
        try sink.write(Self.encodeHeader(addresses))
        try inner.writeCheckpoint(to: &sink)
    }

    static func encodeHeader(_ addresses: [NodeID: PeerAddress]) -> [UInt8] {
        var writer = ByteWriter()
        writer.write(UInt8(1))
        writer.write(UInt32(addresses.count))
        for id in addresses.keys.sorted() {
            writer.write(id.rawValue)
            writer.writeLengthPrefixed(Array(addresses[id]!.host.utf8))
            writer.write(UInt32(addresses[id]!.port))
        }
        return writer.bytes
    }
}

enum NodeSnapshotDecoding {
    /// The addresses and the state machine's bytes of a node snapshot.
    static func decode(_ bytes: [UInt8]) throws(DecodingError) -> ([NodeID: PeerAddress], [UInt8]) {
        var reader = ByteReader(bytes)
        guard try reader.readUInt8("node snapshot version") == 1 else { throw DecodingError("unknown node snapshot version", offset: 0) }
        let count = Int(try reader.readUInt32("member count"))
        guard count <= 4096 else { throw DecodingError("\(count) members", offset: 1) }
        var addresses: [NodeID: PeerAddress] = [:]
        for _ in 0..<count {
            let id = NodeID(try reader.readUInt64("member id"))
            let host = String(decoding: try reader.readLengthPrefixed(limit: 1024, "host"), as: UTF8.self)
            addresses[id] = PeerAddress(host: host, port: Int(try reader.readUInt32("port")))
        }
        return (addresses, Array(try reader.readBytes(reader.remaining, "state")))
    }
}
