// The log's on-disk format: segment headers and record framing. docs/formats/log.md is the
// reference; every constant here is part of the format: never change one, add a new version.
//
// A segment is a 32-byte header followed by records. A record is a 28-byte header followed by
// its payload. The record's checksum covers everything after the checksum field, payload
// included, and is masked (CRC32C.mask) before it is stored. Record type 0 is never valid, and the
// CRC of an all-zero header never matches zero, so a preallocated (zero-filled) region never
// parses as a record: the reader sees it as the end of the data.

import KeelCore

/// The kinds of record in a segment.
public enum LogRecordType: UInt8, Sendable {
    /// An entry: an operation, as opaque bytes, with its index and term.
    case entry = 1
    /// A sync marker: index 0, term 0, an 8-byte payload S meaning "bytes 0..<S of this segment
    /// were durable (fdatasync returned) before this record was written". The writer puts one at
    /// the start of a batch whenever a sync has moved S. Recovery uses it to tell damage before
    /// the synced end (corruption) from an unsynced tail that reached the disk in pieces.
    case syncMarker = 2
    /// An opaque hard state for the layer above (Raft's term, vote and commit): index 0, term 0,
    /// at most `hardStateSizeMax` bytes. The newest one in log order is the current one; the
    /// writer copies it into every new segment, and again after a suffix is replaced.
    case hardState = 3
}

/// One entry of the log: its position, the term it was written in, and its bytes.
public struct LogEntry: Sendable, Equatable {
    public var index: LogIndex
    public var term: Term
    public var payload: [UInt8]

    public init(index: LogIndex, term: Term, payload: [UInt8]) {
        self.index = index
        self.term = term
        self.payload = payload
    }
}

/// Constants and codecs of the segment format (version 1).
public enum LogFormat {
    /// "KEELSEG" and a newline: the first 8 bytes of every segment. Part of the format.
    public static let segmentMagic: [UInt8] = Array("KEELSEG\n".utf8)
    /// The segment format version this code writes and reads. Part of the format.
    public static let version: UInt32 = 1
    /// Bytes in a segment header. Part of the format.
    public static let segmentHeaderSize = 32
    /// Bytes in a record header: crc 4, length 4, type 1, flags 1, reserved 2, term 8, index 8.
    public static let recordHeaderSize = 28
    /// The extension of segment files.
    public static let segmentExtension = ".seg"

    /// The file name of the segment whose first entry is `firstIndex`: 20 zero-padded digits.
    public static func segmentName(firstIndex: LogIndex) -> String {
        let digits = String(firstIndex.rawValue)
        return String(repeating: "0", count: max(0, 20 - digits.count)) + digits + segmentExtension
    }

    /// The first index encoded in a segment file name, or nil if it is not a segment name.
    public static func firstIndex(fromSegmentName name: String) -> LogIndex? {
        guard name.hasSuffix(segmentExtension) else { return nil }
        let digits = name.dropLast(segmentExtension.count)
        guard digits.count == 20, digits.allSatisfy({ $0.isASCII && $0.isNumber }), let value = UInt64(digits),
              value > 0, value <= indexMax.rawValue else { return nil }
        return LogIndex(value)
    }

    /// Encodes a segment header.
    public static func encodeSegmentHeader(firstIndex: LogIndex) -> [UInt8] {
        var writer = ByteWriter(capacity: segmentHeaderSize)
        writer.write(bytes: segmentMagic)
        writer.write(version)
        writer.write(UInt32(segmentHeaderSize))
        writer.write(firstIndex.rawValue)
        writer.write(UInt32(0))
        writer.write(CRC32C.mask(CRC32C.checksum(writer.bytes)))
        precondition(writer.count == segmentHeaderSize)
        return writer.bytes
    }

    /// Why a segment header did not validate.
    public enum SegmentHeaderProblem: Error, Sendable, Equatable, CustomStringConvertible {
        case tooShort(Int)
        case badMagic
        case badChecksum
        case unsupportedVersion(UInt32)

        public var description: String {
            switch self {
            case .tooShort(let size): "segment header: file has only \(size) bytes"
            case .badMagic: "segment header: not a Keel log segment (bad magic)"
            case .badChecksum: "segment header: checksum mismatch"
            case .unsupportedVersion(let v): "segment header: format version \(v) is not supported (this build reads version \(version))"
            }
        }
    }

    /// Decodes a segment header, returning the first index it declares.
    public static func decodeSegmentHeader(_ bytes: ArraySlice<UInt8>) -> Result<LogIndex, SegmentHeaderProblem> {
        guard bytes.count >= segmentHeaderSize else { return .failure(.tooShort(bytes.count)) }
        let start = bytes.startIndex
        guard bytes[start..<(start + 8)].elementsEqual(segmentMagic) else { return .failure(.badMagic) }
        let stored = readUInt32(bytes, at: start + 28)
        guard CRC32C.mask(CRC32C.checksum(bytes[start..<(start + 28)])) == stored else { return .failure(.badChecksum) }
        let formatVersion = readUInt32(bytes, at: start + 8)
        guard formatVersion == version else { return .failure(.unsupportedVersion(formatVersion)) }
        return .success(LogIndex(readUInt64(bytes, at: start + 16)))
    }

    /// The bytes a record of `payloadSize` takes on disk.
    public static func recordSize(payloadSize: Int) -> Int { recordHeaderSize + payloadSize }

    /// Appends one record to `buffer`.
    public static func appendRecord(type: LogRecordType, index: LogIndex, term: Term, payload: some Collection<UInt8>, to buffer: inout [UInt8]) {
        let start = buffer.count
        var header = ByteWriter(capacity: recordHeaderSize)
        header.write(UInt32(0)) // the checksum, filled in below
        header.write(UInt32(payload.count))
        header.write(type.rawValue)
        header.write(UInt8(0))
        header.write(UInt16(0))
        header.write(term.rawValue)
        header.write(index.rawValue)
        buffer.append(contentsOf: header.bytes)
        buffer.append(contentsOf: payload)
        let crc = buffer.withUnsafeBytes { raw in
            CRC32C.checksum(UnsafeRawBufferPointer(rebasing: raw[(start + 4)...]))
        }
        let masked = CRC32C.mask(crc)
        for i in 0..<4 { buffer[start + i] = UInt8(truncatingIfNeeded: masked >> (8 * UInt32(i))) }
    }

    /// The largest index a record may carry (so that `index + 1` never overflows on bytes from disk).
    public static let indexMax = LogIndex(UInt64(1) << 62)

    /// The largest hard state record payload.
    public static let hardStateSizeMax = 4096

    /// The bytes a sync marker takes.
    public static let syncMarkerSize = recordHeaderSize + 8

    /// Appends a sync marker saying bytes `0..<syncedEnd` were durable.
    public static func appendSyncMarker(syncedEnd: Int, to buffer: inout [UInt8]) {
        var payload = ByteWriter(capacity: 8)
        payload.write(UInt64(syncedEnd))
        appendRecord(type: .syncMarker, index: .zero, term: .zero, payload: payload.bytes, to: &buffer)
    }

    /// The outcome of reading a record at an offset.
    public enum RecordRead: Sendable, Equatable {
        /// A valid record, and the offset just past it.
        case record(LogRecordType, index: LogIndex, term: Term, payload: Range<Int>, end: Int)
        /// Nothing more: the offset is at the end of the bytes, or at a zero-filled header.
        case endOfData
        /// Bytes that are not a valid record, and why.
        case invalid(String)
    }

    /// Reads the record at `offset` of `bytes`, checking its length, type and checksum.
    ///
    /// - Complexity: O(payload size).
    public static func readRecord(_ bytes: UnsafeRawBufferPointer, at offset: Int, payloadSizeMax: Int) -> RecordRead {
        let available = bytes.count - offset
        if available <= 0 { return .endOfData }
        if available < recordHeaderSize {
            let rest = UnsafeRawBufferPointer(rebasing: bytes[offset...])
            return rest.allSatisfy({ $0 == 0 }) ? .endOfData : .invalid("a partial record header (\(available) bytes)")
        }
        let header = UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + recordHeaderSize)])
        if header.allSatisfy({ $0 == 0 }) { return .endOfData }
        let stored = header.loadUnaligned(fromByteOffset: 0, as: UInt32.self).littleEndian
        let length = Int(header.loadUnaligned(fromByteOffset: 4, as: UInt32.self).littleEndian)
        let typeByte = header[8]
        guard let type = LogRecordType(rawValue: typeByte) else { return .invalid("unknown record type \(typeByte)") }
        guard header[9] == 0, header[10] == 0, header[11] == 0 else { return .invalid("reserved header bytes are not zero") }
        guard length <= payloadSizeMax else { return .invalid("record length \(length) over the limit of \(payloadSizeMax)") }
        guard length <= available - recordHeaderSize else {
            return .invalid("record length \(length) runs past the end of the file (\(available - recordHeaderSize) bytes left)")
        }
        let end = offset + recordHeaderSize + length
        let covered = UnsafeRawBufferPointer(rebasing: bytes[(offset + 4)..<end])
        guard CRC32C.mask(CRC32C.checksum(covered)) == stored else { return .invalid("checksum mismatch") }
        let term = Term(header.loadUnaligned(fromByteOffset: 12, as: UInt64.self).littleEndian)
        let index = LogIndex(header.loadUnaligned(fromByteOffset: 20, as: UInt64.self).littleEndian)
        switch type {
        case .entry:
            guard index > .zero, index <= indexMax else { return .invalid("record index \(index) out of range") }
        case .syncMarker:
            guard index == .zero, term == .zero, length == 8 else { return .invalid("malformed sync marker") }
        case .hardState:
            guard index == .zero, term == .zero, length <= hardStateSizeMax else { return .invalid("malformed hard state record") }
        }
        return .record(type, index: index, term: term, payload: (offset + recordHeaderSize)..<end, end: end)
    }

    static func readUInt32(_ bytes: ArraySlice<UInt8>, at offset: Int) -> UInt32 {
        var value: UInt32 = 0
        for i in 0..<4 { value |= UInt32(bytes[offset + i]) << (8 * UInt32(i)) }
        return value
    }

    static func readUInt64(_ bytes: ArraySlice<UInt8>, at offset: Int) -> UInt64 {
        var value: UInt64 = 0
        for i in 0..<8 { value |= UInt64(bytes[offset + i]) << (8 * UInt64(i)) }
        return value
    }
}
