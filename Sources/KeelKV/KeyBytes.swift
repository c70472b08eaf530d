// A key as the store's dictionaries hold it: its bytes, hashed in one call. ([UInt8]'s own hashing
// feeds the hasher one byte at a time, a call per byte on every lookup.) The same size as the
// array it wraps.

public struct KeyBytes: Hashable, Sendable {
    public let bytes: [UInt8]

    @inlinable
    public init(_ bytes: [UInt8]) { self.bytes = bytes }

    @inlinable
    public static func == (a: KeyBytes, b: KeyBytes) -> Bool { a.bytes == b.bytes }

    @inlinable
    public func hash(into hasher: inout Hasher) {
        bytes.withUnsafeBytes { hasher.combine(bytes: $0) }
        hasher.combine(bytes.count)
    }

    /// The `hashValue` of the key these bytes make, without copying them into one.
    @inlinable
    public static func hashValue(of bytes: ArraySlice<UInt8>) -> Int {
        var hasher = Hasher()
        bytes.withUnsafeBytes { hasher.combine(bytes: $0) }
        hasher.combine(bytes.count)
        return hasher.finalize()
    }
}
