import KeelCore
import Testing

@Suite("Comparing secrets")
struct SecretsTests {
    @Test("constantTimeEquals agrees with == on equal, prefixed, shorter, longer and random byte strings")
    func agreesWithEquality() {
        var random = SeededRandom(seed: 7)
        var cases: [([UInt8], [UInt8])] = [([], []), ([], [0]), ([0], []), ([1, 2, 3], [1, 2, 3]), ([1, 2, 3], [1, 2]),
                                            ([1, 2], [1, 2, 3]), ([1, 2, 3], [1, 2, 4]), ([0, 0], [0]), (Array("s3cret".utf8), Array("s3creT".utf8)),
                                            ([255], []), ([0, 255], [0])]
        for _ in 0..<2000 {
            let a = (0..<Int(random.next() % 6)).map { _ in UInt8(random.next() % 3) }
            let b = random.next() % 4 == 0 ? a : (0..<Int(random.next() % 6)).map { _ in UInt8(random.next() % 3) }
            cases.append((a, b))
        }
        for (a, b) in cases {
            #expect(constantTimeEquals(a, secret: b) == (a == b), "\(a) against \(b)")
        }
    }

    @Test("constantTimeEquals reads one presented byte per byte of the secret, whatever they hold and however many were presented")
    func workFollowsTheSecret() {
        let secret = Array("correct horse".utf8)
        for length in [0, 1, 5, secret.count - 1, secret.count, secret.count + 1, 100, 10_000] {
            for fill in [UInt8(ascii: "c"), 0, 255] {
                var bytes = Array(repeating: fill, count: length)
                if length >= secret.count { bytes.replaceSubrange(0..<secret.count, with: secret) }
                let presented = CountingBytes(bytes)
                _ = constantTimeEquals(presented, secret: secret)
                #expect(presented.reads.value == (length == 0 ? 0 : secret.count), "\(length) bytes of \(fill): \(presented.reads.value) read")
            }
        }
    }
}

/// Bytes that count how often they are read.
private struct CountingBytes: RandomAccessCollection {
    final class Counter { var value = 0 }
    let bytes: [UInt8]
    let reads = Counter()
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    var startIndex: Int { bytes.startIndex }
    var endIndex: Int { bytes.endIndex }
    subscript(position: Int) -> UInt8 {
        reads.value += 1
        return bytes[position]
    }
}
