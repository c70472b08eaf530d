// Reading a segment back: every record checked, and the end of the data classified.
//
// The reader must tell a torn tail from corruption (LevelDB's log reader does the same):
//
// - A sealed segment (any but the newest) was synced and trimmed to its last record before the
//   next one was created, so anything invalid in it is corruption.
// - In the newest segment, the first bad record at offset X is *corruption* if a valid sync marker
//   after it says the segment was durable past X: the damage is before the synced end. Otherwise
//   it is a *torn tail*: writes in flight at the crash, never acknowledged under fsync `always`,
//   which may have reached the disk in pieces and out of order, so valid records after X do not
//   by themselves prove corruption.
// - A newest segment whose header does not validate was being created at the crash.

import KeelCore

/// How the data in a segment ends.
public enum SegmentEnding: Sendable, Equatable {
    /// After the last record there is nothing, or only zeros (preallocated space).
    case clean
    /// Bytes after the last record that are not a record, with nothing valid after them.
    case tornTail(offset: Int, reason: String)
    /// Invalid bytes followed by valid records, an index out of sequence, or damage in a sealed segment.
    case corrupt(offset: Int, reason: String)
    /// The header did not validate.
    case badHeader(reason: String)
}

/// What reading one segment found.
public struct SegmentScan: Sendable {
    /// The file name, such as `00000000000000000001.seg`.
    public var name: String
    /// The first index, from the file name.
    public var firstIndex: LogIndex
    /// The index of the last valid record, or `firstIndex - 1` when there is none.
    public var lastIndex: LogIndex
    /// The term of the last valid record, if any.
    public var lastTerm: Term?
    /// The file's size in bytes.
    public var fileSize: Int
    /// The offset just past the last valid record (the header size when there is none).
    public var dataEnd: Int
    /// The offset of each valid record, in order.
    public var offsets: [UInt32]
    /// How the data ends.
    public var ending: SegmentEnding
    /// The largest synced end a valid sync marker declares (the header size when there is none).
    public var syncedEnd: Int
    /// The term of each valid entry, in order (parallel to `offsets`).
    public var terms: [UInt64] = []
    /// The newest hard state record's payload in the segment (sequence number, then state), if any.
    public var hardState: [UInt8]?

    /// The number of valid records.
    public var recordCount: Int { offsets.count }
}

/// Reads and checks segment files.
public enum SegmentScanner {
    /// Scans a whole segment held in memory.
    ///
    /// - Parameters:
    ///   - bytes: the file's contents.
    ///   - name: its file name (the first index comes from it and must match the header).
    ///   - isNewest: whether this is the newest segment (where a torn tail is possible).
    ///   - limits: `entrySizeMax` bounds each record.
    ///   - visit: called with each valid entry, in order, before the ending is known.
    /// - Complexity: O(n) in the file size.
    public static func scan<Failure: Error>(
        _ bytes: [UInt8],
        name: String,
        isNewest: Bool,
        limits: Limits,
        visit: (LogEntry) throws(Failure) -> Void
    ) throws(Failure) -> SegmentScan {
        let firstIndex = LogFormat.firstIndex(fromSegmentName: name) ?? LogIndex(1)
        var scan = SegmentScan(
            name: name, firstIndex: firstIndex, lastIndex: LogIndex(firstIndex.rawValue &- 1), lastTerm: nil,
            fileSize: bytes.count, dataEnd: min(bytes.count, LogFormat.segmentHeaderSize), offsets: [], ending: .clean,
            syncedEnd: min(bytes.count, LogFormat.segmentHeaderSize))
        switch LogFormat.decodeSegmentHeader(bytes[...]) {
        case .failure(let problem):
            scan.ending = .badHeader(reason: problem.description)
            return scan
        case .success(let declared):
            if declared != firstIndex {
                scan.ending = .badHeader(reason: "the header declares first index \(declared) but the file name says \(firstIndex)")
                return scan
            }
        }
        var failure: Failure?
        bytes.withUnsafeBytes { raw in
            var offset = LogFormat.segmentHeaderSize
            var expected = firstIndex
            while true {
                switch LogFormat.readRecord(raw, at: offset, payloadSizeMax: limits.entrySizeMax) {
                case .record(.syncMarker, _, _, let payload, let end):
                    let marked = Int(truncatingIfNeeded: raw.loadUnaligned(fromByteOffset: payload.lowerBound, as: UInt64.self).littleEndian)
                    guard marked >= 0, marked <= offset else {
                        scan.ending = .corrupt(offset: offset, reason: "a sync marker claims \(marked) bytes were synced before offset \(offset)")
                        return
                    }
                    scan.syncedEnd = max(scan.syncedEnd, marked)
                    scan.dataEnd = end
                    offset = end
                case .record(.hardState, _, _, let payload, let end):
                    scan.hardState = Array(raw[payload])
                    scan.dataEnd = end
                    offset = end
                case .record(.entry, let index, let term, let payload, let end):
                    guard index == expected else {
                        scan.ending = .corrupt(offset: offset, reason: "record has index \(index) where \(expected) was expected")
                        return
                    }
                    do throws(Failure) {
                        try visit(LogEntry(index: index, term: term, payload: Array(raw[payload])))
                    } catch {
                        failure = error
                        return
                    }
                    scan.offsets.append(UInt32(offset))
                    scan.terms.append(term.rawValue)
                    scan.lastIndex = index
                    scan.lastTerm = term
                    scan.dataEnd = end
                    expected = index.next
                    offset = end
                case .endOfData:
                    scan.ending = classifyTail(raw, from: offset, reason: "zeros followed by other bytes", isNewest: isNewest, limits: limits)
                    return
                case .invalid(let reason):
                    scan.ending = classifyTail(raw, from: offset, reason: reason, isNewest: isNewest, limits: limits, invalidAtStart: true)
                    return
                }
            }
        }
        if let failure { throw failure }
        return scan
    }

    /// Scans a whole segment held in memory, without visiting its entries.
    public static func scan(_ bytes: [UInt8], name: String, isNewest: Bool, limits: Limits) -> SegmentScan {
        scan(bytes, name: name, isNewest: isNewest, limits: limits) { (_: LogEntry) throws(Never) in }
    }

    /// Decides what the bytes from `offset` on are, once no record starts there.
    private static func classifyTail(
        _ raw: UnsafeRawBufferPointer, from offset: Int, reason: String, isNewest: Bool, limits: Limits,
        invalidAtStart: Bool = false
    ) -> SegmentEnding {
        let rest = UnsafeRawBufferPointer(rebasing: raw[min(offset, raw.count)...])
        if !invalidAtStart && rest.allSatisfy({ $0 == 0 }) {
            return .clean
        }
        if !isNewest {
            let after = firstValidRecord(raw, after: offset, limits: limits).map { ", and a valid record follows at offset \($0)" } ?? ""
            return .corrupt(offset: offset, reason: "\(reason) in a sealed segment (it was synced before the next segment began)\(after)")
        }
        if let marker = syncMarkerPast(offset, in: raw, limits: limits) {
            return .corrupt(offset: offset, reason: "\(reason), inside the synced part of the segment (the sync marker at offset \(marker.at) says \(marker.syncedEnd) bytes were durable)")
        }
        return .tornTail(offset: offset, reason: reason)
    }

    /// A valid sync marker after `offset` that declares the segment durable past `offset`, if any.
    static func syncMarkerPast(_ offset: Int, in raw: UnsafeRawBufferPointer, limits: Limits) -> (at: Int, syncedEnd: Int)? {
        var position = offset
        while let found = firstValidRecord(raw, after: position, limits: limits) {
            if case .record(.syncMarker, _, _, let payload, _) = LogFormat.readRecord(raw, at: found, payloadSizeMax: limits.entrySizeMax) {
                let marked = Int(truncatingIfNeeded: raw.loadUnaligned(fromByteOffset: payload.lowerBound, as: UInt64.self).littleEndian)
                if marked > offset && marked <= found { return (found, marked) }
            }
            position = found
        }
        return nil
    }

    /// The offset of the first valid record strictly after `offset`, if any.
    ///
    /// - Complexity: O(n) in the bytes after `offset`; most offsets are rejected on the type byte.
    static func firstValidRecord(_ raw: UnsafeRawBufferPointer, after offset: Int, limits: Limits) -> Int? {
        var position = offset + 1
        let typeOffset = 8
        while position + LogFormat.recordHeaderSize <= raw.count {
            let type = raw[position + typeOffset]
            if LogRecordType(rawValue: type) != nil,
               raw[position + typeOffset + 1] == 0,
               case .record = LogFormat.readRecord(raw, at: position, payloadSizeMax: limits.entrySizeMax) {
                return position
            }
            position += 1
        }
        return nil
    }
}
