import KeelCore
import Testing

@Suite("Comparing secrets")
struct SecretsTests {
    @Test("constantTimeEquals agrees with == on equal, prefixed, shorter, longer and random byte strings")
    func agreesWithEquality() {
        var random = SeededRandom(seed: 7)
        var cases: [([UInt8], [UInt8])] = [([], []), ([], [0]), ([0], []), ([1, 2, 3], [1, 2, 3]), ([1, 2, 3], [1, 2]),
                                            ([1, 2], [1, 2, 3]), ([1, 2, 3], [1, 2, 4]), ([0, 0], [0]), (Array("s3cret".utf8), Array("s3creT".utf8))]
        for _ in 0..<2000 {
            let a = (0..<Int(random.next() % 6)).map { _ in UInt8(random.next() % 3) }
            let b = random.next() % 4 == 0 ? a : (0..<Int(random.next() % 6)).map { _ in UInt8(random.next() % 3) }
            cases.append((a, b))
        }
        for (a, b) in cases {
            #expect(constantTimeEquals(a, b) == (a == b), "\(a) against \(b)")
        }
    }
}
