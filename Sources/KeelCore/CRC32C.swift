// The Swift face of the CRC32C C target.

import CKeelCRC32C

/// CRC32C (Castagnoli), the checksum on every log record and checkpoint.
public enum CRC32C {
    /// The CRC32C of `bytes`, or of `bytes` after the data that produced `previous`.
    ///
    /// - Parameters:
    ///   - bytes: the data to checksum.
    ///   - previous: the CRC of the data before `bytes`, or 0 to start.
    /// - Returns: the CRC32C of everything so far.
    /// - Complexity: O(n), about 8 bytes per cycle with SSE4.2.
    public static func checksum(_ bytes: some Collection<UInt8>, extending previous: UInt32 = 0) -> UInt32 {
        let fast = bytes.withContiguousStorageIfAvailable { buffer in
            ckeel_crc32c_extend(previous, buffer.baseAddress, buffer.count)
        }
        if let fast { return fast }
        let copy = Array(bytes)
        return copy.withUnsafeBufferPointer { ckeel_crc32c_extend(previous, $0.baseAddress, $0.count) }
    }

    /// The CRC32C of raw memory.
    public static func checksum(_ buffer: UnsafeRawBufferPointer, extending previous: UInt32 = 0) -> UInt32 {
        ckeel_crc32c_extend(previous, buffer.baseAddress, buffer.count)
    }

    /// Whether the SSE4.2 instruction is in use (otherwise a table).
    public static var usesHardware: Bool { ckeel_crc32c_uses_hardware() != 0 }

    /// The table implementation alone, for tests that compare both paths.
    public static func tableChecksum(_ bytes: [UInt8], extending previous: UInt32 = 0) -> UInt32 {
        bytes.withUnsafeBufferPointer { ckeel_crc32c_extend_table(previous, $0.baseAddress, $0.count) }
    }

    /// Masks a CRC before it is stored next to the data it covers, so that a CRC of data which
    /// itself holds CRCs (a checkpoint of log records, say) does not weaken the check (LevelDB's trick).
    /// Part of the log and checkpoint formats: never change.
    @inlinable
    public static func mask(_ crc: UInt32) -> UInt32 {
        ((crc >> 15) | (crc << 17)) &+ 0xa282_ead8
    }

    /// The inverse of ``mask(_:)``.
    @inlinable
    public static func unmask(_ masked: UInt32) -> UInt32 {
        let rotated = masked &- 0xa282_ead8
        return (rotated >> 17) | (rotated << 15)
    }
}
