// Frames on a peer connection (TCP). Each frame:
//
//   length u32 (bytes after this field) | version u8 | kind u8 | crc32c u32 (masked, of the payload) | payload
//
// Kinds: 1 = hello (the first frame each side sends: cluster token and node id; a peer without the
// right token is refused), 2 = raft (a `Message` in `PeerWireFormat`). A frame over
// `PeerLimits.frameSizeMax`, an unknown version or kind, or a bad checksum is an error: the handler
// closes the connection. The decoder returns `.needMoreData` until a whole frame has arrived, so
// bytes may come in any pieces.

import KeelCore
import KeelRaft
import NIOCore

/// What a frame carries.
public enum PeerFrame: Sendable, Equatable {
    /// The first frame on a connection: who is speaking, and the cluster token it presents.
    case hello(node: NodeID, token: [UInt8])
    /// A Raft message.
    case raft(Message)
}

/// The frame layout. Part of the peer protocol: never change, add a version.
public enum PeerFrameFormat {
    /// The protocol version this build speaks.
    public static let version: UInt8 = 1
    /// Bytes before the payload: length 4, version 1, kind 1, crc 4.
    public static let headerSize = 10
    static let helloKind: UInt8 = 1
    static let raftKind: UInt8 = 2

    /// Encodes a frame.
    public static func encode(_ frame: PeerFrame) -> [UInt8] {
        let kind: UInt8
        var payload = ByteWriter()
        switch frame {
        case .hello(let node, let token):
            kind = helloKind
            payload.write(node.rawValue)
            payload.writeLengthPrefixed(token)
        case .raft(let message):
            kind = raftKind
            payload.write(bytes: PeerWireFormat.encode(message))
        }
        var writer = ByteWriter(capacity: headerSize + payload.count)
        writer.write(UInt32(payload.count + 6))
        writer.write(version)
        writer.write(kind)
        writer.write(CRC32C.mask(CRC32C.checksum(payload.bytes)))
        writer.write(bytes: payload.bytes)
        return writer.bytes
    }

    /// Decodes a frame's payload once its header has been checked.
    static func decodePayload(kind: UInt8, _ payload: [UInt8], limits: PeerLimits) throws(PeerProtocolError) -> PeerFrame {
        switch kind {
        case helloKind:
            var reader = ByteReader(payload)
            do {
                let node = NodeID(try reader.readUInt64("node id"))
                let token = Array(try reader.readLengthPrefixed(limit: limits.tokenSizeMax, "cluster token"))
                guard reader.isAtEnd else { throw PeerProtocolError("bytes after the hello") }
                guard node.rawValue != 0 else { throw PeerProtocolError("node id 0 is reserved") }
                return .hello(node: node, token: token)
            } catch let error as PeerProtocolError {
                throw error
            } catch {
                throw PeerProtocolError("malformed hello: \(error)")
            }
        case raftKind:
            return .raft(try PeerWireFormat.decode(payload, limits: limits))
        default:
            throw PeerProtocolError("unknown frame kind \(kind)")
        }
    }
}

/// Splits a byte stream into frames, checking length, version, kind and checksum.
public struct PeerFrameDecoder: ByteToMessageDecoder {
    public typealias InboundOut = PeerFrame

    let limits: PeerLimits
    /// Until the first frame (the hello) arrives, frames are limited to a hello's size, so an
    /// unauthenticated peer cannot make the node buffer a large frame.
    private var expectingHello: Bool

    public init(limits: PeerLimits = PeerLimits(), expectingHello: Bool = false) {
        self.limits = limits
        self.expectingHello = expectingHello
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let frame = try decodeFrame(&buffer) else { return .needMoreData }
        expectingHello = false
        context.fireChannelRead(wrapInboundOut(frame))
        return .continue
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        try decode(context: context, buffer: &buffer)
    }

    /// One frame from the front of `buffer`, or nil until enough bytes have arrived.
    public func decodeFrame(_ buffer: inout ByteBuffer) throws(PeerProtocolError) -> PeerFrame? {
        guard let length = buffer.getInteger(at: buffer.readerIndex, endianness: .little, as: UInt32.self) else { return nil }
        guard length >= 6 else { throw PeerProtocolError("frame length \(length) is shorter than its header") }
        let sizeMax = expectingHello ? limits.tokenSizeMax + 16 : limits.frameSizeMax
        guard Int(length) - 6 <= sizeMax else {
            throw PeerProtocolError("frame of \(Int(length) - 6) bytes, over the limit of \(sizeMax)" + (expectingHello ? " before the hello" : ""))
        }
        guard buffer.readableBytes >= 4 + Int(length) else { return nil }
        let start = buffer.readerIndex
        let version = buffer.getInteger(at: start + 4, as: UInt8.self)!
        guard version == PeerFrameFormat.version else {
            throw PeerProtocolError("peer protocol version \(version); this node speaks \(PeerFrameFormat.version)")
        }
        let kind = buffer.getInteger(at: start + 5, as: UInt8.self)!
        let stored = buffer.getInteger(at: start + 6, endianness: .little, as: UInt32.self)!
        let payload = buffer.getBytes(at: start + PeerFrameFormat.headerSize, length: Int(length) - 6)!
        guard CRC32C.mask(CRC32C.checksum(payload)) == stored else { throw PeerProtocolError("frame checksum mismatch") }
        buffer.moveReaderIndex(forwardBy: 4 + Int(length))
        return try PeerFrameFormat.decodePayload(kind: kind, payload, limits: limits)
    }
}

/// Writes frames.
public struct PeerFrameEncoder: MessageToByteEncoder {
    public typealias OutboundIn = PeerFrame

    public init() {}

    public func encode(data: PeerFrame, out: inout ByteBuffer) throws {
        out.writeBytes(PeerFrameFormat.encode(data))
    }
}
