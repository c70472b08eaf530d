// Little-endian decoding from bytes that came from outside the program (a file, a socket), so every
// read is bounds-checked and a short buffer is an error, never a trap.

/// A short or malformed buffer.
public struct DecodingError: Error, Sendable, CustomStringConvertible {
    /// What was being read.
    public var context: String
    /// Where in the buffer.
    public var offset: Int

    public init(_ context: String, offset: Int) {
        self.context = context
        self.offset = offset
    }

    public var description: String { "decoding: \(context) at offset \(offset)" }
}

/// Reads little-endian integers and byte runs from a buffer, checking every bound.
public struct ByteReader<Bytes: RandomAccessCollection<UInt8>>: Sendable where Bytes: Sendable, Bytes.Index == Int {
    // Every member is @inlinable: the reader is generic over its buffer, and unspecialized across
    // modules each byte read went through witness tables (10% of keel serve's event loop).

    /// The whole buffer.
    public let bytes: Bytes
    @usableFromInline var _position: Int
    /// The next position to read (an index into `bytes`).
    @inlinable public var position: Int { _position }

    /// Creates a reader at the start of `bytes`.
    @inlinable public init(_ bytes: Bytes) {
        self.bytes = bytes
        self._position = bytes.startIndex
    }

    /// Bytes not yet read.
    @inlinable public var remaining: Int { bytes.endIndex - position }

    /// Whether everything has been read.
    @inlinable public var isAtEnd: Bool { position == bytes.endIndex }

    /// Reads one byte.
    @inlinable public mutating func readUInt8(_ context: @autoclosure () -> String = "byte") throws(DecodingError) -> UInt8 {
        guard remaining >= 1 else { throw DecodingError(context(), offset: position - bytes.startIndex) }
        defer { _position += 1 }
        return bytes[position]
    }

    /// Reads a little-endian 16-bit integer.
    @inlinable public mutating func readUInt16(_ context: @autoclosure () -> String = "uint16") throws(DecodingError) -> UInt16 {
        try readInteger(UInt16.self, context())
    }

    /// Reads a little-endian 32-bit integer.
    @inlinable public mutating func readUInt32(_ context: @autoclosure () -> String = "uint32") throws(DecodingError) -> UInt32 {
        try readInteger(UInt32.self, context())
    }

    /// Reads a little-endian 64-bit integer.
    @inlinable public mutating func readUInt64(_ context: @autoclosure () -> String = "uint64") throws(DecodingError) -> UInt64 {
        try readInteger(UInt64.self, context())
    }

    /// Reads `count` bytes.
    @inlinable public mutating func readBytes(_ count: Int, _ context: @autoclosure () -> String = "bytes") throws(DecodingError) -> Bytes.SubSequence {
        guard count >= 0, remaining >= count else { throw DecodingError(context(), offset: position - bytes.startIndex) }
        defer { _position += count }
        return bytes[position..<(position + count)]
    }

    /// Reads a 32-bit length, then that many bytes, refusing lengths over `limit`.
    @inlinable public mutating func readLengthPrefixed(limit: Int, _ context: @autoclosure () -> String = "length-prefixed bytes") throws(DecodingError) -> Bytes.SubSequence {
        let start = position
        let length = Int(try readUInt32(context()))
        guard length <= limit else { throw DecodingError("\(context()) of \(length) bytes over the limit of \(limit)", offset: start - bytes.startIndex) }
        return try readBytes(length, context())
    }


    @inlinable mutating func readInteger<T: FixedWidthInteger>(_ type: T.Type, _ context: @autoclosure () -> String) throws(DecodingError) -> T {
        let size = MemoryLayout<T>.size
        guard remaining >= size else { throw DecodingError(context(), offset: position - bytes.startIndex) }
        var value: T = 0
        for i in 0..<size {
            value |= T(truncatingIfNeeded: bytes[position + i]) &<< (8 * i)
        }
        _position += size
        return value
    }
}
