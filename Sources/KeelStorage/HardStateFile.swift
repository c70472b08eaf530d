// The hard state's safe copy beside the log.
//
// The log's hard state records carry a sequence number; the newest (highest) is the current hard
// state. Before the writer removes or cuts segments (replacing a suffix, restarting after a
// snapshot, recovery dropping a log a checkpoint outran), the current hard state might live only in
// what is about to go, so it is first written here, atomically (temporary file, fdatasync, rename,
// directory sync). Recovery takes whichever of this file and the log's records has the higher
// sequence number.
//
//   file := magic "KEELHS1\n" | sequence u64 | length u32 | state[length] | masked crc32c u32 of all before
//
// Part of the storage format: never change, add a version.

import KeelCore

enum HardStateFile {
    static let name = "hardstate"
    static let magic: [UInt8] = Array("KEELHS1\n".utf8)

    /// Writes the file atomically.
    static func write(logPath: String, sequence: UInt64, state: [UInt8], fileSystem: any FileSystem) throws(FileSystemError) {
        var writer = ByteWriter(capacity: 24 + state.count)
        writer.write(bytes: magic)
        writer.write(sequence)
        writer.writeLengthPrefixed(state)
        writer.write(CRC32C.mask(CRC32C.checksum(writer.bytes)))
        let temporary = joinPath(logPath, name + ".tmp")
        let handle = try fileSystem.open(temporary, options: [.create, .truncate])
        do {
            try fileSystem.write(handle, writer.bytes, at: 0)
            try fileSystem.synchronize(handle)
        } catch {
            fileSystem.close(handle)
            throw error
        }
        fileSystem.close(handle)
        try fileSystem.rename(temporary, to: joinPath(logPath, name))
        try fileSystem.synchronizeDirectory(logPath)
    }

    /// Reads the file: nil if there is none; an error if it is damaged.
    static func read(logPath: String, fileSystem: any FileSystem) throws(StorageError) -> (sequence: UInt64, state: [UInt8])? {
        let path = joinPath(logPath, name)
        guard fileSystem.exists(path) else { return nil }
        let bytes: [UInt8]
        do { bytes = try fileSystem.readFile(path) } catch { throw .fileSystem(error) }
        var reader = ByteReader(bytes)
        do {
            guard Array(try reader.readBytes(8)) == magic else { throw DecodingError("magic", offset: 0) }
            let sequence = try reader.readUInt64()
            let state = Array(try reader.readLengthPrefixed(limit: LogFormat.hardStateSizeMax))
            let end = reader.position
            let stored = try reader.readUInt32()
            guard reader.isAtEnd, CRC32C.mask(CRC32C.checksum(bytes[..<end])) == stored else { throw DecodingError("checksum", offset: end) }
            return (sequence, state)
        } catch {
            throw .corruption(file: path, offset: 0, reason: "the hard state file does not verify (\(error))",
                              remedy: "The log's own hard state records may still be intact; `keel inspect` shows the log.")
        }
    }

    /// Splits a hard state record's payload into its sequence number and the caller's state.
    static func split(_ payload: [UInt8]) -> (sequence: UInt64, state: [UInt8])? {
        guard payload.count >= 8 else { return nil }
        var sequence: UInt64 = 0
        for i in 0..<8 { sequence |= UInt64(payload[i]) << (8 * UInt64(i)) }
        return (sequence, Array(payload[8...]))
    }

    /// A record payload: the sequence number, then the caller's state.
    static func join(sequence: UInt64, state: [UInt8]) -> [UInt8] {
        var writer = ByteWriter(capacity: 8 + state.count)
        writer.write(sequence)
        writer.write(bytes: state)
        return writer.bytes
    }
}
