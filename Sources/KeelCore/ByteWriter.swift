// Little-endian encoding into a growable byte array: the one way Keel lays out integers on disk
// and on the wire.

/// Appends little-endian integers and raw bytes to an array.
public struct ByteWriter: Sendable {
    /// The bytes written so far.
    public private(set) var bytes: [UInt8]

    /// Creates an empty writer with room for `capacity` bytes.
    public init(capacity: Int = 0) {
        bytes = []
        bytes.reserveCapacity(capacity)
    }

    /// The number of bytes written so far.
    public var count: Int { bytes.count }

    /// Appends one byte.
    public mutating func write(_ value: UInt8) { bytes.append(value) }

    /// Appends a 16-bit integer, little-endian.
    public mutating func write(_ value: UInt16) { writeInteger(value) }

    /// Appends a 32-bit integer, little-endian.
    public mutating func write(_ value: UInt32) { writeInteger(value) }

    /// Appends a 64-bit integer, little-endian.
    public mutating func write(_ value: UInt64) { writeInteger(value) }

    /// Appends raw bytes.
    public mutating func write(bytes other: some Collection<UInt8>) { bytes.append(contentsOf: other) }

    /// Appends a 32-bit length followed by the bytes.
    public mutating func writeLengthPrefixed(_ other: some Collection<UInt8>) {
        write(UInt32(other.count))
        bytes.append(contentsOf: other)
    }

    /// Overwrites a 32-bit integer at `offset` (for lengths and checksums filled in afterwards).
    public mutating func overwrite(_ value: UInt32, at offset: Int) {
        precondition(offset >= 0 && offset + 4 <= bytes.count, "overwrite past the end")
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { raw in
            for i in 0..<4 { bytes[offset + i] = raw[i] }
        }
    }

    /// Removes everything, keeping the capacity.
    public mutating func removeAll() { bytes.removeAll(keepingCapacity: true) }


    mutating func writeInteger<T: FixedWidthInteger>(_ value: T) {
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { bytes.append(contentsOf: $0) }
    }
}
