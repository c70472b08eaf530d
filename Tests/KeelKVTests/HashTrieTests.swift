import KeelKV
import Testing

@Suite("HashTrie: the store's dictionary, ordered by hash, with O(1) copies")
struct HashTrieTests {
    typealias Trie = HashTrie<Int, Int>

    @Test("random updates and removals agree with Dictionary; copies taken along the way keep their contents")
    func agreesWithDictionary() {
        var random = SeededGenerator(seed: 42)
        var trie = Trie()
        var reference: [Int: Int] = [:]
        var copies: [(Trie, [Int: Int])] = []
        for step in 0..<60_000 {
            let key = Int.random(in: 0..<3000, using: &random)
            if Bool.random(using: &random) {
                #expect(trie.updateValue(step, forKey: key) == reference.updateValue(step, forKey: key))
            } else {
                #expect(trie.removeValue(forKey: key) == reference.removeValue(forKey: key))
            }
            #expect(trie.count == reference.count)
            if step % 6000 == 0 { copies.append((trie, reference)) }
        }
        for (key, value) in reference { #expect(trie[key] == value) }
        #expect(Dictionary(uniqueKeysWithValues: trie.map { ($0.key, $0.value) }) == reference)
        for (copy, expected) in copies {
            #expect(copy.count == expected.count)
            #expect(Dictionary(uniqueKeysWithValues: copy.map { ($0.key, $0.value) }) == expected)
        }
        // Removing everything leaves an empty trie.
        for key in reference.keys { trie[key] = nil }
        #expect(trie.isEmpty && Array(trie).isEmpty)
    }

    @Test("iteration is in hash order, and starts at any hash value")
    func hashOrderAndSeek() {
        var trie = Trie()
        for key in 0..<5000 { trie[key] = key }
        let hashes = trie.map { Trie.hash($0.key) }
        #expect(hashes.count == 5000)
        #expect(zip(hashes, hashes.dropFirst()).allSatisfy { $0 < $1 })
        for position in stride(from: 0, to: hashes.count, by: 97) {
            var exact = trie.elements(from: hashes[position])
            #expect(exact.next().map { Trie.hash($0.key) } == hashes[position])
            var after = trie.elements(from: hashes[position] &+ 1)
            #expect(after.next().map { Trie.hash($0.key) } == (position + 1 < hashes.count ? hashes[position + 1] : nil))
        }
        var fromZero = trie.elements(from: 0)
        #expect(fromZero.next().map { Trie.hash($0.key) } == hashes.first)
    }

    @Test("keys whose whole hashes are equal share a slot, and come and go like any others")
    func fullCollisions() {
        var trie = HashTrie<Colliding, Int>()
        for id in 0..<50 { trie[Colliding(id: id, hash: id % 3)] = id }
        #expect(trie.count == 50)
        for id in 0..<50 { #expect(trie[Colliding(id: id, hash: id % 3)] == id) }
        let hashes = trie.map { HashTrie<Colliding, Int>.hash($0.key) }
        #expect(zip(hashes, hashes.dropFirst()).allSatisfy { $0 <= $1 })
        for id in stride(from: 0, to: 50, by: 2) { #expect(trie.removeValue(forKey: Colliding(id: id, hash: id % 3)) == id) }
        #expect(trie.count == 25)
        #expect(Set(trie.map(\.value)) == Set(stride(from: 1, to: 50, by: 2)))
    }
}

/// A key whose hash is chosen (to force full collisions).
struct Colliding: Hashable {
    var id: Int
    var hash: Int
    static func == (a: Colliding, b: Colliding) -> Bool { a.id == b.id }
    func hash(into hasher: inout Hasher) { hasher.combine(hash) }
}

/// SplitMix64: reproducible test data.
struct SeededGenerator: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
