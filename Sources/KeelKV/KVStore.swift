// The key-value state machine: 16 databases of binary-safe keys and string values with absolute
// expiry times, on HashTrie (an O(1) copy for snapshots). Deterministic: time enters with
// each log entry (the proposer's clock, never going backwards here), never from a clock.
//
// Log entries (KVEntry) are a single command, a transaction (MULTI/EXEC, with its WATCHed keys),
// or deletions of expired keys found by the leader. Replies go back as `Reply.encoded`.

import KeelCore
import KeelStorage

/// A stored value.
public struct StoredValue: Sendable, Equatable {
    public var bytes: [UInt8]
    /// Unix milliseconds; 0 for none.
    public var expiresAt: Int64
    /// The store's write counter when the key was last written (WATCH compares it).
    public var revision: UInt64
}

/// One database.
public struct Database: Sendable {
    public var keys = HashTrie<KeyBytes, StoredValue>()
    /// Keys with an expiry, and when (for the leader's sweep).
    public var volatile = HashTrie<KeyBytes, Int64>()
}

/// Limits on what a command may build.
public struct KVLimits: Sendable, Equatable {
    /// The longest string value (Redis's proto-max-bulk-len, 512 MB).
    public var valueSizeMax = 512 << 20
    public init() {}
}

/// An expired key the leader should delete through the log.
public struct ExpiredKey: Sendable, Equatable {
    public var database: Int
    public var key: [UInt8]
    public var expiresAt: Int64
    public init(database: Int, key: [UInt8], expiresAt: Int64) {
        self.database = database
        self.key = key
        self.expiresAt = expiresAt
    }
}

/// A log entry of the key-value store.
public enum KVEntry: Sendable, Equatable {
    /// One command in a database.
    case command(database: Int, name: String, arguments: [[UInt8]])
    /// MULTI/EXEC: aborted (a null reply) if a watched key's revision changed.
    case transaction(watched: [WatchedKey], commands: [QueuedCommand])
    /// Deletes keys whose expiry (still this one) has passed.
    case expire([ExpiredKey])

    public struct WatchedKey: Sendable, Equatable {
        public var database: Int
        public var key: [UInt8]
        public var revision: UInt64
        public init(database: Int, key: [UInt8], revision: UInt64) {
            self.database = database
            self.key = key
            self.revision = revision
        }
    }

    public struct QueuedCommand: Sendable, Equatable {
        public var database: Int
        public var name: String
        public var arguments: [[UInt8]]
        public init(database: Int, name: String, arguments: [[UInt8]]) {
            self.database = database
            self.name = name
            self.arguments = arguments
        }
    }

    /// version u8 (1), now i64, kind u8, then the kind's fields (docs/formats/kv.md).
    public func encoded(now: Int64) -> [UInt8] {
        var writer = ByteWriter(capacity: encodedSize)
        writer.write(UInt8(1))
        writer.write(UInt64(bitPattern: now))
        func writeCommand(_ database: Int, _ name: String, _ arguments: [[UInt8]]) {
            writer.write(UInt8(database))
            writer.writeLengthPrefixed(name)
            writer.write(UInt32(arguments.count))
            for argument in arguments { writer.writeLengthPrefixed(argument) }
        }
        switch self {
        case .command(let database, let name, let arguments):
            writer.write(UInt8(1))
            writeCommand(database, name, arguments)
        case .transaction(let watched, let commands):
            writer.write(UInt8(2))
            writer.write(UInt32(watched.count))
            for key in watched {
                writer.write(UInt8(key.database))
                writer.writeLengthPrefixed(key.key)
                writer.write(key.revision)
            }
            writer.write(UInt32(commands.count))
            for command in commands { writeCommand(command.database, command.name, command.arguments) }
        case .expire(let keys):
            writer.write(UInt8(3))
            writer.write(UInt32(keys.count))
            for key in keys {
                writer.write(UInt8(key.database))
                writer.writeLengthPrefixed(key.key)
                writer.write(UInt64(bitPattern: key.expiresAt))
            }
        }
        return writer.bytes
    }

    /// Writes a transaction without watched keys (a connection's pipelined writes) one command at
    /// a time, straight into its bytes: the same bytes as `transaction(watched: [], commands:)`'s
    /// `encoded(now:)`, without the commands gathered first.
    public struct BatchWriter {
        var writer: ByteWriter
        /// The number of commands written.
        public private(set) var count = 0

        /// `capacity`: about the bytes the commands will take.
        public init(now: Int64, capacity: Int) {
            writer = ByteWriter(capacity: KVEntry.transactionHeaderSize + capacity)
            writer.write(UInt8(1))
            writer.write(UInt64(bitPattern: now))
            writer.write(UInt8(2))
            writer.write(UInt32(0))
            writer.write(UInt32(0))
        }

        public mutating func append(database: Int, name: String, arguments: [[UInt8]]) {
            writer.write(UInt8(database))
            writer.writeLengthPrefixed(name)
            writer.write(UInt32(arguments.count))
            for argument in arguments { writer.writeLengthPrefixed(argument) }
            count += 1
        }

        /// The entry's bytes.
        public consuming func finish() -> [UInt8] {
            writer.overwrite(UInt32(count), at: KVEntry.transactionHeaderSize - 4)
            return writer.bytes
        }
    }

    /// About the encoded size (the writer's first allocation).
    /// The bytes `encoded(now:)` gives (docs/formats/kv.md).
    public var encodedSize: Int {
        switch self {
        case .command(_, let name, let arguments): return 10 + Self.queuedCommandSize(name, arguments)
        case .transaction(let watched, let commands):
            return watched.reduce(Self.transactionHeaderSize) { $0 + Self.watchedKeySize($1.key) }
                + commands.reduce(0) { $0 + Self.queuedCommandSize($1.name, $1.arguments) }
        case .expire(let keys): return keys.reduce(14) { $0 + 13 + $1.key.count }
        }
    }

    /// A transaction's fixed part: version, time, kind, the watched keys' and the commands' counts.
    public static let transactionHeaderSize = 1 + 8 + 1 + 4 + 4

    /// A watched key in a transaction: database, length-prefixed key, revision.
    public static func watchedKeySize(_ key: [UInt8]) -> Int { 1 + 4 + key.count + 8 }

    /// A command (alone or queued in a transaction): database, length-prefixed name, argument
    /// count, each argument length-prefixed.
    public static func queuedCommandSize(_ name: String, _ arguments: [[UInt8]]) -> Int {
        arguments.reduce(1 + 4 + name.utf8.count + 4) { $0 + 4 + $1.count }
    }

    /// Where an entry's kind lies: after its version (u8) and time (i64).
    static let kindOffset = 9

    /// Whether these bytes are (the start of) a transaction's entry: version 1, kind 2.
    static func isTransaction(_ bytes: ArraySlice<UInt8>) -> Bool {
        bytes.count > kindOffset && bytes[bytes.startIndex] == 1 && bytes[bytes.startIndex + kindOffset] == 2
    }

    /// Calls `body` with the database and first argument of each command in an entry (one, or a
    /// transaction's), read where they lie in its bytes; nothing for other entries, or malformed ones.
    static func forEachFirstArgument(_ bytes: ArraySlice<UInt8>, _ body: (Int, ArraySlice<UInt8>) -> Void) {
        var reader = ByteReader(bytes)
        func command() -> (Int, ArraySlice<UInt8>?)? {
            guard let database = try? reader.readUInt8(), database < KVStore.databaseCount,
                  (try? reader.readLengthPrefixed(limit: 64)) != nil, let count = try? reader.readUInt32() else { return nil }
            var first: ArraySlice<UInt8>?
            for index in 0..<count {
                guard let argument = try? reader.readLengthPrefixed(limit: bytes.count) else { return nil }
                if index == 0 { first = argument }
            }
            return (Int(database), first)
        }
        guard (try? reader.readUInt8()) == 1, (try? reader.readUInt64()) != nil, let kind = try? reader.readUInt8() else { return }
        switch kind {
        case 1:
            if let (database, first) = command(), let first { body(database, first) }
        case 2:
            guard let watched = try? reader.readUInt32() else { return }
            for _ in 0..<watched {
                guard (try? reader.readUInt8()) != nil, (try? reader.readLengthPrefixed(limit: bytes.count)) != nil,
                      (try? reader.readUInt64()) != nil else { return }
            }
            guard let count = try? reader.readUInt32() else { return }
            for _ in 0..<count {
                guard let (database, first) = command() else { return }
                if let first { body(database, first) }
            }
        default:
            return
        }
    }

    /// Decodes an entry from an array or from a slice of a larger buffer (the log entry it came in).
    public static func decode<Bytes: RandomAccessCollection<UInt8> & Sendable>(_ bytes: Bytes) throws(DecodingError) -> (now: Int64, entry: KVEntry)
        where Bytes.Index == Int {
        var reader = ByteReader(bytes)
        let limit = bytes.count
        guard try reader.readUInt8("version") == 1 else { throw DecodingError("unknown entry version", offset: 0) }
        let now = Int64(bitPattern: try reader.readUInt64("now"))
        func database() throws(DecodingError) -> Int {
            let value = Int(try reader.readUInt8("database"))
            guard value < KVStore.databaseCount else { throw DecodingError("database \(value)", offset: reader.position - 1) }
            return value
        }
        func command() throws(DecodingError) -> QueuedCommand {
            let db = try database()
            let name = String(decoding: try reader.readLengthPrefixed(limit: 64, "name"), as: UTF8.self)
            let count = Int(try reader.readUInt32("argument count"))
            guard count <= reader.remaining / 4 else { throw DecodingError("argument count \(count)", offset: reader.position) }
            var arguments: [[UInt8]] = []
            arguments.reserveCapacity(count)
            for _ in 0..<count { arguments.append(Array(try reader.readLengthPrefixed(limit: limit, "argument"))) }
            return QueuedCommand(database: db, name: name, arguments: arguments)
        }
        let entry: KVEntry
        switch try reader.readUInt8("kind") {
        case 1:
            let single = try command()
            entry = .command(database: single.database, name: single.name, arguments: single.arguments)
        case 2:
            let watchCount = Int(try reader.readUInt32("watch count"))
            guard watchCount <= reader.remaining / 13 else { throw DecodingError("watch count", offset: reader.position) }
            var watched: [WatchedKey] = []
            for _ in 0..<watchCount {
                watched.append(WatchedKey(database: try database(), key: Array(try reader.readLengthPrefixed(limit: limit)), revision: try reader.readUInt64()))
            }
            let commandCount = Int(try reader.readUInt32("command count"))
            guard commandCount <= reader.remaining / 9 else { throw DecodingError("command count", offset: reader.position) }
            var commands: [QueuedCommand] = []
            commands.reserveCapacity(commandCount)
            for _ in 0..<commandCount { commands.append(try command()) }
            entry = .transaction(watched: watched, commands: commands)
        case 3:
            let count = Int(try reader.readUInt32("key count"))
            guard count <= reader.remaining / 13 else { throw DecodingError("key count", offset: reader.position) }
            var keys: [ExpiredKey] = []
            for _ in 0..<count {
                keys.append(ExpiredKey(database: try database(), key: Array(try reader.readLengthPrefixed(limit: limit)),
                                       expiresAt: Int64(bitPattern: try reader.readUInt64())))
            }
            entry = .expire(keys)
        default:
            throw DecodingError("unknown entry kind", offset: 9)
        }
        guard reader.isAtEnd else { throw DecodingError("bytes after the entry", offset: reader.position) }
        return (now, entry)
    }
}

/// The replicated key-value state.
public final class KVStore: @unchecked Sendable {
    // @unchecked Sendable: a node calls it one call at a time (on its event loop, or its apply
    // thread under the node's lock); snapshots are value copies.
    public static let databaseCount = 16
    public internal(set) var databases = Array(repeating: Database(), count: KVStore.databaseCount)
    /// The time of the newest applied entry (Unix ms); never goes backwards.
    public internal(set) var now: Int64 = 0
    /// Counts applied writes; a written key takes the counter's value as its revision.
    public internal(set) var revision: UInt64 = 0
    public var limits = KVLimits()

    public init() {}

    // MARK: - Applying log entries

    /// Applies a log entry and returns the reply's bytes. Malformed entries answer an error and
    /// change nothing (every replica does the same).
    public func apply(_ bytes: [UInt8]) -> [UInt8] { apply(bytes[...]) }

    /// `apply(_:)` for an entry that is part of a larger buffer (a node's log record), read where
    /// it lies instead of copied out first.
    public func apply(_ bytes: ArraySlice<UInt8>) -> [UInt8] {
        guard let (entryNow, entry) = try? KVEntry.decode(bytes) else {
            return Reply.error("ERR internal: malformed log entry").encoded
        }
        now = max(now, entryNow)
        switch entry {
        case .command(let database, let name, let arguments):
            return run(name, arguments, database: database).encoded
        case .transaction(let watched, let commands):
            for key in watched where currentRevision(database: key.database, key: key.key) != key.revision {
                return Reply.array(nil).encoded
            }
            prefetch(commands.compactMap { command in
                command.arguments.first.map { (command.database, HashTrie<KeyBytes, StoredValue>.hash(KeyBytes($0))) }
            })
            return Reply.array(commands.map { run($0.name, $0.arguments, database: $0.database) }).encoded
        case .expire(let keys):
            var removed: Int64 = 0
            for key in keys {
                guard let value = databases[key.database].keys[KeyBytes(key.key)], value.expiresAt == key.expiresAt, value.expiresAt <= now else { continue }
                remove(key.key, database: key.database)
                removed += 1
            }
            return Reply.integer(removed).encoded
        }
    }

    /// Starts loading into the cache the keys these entries are about to write, before they are
    /// applied in this order (see `HashTrie.prefetch`): the first argument of each command, which
    /// is the key of every write that has one (for the few without, a harmless guess). A lone
    /// transaction is left to `apply`, which prefetches a transaction's keys itself.
    public func willApply(_ entries: [ArraySlice<UInt8>]) {
        if entries.count == 1, KVEntry.isTransaction(entries[0]) { return }
        var keys: [(database: Int, hash: UInt64)] = []
        keys.reserveCapacity(entries.count)
        for entry in entries {
            KVEntry.forEachFirstArgument(entry) { database, key in
                keys.append((database, UInt64(bitPattern: Int64(KeyBytes.hashValue(of: key)))))
            }
        }
        prefetch(keys)
    }

    /// Starts loading into the cache the keys these read commands (a pipelined burst, about to
    /// be run in this order on `database`) will look up (see `willApply`).
    public func willRead(_ commands: [KVCommand], database: Int) {
        guard commands.count > 1 else { return }
        var hashes: [UInt64] = []
        hashes.reserveCapacity(commands.count)
        for command in commands {
            for key in command.keys { hashes.append(HashTrie<KeyBytes, StoredValue>.hash(KeyBytes(key))) }
        }
        databases[database].keys.prefetch(hashes)
    }

    private func prefetch(_ keys: [(database: Int, hash: UInt64)]) {
        guard keys.count > 1, let first = keys.first?.database else { return }
        if keys.allSatisfy({ $0.database == first }) {
            databases[first].keys.prefetch(keys.map(\.hash))
        } else {
            for database in Set(keys.map(\.database)) {
                databases[database].keys.prefetch(keys.filter { $0.database == database }.map(\.hash))
            }
        }
    }

    private func run(_ name: String, _ arguments: [[UInt8]], database: Int) -> Reply {
        do {
            let command = try KVCommand.parse(name, arguments, now: now)
            return execute(command, database: database, now: now, writing: true)
        } catch {
            return .error(error.message)
        }
    }

    /// The revision WATCH records for a key: 0 when it does not exist (or has expired).
    public func currentRevision(database: Int, key: [UInt8]) -> UInt64 {
        guard let value = databases[database].keys[KeyBytes(key)], !isExpired(value, now) else { return 0 }
        return value.revision
    }

    // MARK: - Reads

    /// Runs a read-only command at `now` (the reader's clock) without changing anything; also
    /// returns the expired keys it met, for the leader to delete through the log.
    public func read(_ command: KVCommand, database: Int, now: Int64) -> (Reply, [ExpiredKey]) {
        precondition(!command.isWrite, "reads only")
        var met: [ExpiredKey] = []
        // Only a key with an expiry can have expired: with none in the database (the usual case)
        // there is nothing to look up twice.
        if !databases[database].volatile.isEmpty {
            for key in command.keys {
                if let value = databases[database].keys[KeyBytes(key)], isExpired(value, now) {
                    met.append(ExpiredKey(database: database, key: key, expiresAt: value.expiresAt))
                }
            }
        }
        return (execute(command, database: database, now: now, writing: false), met)
    }

    /// Up to `limit` expired keys, sampled from a random place in each database's expiry index.
    public func sampleExpired(now: Int64, limit: Int, random: inout some RandomNumberGenerator) -> [ExpiredKey] {
        var found: [ExpiredKey] = []
        for database in 0..<Self.databaseCount where !databases[database].volatile.isEmpty {
            let volatile = databases[database].volatile
            var keys = volatile.elements(from: random.next())
            for _ in 0..<min(volatile.count, limit * 5) {
                // From a random hash on, round to the start.
                guard let (key, at) = keys.next() ?? { keys = volatile.makeIterator(); return keys.next() }() else { break }
                if at <= now { found.append(ExpiredKey(database: database, key: key.bytes, expiresAt: at)) }
                if found.count >= limit { return found }
            }
        }
        return found
    }

    /// A digest of the whole state (every key, value, expiry and revision, and the store's clock
    /// and write counter) that does not depend on the dictionaries' order: replicas at the same
    /// applied index have the same digest. O(n); for `KEEL.STATEHASH` and `keel torture`.
    public func stateDigest() -> UInt64 {
        func mix(_ hash: inout UInt64, _ bytes: some Sequence<UInt8>) {
            for byte in bytes { hash = (hash ^ UInt64(byte)) &* 0x100_0000_01b3 }
        }
        func mix(_ hash: inout UInt64, _ value: UInt64) {
            withUnsafeBytes(of: value.littleEndian) { mix(&hash, $0) }
        }
        var sum: UInt64 = 0
        for database in 0..<Self.databaseCount {
            for (key, value) in databases[database].keys {
                var hash: UInt64 = 0xcbf2_9ce4_8422_2325
                mix(&hash, UInt64(database))
                mix(&hash, UInt64(key.bytes.count))
                mix(&hash, key.bytes)
                mix(&hash, UInt64(value.bytes.count))
                mix(&hash, value.bytes)
                mix(&hash, UInt64(bitPattern: value.expiresAt))
                mix(&hash, value.revision)
                sum &+= hash
            }
        }
        var total: UInt64 = 0xcbf2_9ce4_8422_2325
        mix(&total, sum)
        mix(&total, UInt64(bitPattern: now))
        mix(&total, revision)
        return total
    }

    /// Keys (not expired at `now`) in a database.
    public func keyCount(database: Int) -> Int { databases[database].keys.count }
    public func volatileCount(database: Int) -> Int { databases[database].volatile.count }

    // MARK: - Commands

    func isExpired(_ value: StoredValue, _ now: Int64) -> Bool { value.expiresAt != 0 && value.expiresAt <= now }

    /// The live value of a key; when writing, an expired one is removed first (deterministically:
    /// `now` is the entry's time).
    private func lookup(_ key: [UInt8], _ database: Int, _ now: Int64, _ writing: Bool) -> StoredValue? {
        guard let value = databases[database].keys[KeyBytes(key)] else { return nil }
        if isExpired(value, now) {
            if writing { remove(key, database: database) }
            return nil
        }
        return value
    }

    // `store` and `remove` walk each dictionary once; the expiry index is touched only when the
    // key has or had an expiry (a key is in `volatile` exactly when its expiry is not 0).
    private func store(_ key: [UInt8], _ bytes: [UInt8], expiresAt: Int64, database: Int) {
        revision += 1
        let key = KeyBytes(key)
        let old = databases[database].keys.updateValue(StoredValue(bytes: bytes, expiresAt: expiresAt, revision: revision), forKey: key)
        if expiresAt != 0 {
            databases[database].volatile[key] = expiresAt
        } else if let old, old.expiresAt != 0 {
            databases[database].volatile[key] = nil
        }
    }

    @discardableResult
    private func remove(_ key: [UInt8], database: Int) -> Bool {
        let key = KeyBytes(key)
        guard let old = databases[database].keys.removeValue(forKey: key) else { return false }
        if old.expiresAt != 0 { databases[database].volatile[key] = nil }
        revision += 1
        return true
    }

    private func tooLarge(_ size: Int) -> Bool { size > limits.valueSizeMax }

    func execute(_ command: KVCommand, database db: Int, now: Int64, writing: Bool) -> Reply {
        func get(_ key: [UInt8]) -> StoredValue? { lookup(key, db, now, writing) }
        switch command {
        case .get(let key):
            return .bulk(get(key)?.bytes)
        case .set(let key, let value, let condition, let expiry, let reply):
            if condition == .always, expiry == .none, reply == .ok {
                // A plain SET needs nothing of the old value (an expired one is replaced all the same).
                store(key, value, expiresAt: 0, database: db)
                return .ok
            }
            let old = get(key)
            let allowed = condition == .always || (condition == .ifAbsent) == (old == nil)
            if allowed {
                let expiresAt: Int64
                switch expiry {
                case .none: expiresAt = 0
                case .keep: expiresAt = old?.expiresAt ?? 0
                case .at(let at): expiresAt = at
                }
                if expiresAt != 0, expiresAt <= now {
                    // Already expired (an absolute time in the past): the key is gone.
                    remove(key, database: db)
                } else {
                    store(key, value, expiresAt: expiresAt, database: db)
                }
            }
            switch reply {
            case .ok: return allowed ? .ok : .null
            case .integer: return .integer(allowed ? 1 : 0)
            case .oldValue: return .bulk(old?.bytes)
            }
        case .getDelete(let key):
            guard let old = get(key) else { return .null }
            remove(key, database: db)
            return .bulk(old.bytes)
        case .getExpire(let key, let expiry):
            guard let old = get(key) else { return .null }
            if let expiry {
                switch expiry {
                case .none, .keep: store(key, old.bytes, expiresAt: 0, database: db)
                case .at(let at):
                    if at <= now { remove(key, database: db) } else { store(key, old.bytes, expiresAt: at, database: db) }
                }
            }
            return .bulk(old.bytes)
        case .delete(let keys):
            var count: Int64 = 0
            for key in keys where get(key) != nil {
                remove(key, database: db)
                count += 1
            }
            return .integer(count)
        case .exists(let keys):
            return .integer(Int64(keys.filter { get($0) != nil }.count))
        case .incrementBy(let key, let delta):
            let old = get(key)
            let current: Int64
            if let old {
                guard let parsed = parseInteger(old.bytes) else { return .error("ERR value is not an integer or out of range") }
                current = parsed
            } else {
                current = 0
            }
            let (sum, overflow) = current.addingReportingOverflow(delta)
            guard !overflow else { return .error("ERR increment or decrement would overflow") }
            store(key, Array(String(sum).utf8), expiresAt: old?.expiresAt ?? 0, database: db)
            return .integer(sum)
        case .incrementByFloat(let key, let delta):
            let old = get(key)
            var current = 0.0
            if let old {
                guard let parsed = parseFloat(old.bytes) else { return .error("ERR value is not a valid float") }
                current = parsed
            }
            let sum = current + delta
            guard sum.isFinite else { return .error("ERR increment would produce NaN or Infinity") }
            let text = Array(formatFloat(sum).utf8)
            store(key, text, expiresAt: old?.expiresAt ?? 0, database: db)
            return .bulk(text)
        case .append(let key, let suffix):
            let old = get(key)
            let size = (old?.bytes.count ?? 0) + suffix.count
            guard !tooLarge(size) else { return .error("ERR string exceeds maximum allowed size (proto-max-bulk-len)") }
            store(key, (old?.bytes ?? []) + suffix, expiresAt: old?.expiresAt ?? 0, database: db)
            return .integer(Int64(size))
        case .length(let key):
            return .integer(Int64(get(key)?.bytes.count ?? 0))
        case .getRange(let key, var start, var end):
            guard let bytes = get(key)?.bytes, !bytes.isEmpty else { return .bulk([]) }
            let count = Int64(bytes.count)
            if start < 0 && end < 0 && start > end { return .bulk([]) }
            if start < 0 { start = max(0, count + start) }
            if end < 0 { end = max(0, count + end) }
            end = min(end, count - 1)
            guard start <= end, start < count else { return .bulk([]) }
            return .bulk(Array(bytes[Int(start)...Int(end)]))
        case .setRange(let key, let offset, let patch):
            let old = get(key)
            if patch.isEmpty { return .integer(Int64(old?.bytes.count ?? 0)) }
            guard !tooLarge(offset + patch.count) else { return .error("ERR string exceeds maximum allowed size (proto-max-bulk-len)") }
            var bytes = old?.bytes ?? []
            if bytes.count < offset + patch.count { bytes += [UInt8](repeating: 0, count: offset + patch.count - bytes.count) }
            bytes.replaceSubrange(offset..<(offset + patch.count), with: patch)
            store(key, bytes, expiresAt: old?.expiresAt ?? 0, database: db)
            return .integer(Int64(bytes.count))
        case .multiGet(let keys):
            return .array(keys.map { .bulk(get($0)?.bytes) })
        case .multiSet(let pairs, let onlyIfNoneExist):
            if onlyIfNoneExist, pairs.contains(where: { get($0.key) != nil }) { return .integer(0) }
            for pair in pairs { store(pair.key, pair.value, expiresAt: 0, database: db) }
            return onlyIfNoneExist ? .integer(1) : .ok
        case .expire(let key, let at, let condition):
            guard let old = get(key) else { return .integer(0) }
            let current = old.expiresAt
            switch condition {
            case .always: break
            case .ifNone: if current != 0 { return .integer(0) }
            case .ifSome: if current == 0 { return .integer(0) }
            case .ifGreater: if current == 0 || at <= current { return .integer(0) }
            case .ifLess: if current != 0 && at >= current { return .integer(0) }
            }
            if at <= now {
                remove(key, database: db)
            } else {
                store(key, old.bytes, expiresAt: at, database: db)
            }
            return .integer(1)
        case .timeToLive(let key, let milliseconds):
            guard let value = get(key) else { return .integer(-2) }
            guard value.expiresAt != 0 else { return .integer(-1) }
            let left = value.expiresAt - now
            return .integer(milliseconds ? left : (left + 500) / 1000)
        case .persist(let key):
            guard let old = get(key), old.expiresAt != 0 else { return .integer(0) }
            store(key, old.bytes, expiresAt: 0, database: db)
            return .integer(1)
        case .type(let key):
            return .simple(get(key) == nil ? "none" : "string")
        case .rename(let source, let target, let onlyIfAbsent):
            guard let value = get(source) else { return .error("ERR no such key") }
            if source == target { return onlyIfAbsent ? .integer(0) : .ok }
            if onlyIfAbsent, get(target) != nil { return .integer(0) }
            remove(source, database: db)
            store(target, value.bytes, expiresAt: value.expiresAt, database: db)
            return onlyIfAbsent ? .integer(1) : .ok
        case .copy(let source, let target, let database, let replace):
            let targetDatabase = database ?? db
            guard let value = get(source) else { return .integer(0) }
            if source == target, targetDatabase == db { return .error("ERR source and destination objects are the same") }
            if !replace, lookup(target, targetDatabase, now, writing) != nil { return .integer(0) }
            store(target, value.bytes, expiresAt: value.expiresAt, database: targetDatabase)
            return .integer(1)
        case .keys(let pattern):
            var found: [Reply] = []
            let matchAll = pattern == [UInt8(ascii: "*")]
            for (key, value) in databases[db].keys where !isExpired(value, now) && (matchAll || globMatch(pattern[...], key.bytes[...])) {
                found.append(.bulk(key.bytes))
            }
            return .array(found)
        case .scan(let cursor, let match, let count, let type):
            // The cursor is a hash value: the keys are walked in hash order from it, so a key that
            // stays in the database through a whole scan is returned once, whatever else changes.
            // Keys with one hash are returned together (COUNT is a hint, as in Redis).
            var keys = databases[db].keys.elements(from: cursor)
            var found: [Reply] = []
            var visited = 0
            var lastHash: UInt64?
            while let (key, value) = keys.next() {
                let hash = HashTrie<KeyBytes, StoredValue>.hash(key)
                if visited >= count, hash != lastHash { return .array([.bulk(String(hash)), .array(found)]) }
                lastHash = hash
                visited += 1
                if !isExpired(value, now), match.map({ globMatch($0[...], key.bytes[...]) }) ?? true, type == nil || type == "string" {
                    found.append(.bulk(key.bytes))
                }
            }
            return .array([.bulk("0"), .array(found)])
        case .databaseSize:
            return .integer(Int64(databases[db].keys.count))
        case .randomKey:
            let keys = databases[db].keys
            guard !keys.isEmpty else { return .null }
            for _ in 0..<100 {
                // The first key from a random hash on (round to the start).
                var from = keys.elements(from: UInt64.random(in: .min ... .max))
                var start = keys.makeIterator()
                guard let (key, value) = from.next() ?? start.next() else { break }
                if !isExpired(value, now) { return .bulk(key.bytes) }
            }
            return .null
        case .flushDatabase:
            if !databases[db].keys.isEmpty { revision += 1 }
            databases[db] = Database()
            return .ok
        case .flushAll:
            revision += 1
            databases = Array(repeating: Database(), count: Self.databaseCount)
            return .ok
        case .swapDatabases(let first, let second):
            revision += 1
            databases.swapAt(first, second)
            // Every key in both now lives elsewhere: WATCH on any of them must see a change.
            for database in [first, second] {
                var keys = databases[database].keys
                for (key, var value) in databases[database].keys {
                    value.revision = revision
                    keys[key] = value
                }
                databases[database].keys = keys
            }
            return .ok
        }
    }
}
