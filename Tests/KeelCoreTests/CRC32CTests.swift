import Foundation
import KeelCore
import Testing

@Suite("CRC32C")
struct CRC32CTests {
    @Test("matches the RFC 3720 (iSCSI) test vectors")
    func rfc3720Vectors() {
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(CRC32C.checksum((0..<32).map { UInt8($0) }) == 0x46DD_794E)
        #expect(CRC32C.checksum((0..<32).reversed().map { UInt8($0) }) == 0x113F_DB5C)
        let readCommand: [UInt8] = [
            0x01, 0xC0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
            0x14, 0x00, 0x00, 0x00, 0x00, 0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x14, 0x00, 0x00, 0x00, 0x18,
            0x28, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        ]
        #expect(CRC32C.checksum(readCommand) == 0xD996_3A56)
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
    }

    @Test("the table fallback gives the same result as the hardware path, at every length and alignment")
    func tableAgreesWithHardware() {
        var random = SeededRandom(seed: 7)
        for length in 0..<300 {
            let bytes = (0..<length).map { _ in UInt8.random(in: 0...255, using: &random) }
            #expect(CRC32C.tableChecksum(bytes) == CRC32C.checksum(bytes), "length \(length)")
            if length > 3 {
                let tail = Array(bytes[3...])
                #expect(CRC32C.tableChecksum(tail) == CRC32C.checksum(bytes[3...]))
            }
        }
    }

    @Test("extending a checksum piece by piece equals checksumming the whole")
    func extending() {
        let bytes = Array("the quick brown fox jumps over the lazy dog".utf8)
        for split in 0...bytes.count {
            let first = CRC32C.checksum(bytes[..<split])
            #expect(CRC32C.checksum(bytes[split...], extending: first) == CRC32C.checksum(bytes))
        }
    }

    @Test("mask and unmask are inverses, and masking changes the value")
    func masking() {
        var random = SeededRandom(seed: 1)
        for _ in 0..<1000 {
            let crc = UInt32(truncatingIfNeeded: random.next())
            #expect(CRC32C.unmask(CRC32C.mask(crc)) == crc)
            #expect(CRC32C.mask(crc) != crc)
        }
    }
}

@Suite("Binary encoding")
struct EncodingTests {
    @Test("a string is written as its UTF-8 bytes with their length, whatever its size and script")
    func strings() {
        let bridged = NSString(string: "bridged from Foundation, long enough not to be small") as String
        for text in ["", "set", "GET", "fifteen bytes!!", "sixteen bytes!!!", "ünïcödé \u{1F600}", String(repeating: "x", count: 1000), bridged] {
            var viaString = ByteWriter()
            viaString.writeLengthPrefixed(text)
            var viaBytes = ByteWriter()
            viaBytes.writeLengthPrefixed(Array(text.utf8))
            #expect(viaString.bytes == viaBytes.bytes, "\(text.prefix(20))")
        }
    }

    @Test("integers round-trip little-endian")
    func roundTrip() throws {
        var writer = ByteWriter()
        writer.write(UInt8(0xAB))
        writer.write(UInt16(0x1234))
        writer.write(UInt32(0xDEAD_BEEF))
        writer.write(UInt64(0x0102_0304_0506_0708))
        writer.writeLengthPrefixed(Array("hello".utf8))
        #expect(writer.bytes[1] == 0x34 && writer.bytes[2] == 0x12)
        var reader = ByteReader(writer.bytes)
        #expect(try reader.readUInt8() == 0xAB)
        #expect(try reader.readUInt16() == 0x1234)
        #expect(try reader.readUInt32() == 0xDEAD_BEEF)
        #expect(try reader.readUInt64() == 0x0102_0304_0506_0708)
        #expect(Array(try reader.readLengthPrefixed(limit: 10)) == Array("hello".utf8))
        #expect(reader.isAtEnd)
    }

    @Test("a short buffer is an error, not a trap")
    func shortBuffer() {
        var reader = ByteReader([UInt8(1), 2, 3])
        #expect(throws: DecodingError.self) { try reader.readUInt32() }
        var second = ByteReader([UInt8](repeating: 0xFF, count: 6))
        #expect(throws: DecodingError.self) { try second.readLengthPrefixed(limit: 1 << 30) }
    }

    @Test("a length over the limit is refused before anything is read")
    func lengthLimit() {
        var writer = ByteWriter()
        writer.writeLengthPrefixed([UInt8](repeating: 1, count: 100))
        var reader = ByteReader(writer.bytes)
        #expect(throws: DecodingError.self) { try reader.readLengthPrefixed(limit: 99) }
    }

    @Test("the seeded generator repeats its sequence for a seed and differs across seeds")
    func seededRandom() {
        var a = SeededRandom(seed: 42)
        var b = SeededRandom(seed: 42)
        var c = SeededRandom(seed: 43)
        let first = (0..<10).map { _ in a.next() }
        #expect(first == (0..<10).map { _ in b.next() })
        #expect(first != (0..<10).map { _ in c.next() })
    }
}
