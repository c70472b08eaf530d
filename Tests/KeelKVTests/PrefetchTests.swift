@testable import KeelKV
import KeelCore
import Testing

@Suite("Prefetching: a batch's keys loaded into the cache before it is applied, without changing anything")
struct PrefetchTests {
    typealias Trie = HashTrie<KeyBytes, StoredValue>

    static func key(_ number: Int) -> [UInt8] { Array("key:\(number)".utf8) }

    @Test("the hash of a key's bytes read in place is the hash of the key made from them")
    func sliceHash() {
        var random = SeededRandom(seed: 5)
        for _ in 0..<500 {
            let count = Int(random.next() % 40)
            let buffer = (0..<(count + 20)).map { _ in UInt8(truncatingIfNeeded: random.next()) }
            let start = Int(random.next() % 10)
            let slice = buffer[start..<(start + count)]
            #expect(KeyBytes.hashValue(of: slice) == KeyBytes(Array(slice)).hashValue)
        }
    }

    @Test("an item slot's raw words are its key's and its value's buffers (what the hint loads)")
    func itemLayout() {
        var trie = Trie()
        let key = Self.key(1)
        let value = Array(repeating: UInt8(9), count: 100)
        trie[KeyBytes(key)] = StoredValue(bytes: value, expiresAt: 7, revision: 3)
        guard let stored = trie[KeyBytes(key)] else {
            Issue.record("the key is missing")
            return
        }
        // With one key, the root's only slot is its item.
        let (keyAddress, valueAddress) = Trie.itemAddresses(UnsafePointer(trie.root.slots))
        let storedKey = trie.map(\.key.bytes)[0]
        #expect(keyAddress == unsafeBitCast(storedKey, to: UnsafeRawPointer.self))
        #expect(valueAddress == unsafeBitCast(stored.bytes, to: UnsafeRawPointer.self))
    }

    @Test("prefetching visits each key's path to its end, and leaves the trie and its copies as they were")
    func prefetchChangesNothing() {
        var trie = Trie()
        for number in 0..<20_000 {
            trie[KeyBytes(Self.key(number))] = StoredValue(bytes: Array(repeating: UInt8(number % 251), count: 32), expiresAt: 0, revision: UInt64(number))
        }
        let copy = trie
        // Each present key's walk ends at its item (repeats included); an absent key's ends at a
        // missing bucket or at another key's item.
        let present = (0..<25_000).map { Trie.hash(KeyBytes(Self.key($0 % 20_000))) }
        var items = 0
        trie.prefetch(present) { _ in items += 1 }
        #expect(items == present.count)
        let absent = (20_000..<30_000).map { Trie.hash(KeyBytes(Self.key($0))) }
        items = 0
        trie.prefetch(absent) { _ in items += 1 }
        #expect(items < absent.count)
        trie.prefetch(present + absent)
        #expect(trie.count == 20_000)
        for number in stride(from: 0, to: 25_000, by: 7) {
            let expected = number < 20_000 ? UInt64(number) : nil
            #expect(trie[KeyBytes(Self.key(number))]?.revision == expected)
        }
        // A write after the hints leaves the copy taken before them as it was.
        trie[KeyBytes(Self.key(1))] = StoredValue(bytes: [1], expiresAt: 0, revision: 0)
        #expect(copy[KeyBytes(Self.key(1))]?.revision == 1)
    }

    @Test("each command's first argument is found where it lies: single commands and transactions; nothing for others")
    func firstArguments() {
        func found(_ bytes: [UInt8]) -> [(Int, [UInt8])] {
            var result: [(Int, [UInt8])] = []
            let record = [0xAB] + bytes
            KVEntry.forEachFirstArgument(record[1...]) { result.append(($0, Array($1))) }
            return result
        }
        let set = KVEntry.command(database: 2, name: "set", arguments: [Self.key(1), [1, 2, 3]]).encoded(now: 5)
        #expect(found(set).map(\.0) == [2] && found(set).map(\.1) == [Self.key(1)])
        let none = KVEntry.command(database: 0, name: "dbsize", arguments: []).encoded(now: 5)
        #expect(found(none).isEmpty)
        let transaction = KVEntry.transaction(
            watched: [KVEntry.WatchedKey(database: 1, key: Self.key(9), revision: 4)],
            commands: [KVEntry.QueuedCommand(database: 0, name: "incr", arguments: [Self.key(2)]),
                       KVEntry.QueuedCommand(database: 0, name: "ping", arguments: []),
                       KVEntry.QueuedCommand(database: 3, name: "set", arguments: [Self.key(3), []])]).encoded(now: 5)
        #expect(found(transaction).map(\.0) == [0, 3] && found(transaction).map(\.1) == [Self.key(2), Self.key(3)])
        var batch = KVEntry.BatchWriter(now: 5, capacity: 64)
        batch.append(database: 0, name: "set", arguments: [Self.key(4), [0]])
        batch.append(database: 0, name: "set", arguments: [Self.key(5), [0]])
        #expect(found(batch.finish()).map(\.1) == [Self.key(4), Self.key(5)])
        let expire = KVEntry.expire([ExpiredKey(database: 0, key: Self.key(6), expiresAt: 1)]).encoded(now: 5)
        #expect(found(expire).isEmpty)
        // Malformed or cut short: nothing, or what came before the cut; never a trap.
        for cut in 0..<transaction.count { _ = found(Array(transaction.prefix(cut))) }
        #expect(found([]).isEmpty && found([7, 7, 7]).isEmpty)
    }

    @Test("reads run after willRead give the same replies as without it, and change nothing")
    func willReadChangesNothing() throws {
        let store = KVStore()
        for number in 0..<2000 {
            _ = store.apply(KVEntry.command(database: 1, name: "set", arguments: [Self.key(number), Array("v\(number)".utf8)]).encoded(now: 1000))
        }
        let words: [[String]] = [["get", "key:5"], ["get", "key:99999"], ["mget", "key:1", "key:2", "nope"], ["exists", "key:3", "key:4"],
                                 ["strlen", "key:1999"], ["ttl", "key:7"], ["dbsize"], ["get", "key:5"]]
        let commands = try words.map { try KVCommand.parse($0[0], $0.dropFirst().map { Array($0.utf8) }, now: 1000) }
        let expected = commands.map { store.read($0, database: 1, now: 1000).0 }
        store.willRead(commands, database: 1)
        store.willRead(commands, database: 0)
        #expect(commands.map { store.read($0, database: 1, now: 1000).0 } == expected)
        #expect(expected[0] == .bulk(Array("v5".utf8)) && expected[1] == .bulk(nil))
        #expect(store.databases[1].keys.count == 2000 && store.databases[0].keys.isEmpty)
    }

    @Test("a batch applied after willApply gives the same replies and state as without it")
    func willApplyChangesNothing() {
        let hinted = KVStore(), plain = KVStore()
        var entries: [[UInt8]] = []
        for number in 0..<3000 {
            let key = Self.key(number % 700)
            switch number % 4 {
            case 0: entries.append(KVEntry.command(database: 0, name: "set", arguments: [key, Array("\(number)".utf8)]).encoded(now: 1000))
            case 1: entries.append(KVEntry.command(database: 1, name: "incr", arguments: [key]).encoded(now: 1000))
            case 2: entries.append(KVEntry.command(database: 0, name: "del", arguments: [key]).encoded(now: 1000))
            default:
                entries.append(KVEntry.transaction(watched: [], commands: [
                    KVEntry.QueuedCommand(database: 0, name: "append", arguments: [key, [65]]),
                    KVEntry.QueuedCommand(database: 2, name: "set", arguments: [key, [66]]),
                ]).encoded(now: 1000))
            }
        }
        for start in stride(from: 0, to: entries.count, by: 50) {
            let batch = entries[start..<min(start + 50, entries.count)]
            hinted.willApply(batch.map { $0[...] })
            for entry in batch { #expect(hinted.apply(entry) == plain.apply(entry)) }
        }
        for database in 0..<3 {
            #expect(hinted.databases[database].keys.count == plain.databases[database].keys.count)
            for (key, value) in plain.databases[database].keys { #expect(hinted.databases[database].keys[key] == value) }
        }
    }
}
