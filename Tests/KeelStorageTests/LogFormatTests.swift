import KeelCore
import Testing
@testable import KeelStorage

@Suite("Log format")
struct LogFormatTests {
    func record(index: UInt64, term: UInt64 = 1, payload: [UInt8]) -> [UInt8] {
        var buffer: [UInt8] = []
        LogFormat.appendRecord(type: .entry, index: LogIndex(index), term: Term(term), payload: payload, to: &buffer)
        return buffer
    }

    @Test("a record round-trips with its index, term and payload")
    func roundTrip() {
        let encoded = record(index: 42, term: 7, payload: Array("hello".utf8))
        #expect(encoded.count == LogFormat.recordHeaderSize + 5)
        let read = encoded.withUnsafeBytes { LogFormat.readRecord($0, at: 0, payloadSizeMax: 1024) }
        guard case .record(.entry, let index, let term, let payload, let end) = read else {
            Issue.record("expected a record, got \(read)")
            return
        }
        #expect(index == LogIndex(42) && term == Term(7) && end == encoded.count)
        #expect(Array(encoded[payload]) == Array("hello".utf8))
    }

    @Test("a region of zeros never validates as a record, at any length")
    func zerosNeverValidate() {
        for length in [1, 4, 27, 28, 29, 64, 512, 4096] {
            let zeros = [UInt8](repeating: 0, count: length)
            for offset in stride(from: 0, to: length, by: 7) {
                let read = zeros.withUnsafeBytes { LogFormat.readRecord($0, at: offset, payloadSizeMax: 1 << 20) }
                #expect(read == .endOfData, "length \(length) offset \(offset)")
            }
        }
        // Zeros in the checksum and type of an otherwise plausible header do not validate either.
        var header = [UInt8](repeating: 0, count: 64)
        header[8] = 1
        let read = header.withUnsafeBytes { LogFormat.readRecord($0, at: 0, payloadSizeMax: 1 << 20) }
        guard case .invalid = read else {
            Issue.record("a zero checksum validated: \(read)")
            return
        }
    }

    @Test("flipping any single bit of a record makes it invalid")
    func everyBitFlipIsDetected() {
        let encoded = record(index: 3, term: 2, payload: Array("payload bytes".utf8))
        for position in 0..<encoded.count {
            for bit in 0..<8 {
                var damaged = encoded
                damaged[position] ^= UInt8(1 << bit)
                let read = damaged.withUnsafeBytes { LogFormat.readRecord($0, at: 0, payloadSizeMax: 1024) }
                if case .record = read { Issue.record("flip of bit \(bit) at byte \(position) went undetected") }
            }
        }
    }

    @Test("a length over the entry limit is refused without reading the payload")
    func lengthOverLimit() {
        let encoded = record(index: 1, payload: [UInt8](repeating: 9, count: 100))
        let read = encoded.withUnsafeBytes { LogFormat.readRecord($0, at: 0, payloadSizeMax: 99) }
        guard case .invalid(let reason) = read else {
            Issue.record("expected invalid, got \(read)")
            return
        }
        #expect(reason.contains("over the limit"))
    }

    @Test("segment names are 20 zero-padded digits and parse back; other names are not segments")
    func segmentNames() {
        #expect(LogFormat.segmentName(firstIndex: LogIndex(1)) == "00000000000000000001.seg")
        #expect(LogFormat.firstIndex(fromSegmentName: "00000000000000012345.seg") == LogIndex(12345))
        #expect(LogFormat.firstIndex(fromSegmentName: "12345.seg") == nil)
        #expect(LogFormat.firstIndex(fromSegmentName: "0000000000000001234x.seg") == nil)
        #expect(LogFormat.firstIndex(fromSegmentName: "00000000000000012345.tmp") == nil)
    }

    @Test("a segment header validates, and damage to it is named")
    func segmentHeader() throws {
        let header = LogFormat.encodeSegmentHeader(firstIndex: LogIndex(77))
        #expect(try LogFormat.decodeSegmentHeader(header[...]).get() == LogIndex(77))
        var damaged = header
        damaged[17] ^= 0x10
        #expect(LogFormat.decodeSegmentHeader(damaged[...]) == .failure(.badChecksum))
        var wrongMagic = header
        wrongMagic[0] = UInt8(ascii: "X")
        #expect(LogFormat.decodeSegmentHeader(wrongMagic[...]) == .failure(.badMagic))
        #expect(LogFormat.decodeSegmentHeader(header[..<10]) == .failure(.tooShort(10)))
    }
}

@Suite("Segment scanner")
struct SegmentScannerTests {
    func segment(first: UInt64, count: Int, preallocate: Int = 0) -> [UInt8] {
        var bytes = LogFormat.encodeSegmentHeader(firstIndex: LogIndex(first))
        for i in 0..<count {
            LogFormat.appendRecord(type: .entry, index: LogIndex(first + UInt64(i)), term: Term(1), payload: [UInt8](repeating: UInt8(i), count: 50), to: &bytes)
        }
        if preallocate > bytes.count { bytes += [UInt8](repeating: 0, count: preallocate - bytes.count) }
        return bytes
    }

    let name = LogFormat.segmentName(firstIndex: LogIndex(10))

    @Test("a segment followed by preallocated zeros ends clean")
    func cleanEnd() {
        let scan = SegmentScanner.scan(segment(first: 10, count: 5, preallocate: 4096), name: name, isNewest: true, limits: Limits())
        #expect(scan.ending == .clean)
        #expect(scan.recordCount == 5 && scan.lastIndex == LogIndex(14))
    }

    @Test("a half-written last record in the newest segment is a torn tail")
    func tornTail() {
        var bytes = segment(first: 10, count: 5)
        let cut = bytes.count
        var extra: [UInt8] = []
        LogFormat.appendRecord(type: .entry, index: LogIndex(15), term: Term(1), payload: [UInt8](repeating: 1, count: 200), to: &extra)
        bytes += extra.prefix(100)
        bytes += [UInt8](repeating: 0, count: 1000)
        let scan = SegmentScanner.scan(bytes, name: name, isNewest: true, limits: Limits())
        guard case .tornTail(let offset, _) = scan.ending else {
            Issue.record("expected a torn tail, got \(scan.ending)")
            return
        }
        #expect(offset == cut && scan.lastIndex == LogIndex(14))
    }

    @Test("a bad record followed by a sync marker that vouches for it is corruption")
    func corruptionBeforeTheSyncedEnd() {
        var bytes = segment(first: 10, count: 5)
        let secondRecord = LogFormat.segmentHeaderSize + LogFormat.recordHeaderSize + 50
        let syncedEnd = bytes.count
        LogFormat.appendSyncMarker(syncedEnd: syncedEnd, to: &bytes)
        LogFormat.appendRecord(type: .entry, index: LogIndex(15), term: Term(1), payload: [1, 2, 3], to: &bytes)
        bytes[secondRecord + 30] ^= 0x04
        let scan = SegmentScanner.scan(bytes, name: name, isNewest: true, limits: Limits())
        guard case .corrupt(let offset, let reason) = scan.ending else {
            Issue.record("expected corruption, got \(scan.ending)")
            return
        }
        #expect(offset == secondRecord)
        #expect(reason.contains("checksum mismatch") && reason.contains("synced"))
    }

    @Test("valid records after a bad one but past every sync marker are an unsynced tail that reached the disk out of order")
    func outOfOrderUnsyncedTail() {
        var bytes = segment(first: 10, count: 3)
        let syncedEnd = bytes.count
        LogFormat.appendSyncMarker(syncedEnd: syncedEnd, to: &bytes)
        let hole = bytes.count
        for i in 13..<20 {
            LogFormat.appendRecord(type: .entry, index: LogIndex(UInt64(i)), term: Term(1), payload: [UInt8](repeating: 7, count: 100), to: &bytes)
        }
        // The page holding records 13 and 14 never reached the disk; later ones did.
        for i in hole..<(hole + 200) { bytes[i] = 0 }
        let scan = SegmentScanner.scan(bytes, name: name, isNewest: true, limits: Limits())
        guard case .tornTail(let offset, _) = scan.ending else {
            Issue.record("expected a torn tail, got \(scan.ending)")
            return
        }
        #expect(offset == hole && scan.lastIndex == LogIndex(12) && scan.syncedEnd == syncedEnd)
    }

    @Test("any damage in a sealed segment is corruption, even at its end")
    func sealedSegmentTail() {
        var bytes = segment(first: 10, count: 5)
        bytes[bytes.count - 3] ^= 0x01
        let scan = SegmentScanner.scan(bytes, name: name, isNewest: false, limits: Limits())
        guard case .corrupt = scan.ending else {
            Issue.record("expected corruption, got \(scan.ending)")
            return
        }
    }

    @Test("a record whose index is out of sequence is corruption")
    func indexOutOfSequence() {
        var bytes = segment(first: 10, count: 2)
        LogFormat.appendRecord(type: .entry, index: LogIndex(13), term: Term(1), payload: [1], to: &bytes)
        let scan = SegmentScanner.scan(bytes, name: name, isNewest: true, limits: Limits())
        guard case .corrupt(_, let reason) = scan.ending else {
            Issue.record("expected corruption, got \(scan.ending)")
            return
        }
        #expect(reason.contains("index 13"))
    }

    @Test("a header whose first index disagrees with the file name is rejected")
    func nameMismatch() {
        let scan = SegmentScanner.scan(segment(first: 11, count: 1), name: name, isNewest: true, limits: Limits())
        guard case .badHeader = scan.ending else {
            Issue.record("expected a bad header, got \(scan.ending)")
            return
        }
    }
}
