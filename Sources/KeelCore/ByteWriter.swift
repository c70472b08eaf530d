// Little-endian encoding into a growable byte array: the one way Keel lays out integers on disk
// and on the wire.

/// Appends little-endian integers and raw bytes to an array.
public struct ByteWriter: Sendable {
    // @inlinable throughout, so callers in other modules append without a call per integer.

    @usableFromInline var _bytes: [UInt8]
    /// The bytes written so far.
    @inlinable public var bytes: [UInt8] { _bytes }

    /// Creates an empty writer with room for `capacity` bytes.
    @inlinable public init(capacity: Int = 0) {
        _bytes = []
        _bytes.reserveCapacity(capacity)
    }

    /// The number of bytes written so far.
    @inlinable public var count: Int { _bytes.count }

    /// Appends one byte.
    @inlinable public mutating func write(_ value: UInt8) { _bytes.append(value) }

    /// Appends a 16-bit integer, little-endian.
    @inlinable public mutating func write(_ value: UInt16) { writeInteger(value) }

    /// Appends a 32-bit integer, little-endian.
    @inlinable public mutating func write(_ value: UInt32) { writeInteger(value) }

    /// Appends a 64-bit integer, little-endian.
    @inlinable public mutating func write(_ value: UInt64) { writeInteger(value) }

    /// Appends raw bytes.
    @inlinable public mutating func write(bytes other: some Collection<UInt8>) { _bytes.append(contentsOf: other) }

    /// Appends a 32-bit length followed by the bytes.
    @inlinable public mutating func writeLengthPrefixed(_ other: some Collection<UInt8>) {
        write(UInt32(other.count))
        _bytes.append(contentsOf: other)
    }

    /// Appends a 32-bit length followed by the string's UTF-8 bytes, copied as one block (the
    /// generic path above walks a String's UTF-8 view byte by byte).
    @inlinable public mutating func writeLengthPrefixed(_ string: String) {
        var string = string
        string.withUTF8 { writeLengthPrefixed($0) }
    }

    /// Overwrites a 32-bit integer at `offset` (for lengths and checksums filled in afterwards).
    @inlinable public mutating func overwrite(_ value: UInt32, at offset: Int) {
        precondition(offset >= 0 && offset + 4 <= _bytes.count, "overwrite past the end")
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { raw in
            for i in 0..<4 { _bytes[offset + i] = raw[i] }
        }
    }

    /// Removes everything, keeping the capacity.
    @inlinable public mutating func removeAll() { _bytes.removeAll(keepingCapacity: true) }


    @inlinable mutating func writeInteger<T: FixedWidthInteger>(_ value: T) {
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { _bytes.append(contentsOf: $0) }
    }
}
