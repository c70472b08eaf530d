// The simulator's state machine: a map from small keys to integers, with writes and increments.
// Every command carries its operation id, and an id already applied is ignored, so a proposal the
// network duplicated is applied once (client sessions, dissertation §6.3).

import KeelCore
import KeelRaft

struct KeyValueCommand: Equatable {
    enum Kind: UInt8 {
        case write = 1
        case increment = 2
    }

    var operation: UInt64
    var kind: Kind
    var key: UInt8
    var value: Int64

    var encoded: [UInt8] {
        var writer = ByteWriter(capacity: 18)
        writer.write(operation)
        writer.write(kind.rawValue)
        writer.write(key)
        writer.write(UInt64(bitPattern: value))
        return writer.bytes
    }

    init(operation: UInt64, kind: Kind, key: UInt8, value: Int64) {
        self.operation = operation
        self.kind = kind
        self.key = key
        self.value = value
    }

    init?(decoding bytes: [UInt8]) {
        var reader = ByteReader(bytes)
        guard let operation = try? reader.readUInt64(), let raw = try? reader.readUInt8(), let kind = Kind(rawValue: raw),
              let key = try? reader.readUInt8(), let value = try? reader.readUInt64(), reader.isAtEnd else { return nil }
        self.init(operation: operation, kind: kind, key: key, value: Int64(bitPattern: value))
    }
}

struct KeyValueMachine: Equatable {
    /// Values by key (index = key).
    private(set) var values: [Int64]
    /// Operation ids applied, for deduplication.
    private(set) var applied: Set<UInt64> = []

    init(keys: Int) { values = Array(repeating: 0, count: keys) }

    /// Applies a command; returns the result for its client, or nil for a duplicate.
    mutating func apply(_ command: KeyValueCommand) -> Int64? {
        guard Int(command.key) < values.count, applied.insert(command.operation).inserted else { return nil }
        switch command.kind {
        case .write:
            values[Int(command.key)] = command.value
            return command.value
        case .increment:
            values[Int(command.key)] &+= 1
            return values[Int(command.key)]
        }
    }

    func value(_ key: UInt8) -> Int64 { Int(key) < values.count ? values[Int(key)] : 0 }

    /// A snapshot: the values, then the applied ids in order.
    var encoded: [UInt8] {
        var writer = ByteWriter()
        writer.write(UInt32(values.count))
        for value in values { writer.write(UInt64(bitPattern: value)) }
        writer.write(UInt32(applied.count))
        for operation in applied.sorted() { writer.write(operation) }
        return writer.bytes
    }

    init?(decoding bytes: [UInt8]) {
        var reader = ByteReader(bytes)
        guard let count = try? reader.readUInt32(), count <= 1024 else { return nil }
        var values: [Int64] = []
        for _ in 0..<count {
            guard let value = try? reader.readUInt64() else { return nil }
            values.append(Int64(bitPattern: value))
        }
        guard let appliedCount = try? reader.readUInt32(), Int(appliedCount) <= reader.remaining / 8 else { return nil }
        var applied = Set<UInt64>()
        for _ in 0..<appliedCount {
            guard let operation = try? reader.readUInt64() else { return nil }
            applied.insert(operation)
        }
        self.values = values
        self.applied = applied
    }
}
