import KeelCore
import KeelKV
import KeelStorage
import Testing

/// Applies commands to a store as log entries at a given time and returns the replies.
struct Harness {
    let store = KVStore()
    var now: Int64 = 1_000_000

    @discardableResult
    func run(_ words: String..., database: Int = 0) -> Reply {
        run(words.map { Array($0.utf8) }, database: database)
    }

    func run(_ argv: [[UInt8]], database: Int = 0) -> Reply {
        let name = String(decoding: argv[0], as: UTF8.self).lowercased()
        let arguments = Array(argv.dropFirst())
        // A read runs on the state (as a node serves it); a write is applied as a log entry.
        if let command = try? KVCommand.parse(name, arguments, now: now), !command.isWrite {
            return store.read(command, database: database, now: now).0
        }
        if let error = Result(catching: { () throws(CommandError) in try KVCommand.parse(name, arguments, now: now) }).failureMessage {
            return .error(error)
        }
        let entry = KVEntry.command(database: database, name: name, arguments: arguments).encoded(now: now)
        return Reply(decoding: store.apply(entry))
    }
}

extension Result where Failure == CommandError {
    var failureMessage: String? {
        if case .failure(let error) = self { return error.message }
        return nil
    }
}

@Suite("Key-value commands: Redis 7's semantics and replies")
struct KVStoreTests {
    @Test("SET and GET, with NX, XX, GET, KEEPTTL and the expiry options")
    func setAndGet() {
        let h = Harness()
        #expect(h.run("GET", "k") == .null)
        #expect(h.run("SET", "k", "v") == .ok)
        #expect(h.run("GET", "k") == .bulk("v"))
        #expect(h.run("SET", "k", "w", "NX") == .null)
        #expect(h.run("SET", "other", "w", "XX") == .null)
        #expect(h.run("SET", "k", "w", "XX", "GET") == .bulk("v"))
        #expect(h.run("SET", "k", "x", "EX", "10") == .ok)
        #expect(h.run("TTL", "k") == .integer(10))
        #expect(h.run("SET", "k", "y", "KEEPTTL") == .ok)
        #expect(h.run("PTTL", "k") == .integer(10_000))
        #expect(h.run("SET", "k", "z") == .ok)
        #expect(h.run("TTL", "k") == .integer(-1), "a plain SET clears the expiry")
        #expect(h.run("SET", "k", "v", "EX", "0") == .error("ERR invalid expire time in 'set' command"))
        #expect(h.run("SET", "k", "v", "NX", "XX") == .error("ERR syntax error"))
        #expect(h.run("SET", "k", "v", "EX", "10", "PX", "10") == .error("ERR syntax error"))
        #expect(h.run("SET", "k") == .error("ERR wrong number of arguments for 'set' command"))
        #expect(h.run("SETNX", "k", "v") == .integer(0))
        #expect(h.run("SETNX", "new", "v") == .integer(1))
        #expect(h.run("GETSET", "new", "w") == .bulk("v"))
        #expect(h.run("GETDEL", "new") == .bulk("w"))
        #expect(h.run("EXISTS", "new", "k", "k") == .integer(2))
    }

    @Test("the expiry index holds exactly the keys with an expiry, through SET, DEL, PERSIST and expired replacements")
    func expiryIndex() {
        var h = Harness()
        h.run("SET", "a", "1", "EX", "10")
        h.run("SET", "b", "1", "PX", "5")
        h.run("SET", "c", "1")
        #expect(h.store.volatileCount(database: 0) == 2)
        h.run("SET", "a", "2") // a plain SET drops the expiry
        #expect(h.store.volatileCount(database: 0) == 1)
        #expect(h.run("TTL", "a") == .integer(-1))
        h.now += 10 // b has expired: a plain SET replaces it, without an expiry
        h.run("SET", "b", "2")
        #expect(h.store.volatileCount(database: 0) == 0)
        #expect(h.run("GET", "b") == .bulk("2"))
        #expect(h.run("TTL", "b") == .integer(-1))
        h.run("SET", "c", "3", "EX", "100")
        #expect(h.store.volatileCount(database: 0) == 1)
        h.run("DEL", "c")
        #expect(h.store.volatileCount(database: 0) == 0)
        h.run("SET", "d", "1", "EX", "100")
        h.run("PERSIST", "d")
        #expect(h.store.volatileCount(database: 0) == 0)
        h.run("SET", "e", "1", "EX", "100")
        h.run("DEL", "e", "missing")
        #expect(h.store.volatileCount(database: 0) == 0)
        #expect(h.run("DBSIZE") == .integer(3))
    }

    @Test("keys expire at their absolute time, on every replica alike")
    func expiry() {
        var h = Harness()
        h.run("SET", "a", "1", "PX", "100")
        h.run("SETEX", "b", "1", "2")
        h.run("PSETEX", "c", "50", "3")
        #expect(h.run("DBSIZE") == .integer(3))
        h.now += 60
        #expect(h.run("GET", "c") == .null, "expired at its time")
        #expect(h.run("GET", "a") == .bulk("1"))
        #expect(h.run("TTL", "c") == .integer(-2))
        // A read reports the expired keys it met (the leader deletes them through the log), and
        // only those: a live key with an expiry and a key without one are not reported.
        h.run("SET", "plain", "p")
        let met = h.store.read(.multiGet([Array("c".utf8), Array("a".utf8), Array("plain".utf8), Array("none".utf8)]), database: 0, now: h.now).1
        #expect(met == [ExpiredKey(database: 0, key: Array("c".utf8), expiresAt: 1_000_050)])
        h.run("DEL", "plain")
        h.now += 2000
        #expect(h.run("EXISTS", "a", "b") == .integer(0))
        #expect(h.run("KEYS", "*") == .array([]))
        // Deletes through the log remove them for good.
        let entry = KVEntry.expire([ExpiredKey(database: 0, key: Array("a".utf8), expiresAt: 1_000_100)]).encoded(now: h.now)
        #expect(Reply(decoding: h.store.apply(entry)) == .integer(1))
        #expect(h.store.keyCount(database: 0) == 2)
        h.run("SET", "d", "4")
        #expect(h.run("EXPIRE", "d", "100", "NX") == .integer(1))
        #expect(h.run("EXPIRE", "d", "50", "NX") == .integer(0))
        #expect(h.run("EXPIRE", "d", "50", "GT") == .integer(0))
        #expect(h.run("EXPIRE", "d", "200", "GT") == .integer(1))
        #expect(h.run("EXPIRE", "d", "10", "LT") == .integer(1))
        #expect(h.run("TTL", "d") == .integer(10))
        #expect(h.run("PERSIST", "d") == .integer(1))
        #expect(h.run("TTL", "d") == .integer(-1))
        #expect(h.run("PEXPIREAT", "d", String(h.now - 1)) == .integer(1), "a time in the past deletes the key")
        #expect(h.run("GET", "d") == .null)
        #expect(h.run("EXPIRE", "d", "10", "NX", "XX") == .error("ERR NX and XX, GT or LT options at the same time are not compatible"))
        h.run("SET", "e", "5")
        #expect(h.run("GETEX", "e", "EX", "5") == .bulk("5"))
        #expect(h.run("TTL", "e") == .integer(5))
        #expect(h.run("GETEX", "e", "PERSIST") == .bulk("5"))
        #expect(h.run("TTL", "e") == .integer(-1))
    }

    @Test("counters: INCR family, INCRBYFLOAT, overflow and non-integers")
    func counters() {
        let h = Harness()
        #expect(h.run("INCR", "n") == .integer(1))
        #expect(h.run("INCRBY", "n", "41") == .integer(42))
        #expect(h.run("DECR", "n") == .integer(41))
        #expect(h.run("DECRBY", "n", "40") == .integer(1))
        h.run("SET", "big", String(Int64.max))
        #expect(h.run("INCR", "big") == .error("ERR increment or decrement would overflow"))
        h.run("SET", "text", "abc")
        #expect(h.run("INCR", "text") == .error("ERR value is not an integer or out of range"))
        #expect(h.run("INCRBY", "n", "1.5") == .error("ERR value is not an integer or out of range"))
        h.run("SET", "spaces", " 1")
        #expect(h.run("INCR", "spaces") == .error("ERR value is not an integer or out of range"))
        #expect(h.run("INCRBYFLOAT", "f", "10.5") == .bulk("10.5"))
        #expect(h.run("INCRBYFLOAT", "f", "0.1") == .bulk("10.6"))
        #expect(h.run("INCRBYFLOAT", "f", "-5") == .bulk("5.6"))
        #expect(h.run("INCRBYFLOAT", "g", "5.0e3") == .bulk("5000"))
        #expect(h.run("INCRBYFLOAT", "h", "0.00003") == .bulk("0.00003"))
        #expect(h.run("INCRBYFLOAT", "f", "abc") == .error("ERR value is not a valid float"))
        h.run("SET", "inf", "1e308")
        #expect(h.run("INCRBYFLOAT", "inf", "1e308") == .error("ERR increment would produce NaN or Infinity"))
    }

    @Test("strings: APPEND, STRLEN, GETRANGE, SETRANGE, MGET, MSET, MSETNX, binary-safe values")
    func strings() {
        let h = Harness()
        #expect(h.run("APPEND", "s", "Hello") == .integer(5))
        #expect(h.run("APPEND", "s", " World") == .integer(11))
        #expect(h.run("STRLEN", "s") == .integer(11))
        #expect(h.run("GETRANGE", "s", "0", "4") == .bulk("Hello"))
        #expect(h.run("GETRANGE", "s", "-5", "-1") == .bulk("World"))
        #expect(h.run("GETRANGE", "s", "5", "1") == .bulk(""))
        #expect(h.run("GETRANGE", "s", "0", "100") == .bulk("Hello World"))
        #expect(h.run("SETRANGE", "s", "6", "Redis") == .integer(11))
        #expect(h.run("GET", "s") == .bulk("Hello Redis"))
        #expect(h.run("SETRANGE", "pad", "3", "x") == .integer(4))
        #expect(h.run("GET", "pad") == .bulk([0, 0, 0, UInt8(ascii: "x")]))
        #expect(h.run("SETRANGE", "pad", "-1", "x") == .error("ERR offset is out of range"))
        #expect(h.run("MSET", "a", "1", "b", "2") == .ok)
        #expect(h.run("MGET", "a", "b", "missing") == .array([.bulk("1"), .bulk("2"), .null]))
        #expect(h.run("MSETNX", "a", "9", "c", "3") == .integer(0))
        #expect(h.run("MSETNX", "c", "3", "d", "4") == .integer(1))
        #expect(h.run("MSET", "a") == .error("ERR wrong number of arguments for 'mset' command"))
        let binary: [UInt8] = [0, 255, 13, 10, 36, 42]
        #expect(h.run([Array("SET".utf8), binary, binary]) == .ok)
        #expect(h.run([Array("GET".utf8), binary]) == .bulk(binary))
    }

    @Test("SCAN returns every key that stays through the scan once, while keys are deleted and added (scan-and-delete)")
    func scanWhileChanging() {
        let h = Harness()
        for i in 0..<1000 { h.run("SET", "stay:\(i)", "x") }
        for i in 0..<1000 { h.run("SET", "gone:\(i)", "x") }
        var cursor = "0"
        var seen: [String: Int] = [:]
        var calls = 0
        var added = 0
        repeat {
            guard case .array(let parts?) = h.run("SCAN", cursor, "COUNT", "25"), case .bulk(let next?) = parts[0], case .array(let keys?) = parts[1] else {
                Issue.record("bad SCAN reply")
                return
            }
            cursor = String(decoding: next, as: UTF8.self)
            calls += 1
            for case .bulk(let key?) in keys {
                let name = String(decoding: key, as: UTF8.self)
                seen[name, default: 0] += 1
                // Delete what is returned (the usual way to delete by pattern), and add new keys.
                if name.hasPrefix("gone:") { h.run("DEL", name) }
            }
            h.run("SET", "new:\(added)", "x")
            added += 1
        } while cursor != "0" && calls < 10_000
        #expect(calls < 10_000)
        for i in 0..<1000 {
            #expect(seen["stay:\(i)"] == 1, "stay:\(i) seen \(seen["stay:\(i)"] ?? 0) times")
            #expect(seen["gone:\(i)"] == 1, "gone:\(i) seen \(seen["gone:\(i)"] ?? 0) times")
        }
        #expect(h.run("DBSIZE") == .integer(Int64(1000 + added)))
        // The largest cursor is past every key (none hashes to 2^64 - 1 here): the scan is over.
        #expect(h.run("SCAN", "18446744073709551615") == .array([.bulk("0"), .array([])]))
        #expect(h.run("SCAN", "18446744073709551616") == .error("ERR invalid cursor"))
        #expect(h.run("SCAN", "-1") == .error("ERR invalid cursor"))
        #expect(h.run("SCAN", "+1") == .error("ERR invalid cursor"))
    }

    @Test("keyspace: DEL, TYPE, RENAME, RENAMENX, COPY, KEYS with globs, SCAN, RANDOMKEY, FLUSHDB, SELECTed databases, SWAPDB")
    func keyspace() {
        let h = Harness()
        h.run("MSET", "user:1", "a", "user:2", "b", "item:1", "c", "h?llo", "d")
        #expect(h.run("TYPE", "user:1") == .simple("string"))
        #expect(h.run("TYPE", "nope") == .simple("none"))
        let users = h.run("KEYS", "user:*")
        if case .array(let items?) = users { #expect(Set(items.map { "\($0)" }) == Set([Reply.bulk("user:1"), .bulk("user:2")].map { "\($0)" })) }
        #expect(h.run("KEYS", "h\\?llo") == .array([.bulk("h?llo")]))
        #expect(h.run("KEYS", "user:[^1]") == .array([.bulk("user:2")]))
        #expect(h.run("KEYS", "item:[0-9]") == .array([.bulk("item:1")]))
        #expect(h.run("RENAME", "nope", "x") == .error("ERR no such key"))
        #expect(h.run("RENAME", "item:1", "item:9") == .ok)
        #expect(h.run("RENAMENX", "item:9", "user:1") == .integer(0))
        #expect(h.run("COPY", "item:9", "copy") == .integer(1))
        #expect(h.run("COPY", "item:9", "copy") == .integer(0))
        #expect(h.run("COPY", "item:9", "copy", "REPLACE") == .integer(1))
        #expect(h.run("COPY", "item:9", "elsewhere", "DB", "3") == .integer(1))
        #expect(h.run("GET", "elsewhere", database: 3) == .bulk("c"))
        #expect(h.run("COPY", "item:9", "x", "DB", "16") == .error("ERR DB index is out of range"))
        // SCAN visits every key once when nothing changes.
        var cursor = "0"
        var seen: [String] = []
        repeat {
            guard case .array(let parts?) = h.run("SCAN", cursor, "COUNT", "2"), case .bulk(let next?) = parts[0], case .array(let keys?) = parts[1] else {
                Issue.record("bad SCAN reply")
                return
            }
            cursor = String(decoding: next, as: UTF8.self)
            seen += keys.compactMap { if case .bulk(let key?) = $0 { String(decoding: key, as: UTF8.self) } else { nil } }
        } while cursor != "0"
        #expect(seen.sorted() == ["copy", "h?llo", "item:9", "user:1", "user:2"])
        #expect(h.run("DEL", "copy", "nope", "user:2") == .integer(2))
        #expect(h.run("RANDOMKEY") != .null)
        #expect(h.run("SWAPDB", "0", "3") == .ok)
        #expect(h.run("GET", "elsewhere") == .bulk("c"))
        #expect(h.run("GET", "user:1", database: 3) == .bulk("a"))
        #expect(h.run("FLUSHDB", database: 3) == .ok)
        #expect(h.run("DBSIZE", database: 3) == .integer(0))
        #expect(h.run("DBSIZE") == .integer(1))
        #expect(h.run("FLUSHALL") == .ok)
        #expect(h.run("DBSIZE") == .integer(0))
        #expect(h.run("RANDOMKEY") == .null)
        #expect(h.run("SWAPDB", "0", "16") == .error("ERR DB index is out of range"))
    }

    @Test("a transaction is one entry: all its commands apply together; a changed WATCHed key aborts it")
    func transactions() {
        let h = Harness()
        h.run("SET", "balance", "10")
        let revision = h.store.currentRevision(database: 0, key: Array("balance".utf8))
        let commands = [
            KVEntry.QueuedCommand(database: 0, name: "decrby", arguments: [Array("balance".utf8), Array("3".utf8)]),
            KVEntry.QueuedCommand(database: 0, name: "incrby", arguments: [Array("other".utf8), Array("3".utf8)]),
            KVEntry.QueuedCommand(database: 0, name: "incr", arguments: [Array("balance".utf8), Array("x".utf8)]),
        ]
        let watched = [KVEntry.WatchedKey(database: 0, key: Array("balance".utf8), revision: revision)]
        let entry = KVEntry.transaction(watched: watched, commands: commands).encoded(now: h.now)
        #expect(Reply(decoding: h.store.apply(entry)) == .array([.integer(7), .integer(3), .error("ERR wrong number of arguments for 'incr' command")]))
        // The same transaction again: its watched key has changed since, so it is aborted.
        #expect(Reply(decoding: h.store.apply(entry)) == .array(nil))
        #expect(h.run("GET", "balance") == .bulk("7"))
    }

    @Test("encodedSize is the size of the encoding, which the server's transaction limit counts on")
    func encodedSizeIsExact() {
        let commands = [
            KVEntry.QueuedCommand(database: 3, name: "set", arguments: [Array("k".utf8), Array(repeating: 7, count: 300)]),
            KVEntry.QueuedCommand(database: 0, name: "dbsize", arguments: []),
        ]
        let watched = [KVEntry.WatchedKey(database: 1, key: Array("watched".utf8), revision: 9), KVEntry.WatchedKey(database: 0, key: [], revision: 0)]
        let entries: [KVEntry] = [
            .command(database: 2, name: "mset", arguments: [Array("a".utf8), Array("1".utf8), [], Array("b".utf8)]),
            .command(database: 0, name: "ping", arguments: []),
            .transaction(watched: [], commands: []),
            .transaction(watched: watched, commands: commands),
            .expire([ExpiredKey(database: 0, key: Array("gone".utf8), expiresAt: 5)]),
        ]
        for entry in entries {
            #expect(entry.encodedSize == entry.encoded(now: 1_000).count, "\(entry)")
        }
        let transaction = KVEntry.transaction(watched: watched, commands: commands)
        #expect(transaction.encodedSize == KVEntry.transactionHeaderSize + watched.reduce(0) { $0 + KVEntry.watchedKeySize($1.key) }
            + commands.reduce(0) { $0 + KVEntry.queuedCommandSize($1.name, $1.arguments) })
    }

    @Test("BatchWriter writes the bytes of a transaction without watched keys, command by command, and they decode and apply")
    func batchWriterMatchesTransaction() throws {
        var random = SeededRandom(seed: 7)
        for round in 0..<50 {
            let count = round == 0 ? 0 : Int(random.next() % 40) + 1
            let commands = (0..<count).map { index in
                KVEntry.QueuedCommand(database: Int(random.next() % 16), name: index % 3 == 0 ? "set" : "incrby",
                                      arguments: (0..<Int(random.next() % 4)).map { _ in (0..<Int(random.next() % 70)).map { _ in UInt8(truncatingIfNeeded: random.next()) } })
            }
            let now = Int64(random.next() % 1_000_000)
            var writer = KVEntry.BatchWriter(now: now, capacity: Int(random.next() % 100))
            for command in commands { writer.append(database: command.database, name: command.name, arguments: command.arguments) }
            #expect(writer.count == count)
            let written = writer.finish()
            #expect(written == KVEntry.transaction(watched: [], commands: commands).encoded(now: now))
            let (decodedNow, decoded) = try KVEntry.decode(written)
            #expect(decodedNow == now && decoded == .transaction(watched: [], commands: commands))
        }
        var writer = KVEntry.BatchWriter(now: 1_000, capacity: 0)
        writer.append(database: 0, name: "set", arguments: [Array("k".utf8), Array("v".utf8)])
        writer.append(database: 0, name: "get", arguments: [Array("k".utf8)])
        #expect(Reply(decoding: KVStore().apply(writer.finish())) == .array([.ok, .bulk("v")]))
    }

    @Test("a reply's encodedSize is the length of its encoding, for every kind, nested ones included")
    func replyEncodedSizeIsExact() {
        let replies: [Reply] = [
            .ok, .simple(""), .error("ERR x é"), .integer(-5), .double(2.5), .bulk(nil), .bulk([]), .bulk(Array(repeating: 1, count: 300)),
            .array(nil), .array([]), .array(Array(repeating: .ok, count: 16)),
            .array([.integer(1), .array([.bulk(Array("a".utf8)), .null]), .map([(.simple("k"), .array([.double(1)]))])]),
            .map([]), .map([(.bulk(Array("key".utf8)), .integer(3)), (.simple("s"), .error("E"))]),
        ]
        for reply in replies {
            #expect(reply.encodedSize == reply.encoded.count, "\(reply)")
            #expect(Reply(decoding: reply.encoded) == reply)
        }
    }

    @Test("a snapshot restores the same state, and two replicas that applied the same entries write the same bytes")
    func snapshots() throws {
        let h = Harness()
        for i in 0..<500 { h.run("SET", "key\(i)", "value\(i)", "PX", String(1000 + i)) }
        h.run("SET", "plain", "x", database: 5)
        let bytes = try encode(h.store.snapshot())
        let restored = KVStore()
        try restored.restore(from: bytes)
        #expect(try encode(restored.snapshot()) == bytes)
        #expect(restored.read(.get(Array("key7".utf8)), database: 0, now: h.now).0 == .bulk("value7"))
        #expect(restored.read(.timeToLive(Array("key7".utf8), milliseconds: true), database: 0, now: h.now).0 == .integer(1007))
        #expect(restored.read(.get(Array("plain".utf8)), database: 5, now: h.now).0 == .bulk("x"))
        #expect(restored.volatileCount(database: 0) == 500)
        // Another replica applying the same entries writes the same bytes (keys in key order,
        // whatever the hash order of its dictionary).
        let other = Harness()
        for i in 0..<500 { other.run("SET", "key\(i)", "value\(i)", "PX", String(1000 + i)) }
        other.run("SET", "plain", "x", database: 5)
        #expect(try encode(other.snapshot()) == bytes)
        var truncated = bytes
        truncated.removeLast(3)
        #expect(throws: (any Error).self) { try KVStore().restore(from: truncated) }
    }

    @Test("a checkpoint lists each database's keys in byte order (shorter first on a common prefix), whatever the dictionary's order")
    func checkpointKeyOrder() throws {
        let keys: [[UInt8]] = [[0xff], [0x01], Array("a".utf8), Array("ab".utf8), Array("b".utf8), [], [0x80, 0x00], [0x7f, 0xff],
                               Array("key10".utf8), Array("key9".utf8), Array("key1".utf8)]
        let store = KVStore()
        for key in keys.shuffled() {
            _ = store.apply(KVEntry.command(database: 0, name: "set", arguments: [key, Array("v".utf8)]).encoded(now: 1))
        }
        var reader = ByteReader(try encode(store.snapshot()))
        _ = try reader.readUInt8("version")
        _ = try reader.readUInt64("now")
        _ = try reader.readUInt64("revision")
        _ = try reader.readUInt8("databases")
        #expect(try reader.readUInt8("database") == 0)
        #expect(try reader.readUInt64("count") == UInt64(keys.count))
        var written: [[UInt8]] = []
        for _ in keys {
            written.append(Array(try reader.readLengthPrefixed(limit: 100, "key")))
            _ = try reader.readLengthPrefixed(limit: 100, "value")
            _ = try reader.readUInt64("expiry")
            _ = try reader.readUInt64("revision")
        }
        #expect(written == keys.sorted { $0.lexicographicallyPrecedes($1) })
    }

    @Test("dictionary keys: equal exactly when their bytes are, equal keys hash alike (zero bytes and prefixes included)")
    func keyBytes() {
        var random = SeededRandom(seed: 11)
        var samples: [[UInt8]] = [[], [0], [0, 0], [1], [1, 0], Array(repeating: 7, count: 40)]
        for _ in 0..<200 { samples.append((0..<Int(random.next() % 6)).map { _ in UInt8(random.next() % 2) }) }
        var hashes: [KeyBytes: [UInt8]] = [:]
        for a in samples {
            for b in samples.prefix(60) {
                #expect((KeyBytes(a) == KeyBytes(b)) == (a == b), "\(a) vs \(b)")
                if a == b { #expect(KeyBytes(a).hashValue == KeyBytes(b).hashValue) }
            }
            hashes[KeyBytes(a)] = a
        }
        #expect(hashes.count == Set(samples).count)
        for (key, bytes) in hashes { #expect(key.bytes == bytes) }
    }

    @Test("malformed log entries answer an error and change nothing")
    func malformedEntries() {
        let h = Harness()
        h.run("SET", "k", "v")
        for garbage in [[], [9], [1, 0, 0], Array(repeating: 0xff, count: 40)] as [[UInt8]] {
            #expect(Reply(decoding: h.store.apply(garbage)).isError)
        }
        #expect(h.run("GET", "k") == .bulk("v"))
        #expect(Reply(decoding: [6, 255, 255, 255, 255]).isError, "a malformed reply decodes to an error, never traps")
    }

    @Test("an entry applied where it lies in a larger buffer (a slice) does what the same entry as an array does")
    func sliceApply() {
        let byArray = Harness(), bySlice = Harness()
        let now: Int64 = 1_000_000
        let entries: [KVEntry] = [
            .command(database: 0, name: "set", arguments: [Array("k".utf8), Array(repeating: 7, count: 100)]),
            .command(database: 3, name: "incrby", arguments: [Array("n".utf8), Array("5".utf8)]),
            .command(database: 0, name: "append", arguments: [Array("k".utf8), Array("tail".utf8)]),
            .transaction(watched: [], commands: [KVEntry.QueuedCommand(database: 1, name: "set", arguments: [Array("t".utf8), Array("x".utf8)]),
                                                 KVEntry.QueuedCommand(database: 1, name: "get", arguments: [Array("t".utf8)])]),
            .expire([ExpiredKey(database: 0, key: Array("missing".utf8), expiresAt: 5)]),
        ]
        for entry in entries {
            let bytes = entry.encoded(now: now)
            // A node's record puts a header before the command: the slice starts past index 0.
            let record = Array(repeating: 0xAB, count: 25) + bytes + [0xCD]
            let slice = record[25..<(25 + bytes.count)]
            let expected = byArray.store.apply(bytes)
            #expect(bySlice.store.apply(slice) == expected, "\(entry)")
        }
        #expect(byArray.run("GET", "k") == bySlice.run("GET", "k"))
        #expect(bySlice.run("GET", "n", database: 3) == .bulk("5"))
        #expect(bySlice.run("GET", "t", database: 1) == .bulk("x"))
        // A truncated entry, as a slice, is refused as the array is.
        let truncated = entries[0].encoded(now: now).dropLast()
        #expect(Reply(decoding: bySlice.store.apply(truncated)).isError)
    }

    @Test("OK's encoding (kept, not built for every write) is the general encoding of a simple string")
    func okEncoding() {
        var writer = ByteWriter()
        writer.write(UInt8(1))
        writer.writeLengthPrefixed("OK")
        #expect(Reply.ok.encoded == writer.bytes)
        #expect(Reply.simple("OK").encoded == writer.bytes)
        #expect(Reply(decoding: Reply.ok.encoded) == .ok)
        #expect(Reply(decoding: Reply.simple("OKAY").encoded) == .simple("OKAY"))
        #expect(Reply(decoding: Reply.simple("ok").encoded) == .simple("ok"))
    }

    @Test("glob patterns as Redis matches them")
    func globs() {
        func match(_ pattern: String, _ text: String) -> Bool { globMatch(Array(pattern.utf8)[...], Array(text.utf8)[...]) }
        #expect(match("*", ""))
        #expect(match("h?llo", "hello"))
        #expect(!match("h?llo", "hllo"))
        #expect(match("h*llo", "heeeello"))
        #expect(match("h[ae]llo", "hallo"))
        #expect(!match("h[^e]llo", "hello"))
        #expect(match("h[a-b]llo", "hbllo"))
        #expect(match("a\\*b", "a*b"))
        #expect(!match("a\\*b", "axb"))
        #expect(!match(String(repeating: "*a", count: 40) + "b", String(repeating: "a", count: 60)), "pathological patterns end")
    }
}

/// The bytes a snapshot writes (through a checkpoint on a simulated disk).
func encode(_ snapshot: KVSnapshot) throws -> [UInt8] {
    let fileSystem = SimulatedFileSystem(seed: 1)
    try fileSystem.createDirectory("/c")
    let store = CheckpointStore(directory: "/c", fileSystem: fileSystem, limits: Limits())
    let file = try store.write(snapshot, metadata: CheckpointMetadata(index: LogIndex(1), term: Term(1), wallTimeMilliseconds: 0))
    guard case .success(let (_, body)) = try store.load(file) else { throw CommandError("checkpoint did not verify") }
    return body
}

extension Harness {
    func snapshot() -> KVSnapshot { store.snapshot() }
}

extension CommandError: CustomStringConvertible {
    public var description: String { message }
}
