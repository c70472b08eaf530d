// The checkpoint file format (docs/formats/checkpoint.md). Every constant is part of the format:
// never change one, add a new version.
//
//   header  (48 bytes): magic "KEELCKPT", version u32, header size u32, index u64, term u64,
//                       wall time (ms since 1970) i64, reserved u32, masked CRC32C of bytes 0..<44
//   body    (n bytes):  whatever the state machine wrote
//   trailer (16 bytes): body size u64, masked CRC32C of the body u32, masked CRC32C of bytes 0..<12 of the trailer
//
// The body is written as it is produced, so its size need not be known up front; the trailer
// then says how long it was. A file is valid only if the header, the trailer and the body all
// check and the sizes add up.

import KeelCore

/// The metadata of a checkpoint: the log position it covers and when it was taken.
public struct CheckpointMetadata: Sendable, Equatable, CustomStringConvertible {
    /// The index of the last entry whose effect is in the state.
    public var index: LogIndex
    /// The term of that entry.
    public var term: Term
    /// Wall-clock time when the checkpoint was taken, in milliseconds since 1970 (for operators only).
    public var wallTimeMilliseconds: Int64

    public init(index: LogIndex, term: Term, wallTimeMilliseconds: Int64) {
        self.index = index
        self.term = term
        self.wallTimeMilliseconds = wallTimeMilliseconds
    }

    public var description: String { "checkpoint at index \(index), term \(term)" }
}

/// Why a file does not validate.
public struct FormatProblem: Error, Sendable, Equatable, CustomStringConvertible {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// Constants and codecs of the checkpoint format (version 1).
public enum CheckpointFormat {
    /// The first 8 bytes of every checkpoint. Part of the format.
    public static let magic: [UInt8] = Array("KEELCKPT".utf8)
    /// The version this code writes and reads. Part of the format.
    public static let version: UInt32 = 1
    /// Bytes in the header. Part of the format.
    public static let headerSize = 48
    /// Bytes in the trailer. Part of the format.
    public static let trailerSize = 16
    /// The extension of checkpoint files.
    public static let fileExtension = ".ckpt"
    /// The extension of a checkpoint being written.
    public static let temporaryExtension = ".ckpt.tmp"

    /// The file name for a checkpoint: `<index>-<term>.ckpt`, each 20 zero-padded digits.
    public static func fileName(index: LogIndex, term: Term) -> String {
        pad(index.rawValue) + "-" + pad(term.rawValue) + fileExtension
    }

    /// The index and term in a checkpoint file name, or nil if it is not one.
    public static func parseFileName(_ name: String) -> (index: LogIndex, term: Term)? {
        guard name.hasSuffix(fileExtension) else { return nil }
        let parts = name.dropLast(fileExtension.count).split(separator: "-")
        guard parts.count == 2, parts.allSatisfy({ $0.count == 20 && $0.allSatisfy(\.isNumber) }),
              let index = UInt64(parts[0]), let term = UInt64(parts[1]) else { return nil }
        return (LogIndex(index), Term(term))
    }

    private static func pad(_ value: UInt64) -> String {
        let digits = String(value)
        return String(repeating: "0", count: max(0, 20 - digits.count)) + digits
    }

    /// Encodes a header.
    public static func encodeHeader(_ metadata: CheckpointMetadata) -> [UInt8] {
        var writer = ByteWriter(capacity: headerSize)
        writer.write(bytes: magic)
        writer.write(version)
        writer.write(UInt32(headerSize))
        writer.write(metadata.index.rawValue)
        writer.write(metadata.term.rawValue)
        writer.write(UInt64(bitPattern: metadata.wallTimeMilliseconds))
        writer.write(UInt32(0))
        writer.write(CRC32C.mask(CRC32C.checksum(writer.bytes)))
        precondition(writer.count == headerSize)
        return writer.bytes
    }

    /// Encodes a trailer.
    public static func encodeTrailer(bodySize: UInt64, bodyChecksum: UInt32) -> [UInt8] {
        var writer = ByteWriter(capacity: trailerSize)
        writer.write(bodySize)
        writer.write(CRC32C.mask(bodyChecksum))
        writer.write(CRC32C.mask(CRC32C.checksum(writer.bytes)))
        return writer.bytes
    }

    /// Decodes and checks a header.
    public static func decodeHeader(_ bytes: ArraySlice<UInt8>) -> Result<CheckpointMetadata, FormatProblem> {
        guard bytes.count >= headerSize else { return .failure(FormatProblem("the file is shorter than a checkpoint header")) }
        let start = bytes.startIndex
        guard bytes[start..<(start + 8)].elementsEqual(magic) else { return .failure(FormatProblem("not a Keel checkpoint (bad magic)")) }
        guard CRC32C.mask(CRC32C.checksum(bytes[start..<(start + 44)])) == LogFormat.readUInt32(bytes, at: start + 44) else {
            return .failure(FormatProblem("header checksum mismatch"))
        }
        let formatVersion = LogFormat.readUInt32(bytes, at: start + 8)
        guard formatVersion == version else { return .failure(FormatProblem("format version \(formatVersion) is not supported (this build reads \(version))")) }
        let index = LogIndex(LogFormat.readUInt64(bytes, at: start + 16))
        guard index <= LogFormat.indexMax else { return .failure(FormatProblem("index \(index) out of range")) }
        return .success(CheckpointMetadata(
            index: index,
            term: Term(LogFormat.readUInt64(bytes, at: start + 24)),
            wallTimeMilliseconds: Int64(bitPattern: LogFormat.readUInt64(bytes, at: start + 32))))
    }

    /// Checks a whole checkpoint file held in memory and returns its metadata and the body's range.
    ///
    /// - Complexity: O(n): the body's checksum is computed.
    public static func verify(_ bytes: [UInt8], limits: Limits) -> Result<(CheckpointMetadata, Range<Int>), FormatProblem> {
        let metadata: CheckpointMetadata
        switch decodeHeader(bytes[...]) {
        case .failure(let problem): return .failure(problem)
        case .success(let decoded): metadata = decoded
        }
        guard bytes.count >= headerSize + trailerSize else { return .failure(FormatProblem("the file is too short to hold a trailer (truncated?)")) }
        let trailer = bytes[(bytes.count - trailerSize)...]
        let t = trailer.startIndex
        guard CRC32C.mask(CRC32C.checksum(trailer[t..<(t + 12)])) == LogFormat.readUInt32(bytes[...], at: t + 12) else {
            return .failure(FormatProblem("trailer checksum mismatch (the file is truncated or damaged at its end)"))
        }
        let bodySize = LogFormat.readUInt64(bytes[...], at: t)
        guard bodySize <= UInt64(limits.checkpointSizeMax) else { return .failure(FormatProblem("body size \(bodySize) over the limit")) }
        guard Int(bodySize) == bytes.count - headerSize - trailerSize else {
            return .failure(FormatProblem("the trailer says the body has \(bodySize) bytes but the file holds \(bytes.count - headerSize - trailerSize)"))
        }
        let body = headerSize..<(headerSize + Int(bodySize))
        let checksum = bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[body])) }
        guard CRC32C.mask(checksum) == LogFormat.readUInt32(bytes[...], at: t + 8) else { return .failure(FormatProblem("body checksum mismatch")) }
        return .success((metadata, body))
    }
}
