// How Raft messages travel between Keel nodes: the payload of a `raft` frame (see
// PeerFrameCodec.swift and docs/formats/peer-protocol.md). Every count and length read from the
// wire is checked against `PeerLimits` before anything is allocated; a message that breaks a limit
// or does not parse is a typed error, never a trap.

import KeelCore
import KeelRaft

/// Bounds on what a peer may send. Part of the node's configuration.
public struct PeerLimits: Sendable, Equatable {
    /// The largest frame payload accepted, in bytes.
    public var frameSizeMax = 16 * 1024 * 1024
    /// The most entries one message may carry.
    public var entriesPerMessageMax = 16_384
    /// The most members a snapshot's membership may list.
    public var membersMax = 1024
    /// The longest cluster token accepted in a hello frame.
    public var tokenSizeMax = 1024

    public init() {}
}

/// A malformed or over-limit peer payload.
public struct PeerProtocolError: Error, Sendable, Equatable, CustomStringConvertible {
    public var reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { "peer protocol: \(reason)" }
}

/// Encodes and decodes Raft messages. Part of the peer protocol (version 1): never change a field,
/// add a new frame version.
public enum PeerWireFormat {
    static let kinds: [MessageKind] = [
        .appendEntries, .appendEntriesResponse, .requestVote, .requestVoteResponse, .preVote, .preVoteResponse,
        .heartbeat, .heartbeatResponse, .installSnapshot, .installSnapshotResponse, .timeoutNow, .readIndex,
        .readIndexResponse, .propose,
    ]

    /// The wire code of a message kind (its position in `kinds`, from 1).
    static func code(of kind: MessageKind) -> UInt8 {
        UInt8(kinds.firstIndex(of: kind)! + 1)
    }

    /// Encodes a message.
    ///
    /// - Complexity: O(size of the message).
    public static func encode(_ message: Message) -> [UInt8] {
        var writer = ByteWriter(capacity: message.size + 64)
        writer.write(code(of: message.kind))
        writer.write(message.from.rawValue)
        writer.write(message.to.rawValue)
        writer.write(message.term.rawValue)
        writer.write(message.logTerm.rawValue)
        writer.write(message.index.rawValue)
        writer.write(message.commit.rawValue)
        // Flags: bit 0 reject, bit 1 lease read.
        writer.write(UInt8(message.reject ? 1 : 0) | UInt8(message.leaseRead ? 2 : 0))
        writer.write(message.rejectHint.rawValue)
        writer.writeLengthPrefixed(message.context)
        writer.write(UInt32(message.entries.count))
        for entry in message.entries {
            writer.write(entry.index.rawValue)
            writer.write(entry.term.rawValue)
            writer.write(entry.kind.rawValue)
            writer.writeLengthPrefixed(entry.data)
        }
        if let snapshot = message.snapshot {
            writer.write(UInt8(1))
            writer.write(snapshot.index.rawValue)
            writer.write(snapshot.term.rawValue)
            writer.write(UInt32(snapshot.membership.voters.count))
            for voter in snapshot.membership.voters { writer.write(voter.rawValue) }
            writer.write(UInt32(snapshot.membership.learners.count))
            for learner in snapshot.membership.learners { writer.write(learner.rawValue) }
        } else {
            writer.write(UInt8(0))
        }
        writer.write(UInt64(message.snapshotOffset))
        writer.writeLengthPrefixed(message.snapshotData)
        writer.write(UInt8(message.snapshotDone ? 1 : 0))
        return writer.bytes
    }

    /// Decodes a message, checking every count and length.
    public static func decode(_ bytes: [UInt8], limits: PeerLimits = PeerLimits()) throws(PeerProtocolError) -> Message {
        var reader = ByteReader(bytes)
        do {
            let code = Int(try reader.readUInt8("kind"))
            guard code >= 1, code <= kinds.count else { throw PeerProtocolError("unknown message kind \(code)") }
            let from = NodeID(try reader.readUInt64("from"))
            let to = NodeID(try reader.readUInt64("to"))
            var message = Message(kind: kinds[code - 1], from: from, to: to, term: Term(try reader.readUInt64("term")))
            message.logTerm = Term(try reader.readUInt64("log term"))
            message.index = LogIndex(try reader.readUInt64("index"))
            message.commit = LogIndex(try reader.readUInt64("commit"))
            let flags = try reader.readUInt8("flags")
            guard flags & ~3 == 0 else { throw PeerProtocolError("unknown flags \(flags)") }
            message.reject = flags & 1 != 0
            message.leaseRead = flags & 2 != 0
            message.rejectHint = LogIndex(try reader.readUInt64("reject hint"))
            message.context = Array(try reader.readLengthPrefixed(limit: limits.frameSizeMax, "context"))
            let entryCount = Int(try reader.readUInt32("entry count"))
            guard entryCount <= limits.entriesPerMessageMax else {
                throw PeerProtocolError("\(entryCount) entries, over the limit of \(limits.entriesPerMessageMax)")
            }
            // Each entry takes at least 21 bytes, which bounds the count by what is really there.
            guard entryCount <= reader.remaining / 21 else { throw PeerProtocolError("\(entryCount) entries cannot fit in the message") }
            message.entries.reserveCapacity(entryCount)
            for _ in 0..<entryCount {
                let index = LogIndex(try reader.readUInt64("entry index"))
                let term = Term(try reader.readUInt64("entry term"))
                let rawKind = try reader.readUInt8("entry kind")
                guard let kind = EntryKind(rawValue: rawKind) else { throw PeerProtocolError("unknown entry kind \(rawKind)") }
                let data = Array(try reader.readLengthPrefixed(limit: limits.frameSizeMax, "entry data"))
                message.entries.append(Entry(index: index, term: term, kind: kind, data: data))
            }
            if try readFlag(&reader, "snapshot present") {
                let index = LogIndex(try reader.readUInt64("snapshot index"))
                let term = Term(try reader.readUInt64("snapshot term"))
                let voters = try readMembers(&reader, limits: limits, "voters")
                let learners = try readMembers(&reader, limits: limits, "learners")
                message.snapshot = SnapshotMetadata(index: index, term: term, membership: Membership(voters: voters, learners: learners))
            }
            let offset = try reader.readUInt64("snapshot offset")
            guard offset <= UInt64(Int32.max) else { throw PeerProtocolError("snapshot offset \(offset) out of range") }
            message.snapshotOffset = Int(offset)
            message.snapshotData = Array(try reader.readLengthPrefixed(limit: limits.frameSizeMax, "snapshot data"))
            message.snapshotDone = try readFlag(&reader, "snapshot done")
            guard reader.isAtEnd else { throw PeerProtocolError("\(reader.remaining) bytes after the message") }
            return message
        } catch let error as PeerProtocolError {
            throw error
        } catch {
            throw PeerProtocolError("truncated message: \(error)")
        }
    }

    private static func readFlag(_ reader: inout ByteReader<[UInt8]>, _ name: String) throws -> Bool {
        let value = try reader.readUInt8(name)
        guard value <= 1 else { throw PeerProtocolError("\(name) is \(value), not 0 or 1") }
        return value == 1
    }

    private static func readMembers(_ reader: inout ByteReader<[UInt8]>, limits: PeerLimits, _ name: String) throws -> [NodeID] {
        let count = Int(try reader.readUInt32("\(name) count"))
        guard count <= limits.membersMax, count <= reader.remaining / 8 else { throw PeerProtocolError("\(count) \(name), over the limit") }
        var members: [NodeID] = []
        for _ in 0..<count { members.append(NodeID(try reader.readUInt64(name))) }
        return members
    }
}
