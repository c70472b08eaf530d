// How a state machine gets into and out of a checkpoint.
//
// The state machine hands the storage engine an immutable copy of its state (O(1) for a
// persistent collection such as `TreeDictionary`), and the engine encodes it on its own thread
// while appends continue. The copy writes its bytes into a `CheckpointSink`, which streams them to
// the file in buffered chunks with a running checksum, so the body's size need not be known in advance.

import KeelCore

/// An immutable copy of a state machine's state that can write itself into a checkpoint.
public protocol CheckpointSource: Sendable {
    /// Writes the state's bytes. Called on the checkpoint thread; must not touch the live state.
    func writeCheckpoint(to sink: inout CheckpointSink) throws(StorageError)
}

/// Where a checkpoint body goes: buffered writes to the file, with a running CRC32C.
public struct CheckpointSink {
    let fileSystem: any FileSystem
    let handle: OpenFile
    let path: String
    var buffer: [UInt8] = []
    var offset: Int
    var checksum: UInt32 = 0
    var bodySize: UInt64 = 0
    static let bufferSize = 1 << 20

    init(fileSystem: any FileSystem, handle: OpenFile, path: String, offset: Int) {
        self.fileSystem = fileSystem
        self.handle = handle
        self.path = path
        self.offset = offset
        buffer.reserveCapacity(Self.bufferSize + 4096)
    }

    /// Appends bytes to the body.
    public mutating func write(_ bytes: some Collection<UInt8>) throws(StorageError) {
        buffer.append(contentsOf: bytes)
        if buffer.count >= Self.bufferSize { try flush() }
    }

    /// Appends a little-endian 32-bit integer.
    public mutating func write(_ value: UInt32) throws(StorageError) {
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { buffer.append(contentsOf: $0) }
        if buffer.count >= Self.bufferSize { try flush() }
    }

    /// Appends a little-endian 64-bit integer.
    public mutating func write(_ value: UInt64) throws(StorageError) {
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { buffer.append(contentsOf: $0) }
        if buffer.count >= Self.bufferSize { try flush() }
    }

    /// Appends a 32-bit length and then the bytes.
    public mutating func writeLengthPrefixed(_ bytes: some Collection<UInt8>) throws(StorageError) {
        try write(UInt32(bytes.count))
        try write(bytes)
    }

    mutating func flush() throws(StorageError) {
        guard !buffer.isEmpty else { return }
        checksum = CRC32C.checksum(buffer, extending: checksum)
        do { try fileSystem.write(handle, buffer, at: offset) } catch {
            throw error.kind == .noSpace ? .noSpace(error) : .fileSystem(error)
        }
        offset += buffer.count
        bodySize += UInt64(buffer.count)
        buffer.removeAll(keepingCapacity: true)
    }
}
