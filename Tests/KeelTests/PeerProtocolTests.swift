import Keel
import KeelCore
import KeelRaft
import NIOCore
import NIOEmbedded
import Testing

@Suite("Peer protocol")
struct PeerProtocolTests {
    /// A message with every field set, from a seed.
    static func message(_ seed: UInt64) -> Message {
        var random = SeededRandom(seed: seed)
        let kinds: [MessageKind] = [.appendEntries, .appendEntriesResponse, .requestVote, .heartbeat, .installSnapshot, .propose, .readIndexResponse]
        var message = Message(kind: kinds[Int(random.next() % UInt64(kinds.count))], from: NodeID(1 + random.next() % 5),
                              to: NodeID(1 + random.next() % 5), term: Term(random.next() % 1000))
        message.logTerm = Term(random.next() % 1000)
        message.index = LogIndex(random.next() % 100_000)
        message.commit = LogIndex(random.next() % 100_000)
        message.reject = random.next() % 2 == 0
        message.rejectHint = LogIndex(random.next() % 100_000)
        message.context = (0..<Int(random.next() % 16)).map { _ in UInt8.random(in: 0...255, using: &random) }
        message.entries = (0..<Int(random.next() % 8)).map { offset in
            Entry(index: LogIndex(UInt64(offset) + 1), term: Term(7), kind: random.next() % 3 == 0 ? .configurationChange : .normal,
                  data: (0..<Int(random.next() % 64)).map { _ in UInt8.random(in: 0...255, using: &random) })
        }
        if random.next() % 2 == 0 {
            message.snapshot = SnapshotMetadata(index: LogIndex(99), term: Term(4), membership: Membership(voters: [NodeID(1), NodeID(2)], learners: [NodeID(3)]))
            message.snapshotOffset = Int(random.next() % 4096)
            message.snapshotData = (0..<Int(random.next() % 128)).map { _ in UInt8.random(in: 0...255, using: &random) }
            message.snapshotDone = random.next() % 2 == 0
        }
        return message
    }

    @Test("every message round-trips through the wire format")
    func roundTrip() throws {
        for seed in UInt64(1)...300 {
            let original = Self.message(seed)
            #expect(try PeerWireFormat.decode(PeerWireFormat.encode(original)) == original, "seed \(seed)")
        }
    }

    @Test("frames drip-fed one byte at a time decode to the frames sent")
    func dripFed() throws {
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(PeerFrameDecoder()))
        var sent: [PeerFrame] = [.hello(node: NodeID(2), token: Array("secret".utf8))]
        sent += (UInt64(1)...20).map { .raft(Self.message($0)) }
        let bytes = sent.flatMap(PeerFrameFormat.encode)
        for byte in bytes {
            var buffer = channel.allocator.buffer(capacity: 1)
            buffer.writeInteger(byte)
            try channel.writeInbound(buffer)
        }
        var received: [PeerFrame] = []
        while let frame = try channel.readInbound(as: PeerFrame.self) { received.append(frame) }
        #expect(received == sent)
        #expect(try channel.finish().isClean)
    }

    @Test("a frame over the size limit is refused from its header, before its bytes arrive")
    func frameSizeLimit() throws {
        var limits = PeerLimits()
        limits.frameSizeMax = 100
        let channel = EmbeddedChannel(handler: ByteToMessageHandler(PeerFrameDecoder(limits: limits)))
        var message = Message(kind: .propose, from: NodeID(1), to: NodeID(2), term: .zero)
        message.entries = [Entry(index: .zero, term: .zero, data: [UInt8](repeating: 1, count: 500))]
        var buffer = channel.allocator.buffer(capacity: 8)
        buffer.writeBytes(PeerFrameFormat.encode(.raft(message)).prefix(8))
        #expect(throws: PeerProtocolError.self) { try channel.writeInbound(buffer) }
        _ = try? channel.finish()
    }

    @Test("a flipped bit, an unknown version or kind, and truncated or padded payloads are errors, not traps")
    func malformedFrames() throws {
        let good = PeerFrameFormat.encode(.raft(Self.message(5)))
        var flipped = good
        flipped[good.count - 3] ^= 0x10
        var badVersion = good
        badVersion[4] = 9
        var badKind = good
        badKind[5] = 7
        for (name, bytes) in [("bit flip", flipped), ("version", badVersion), ("kind", badKind)] {
            let channel = EmbeddedChannel(handler: ByteToMessageHandler(PeerFrameDecoder()))
            var buffer = channel.allocator.buffer(capacity: bytes.count)
            buffer.writeBytes(bytes)
            #expect(throws: PeerProtocolError.self, "\(name)") { try channel.writeInbound(buffer) }
            _ = try? channel.finish()
        }
        let payload = PeerWireFormat.encode(Self.message(6))
        for cut in [0, 1, 10, payload.count / 2, payload.count - 1] {
            #expect(throws: PeerProtocolError.self) { try PeerWireFormat.decode(Array(payload.prefix(cut))) }
        }
        #expect(throws: PeerProtocolError.self) { try PeerWireFormat.decode(payload + [0]) }
        var hugeCount = payload
        // The entry count sits after kind (1), six 8-byte fields, reject (1), the reject hint (8),
        // and the context's length (4) and bytes.
        let contextLength = Int(hugeCount[58]) | Int(hugeCount[59]) << 8
        let countOffset = 62 + contextLength
        for i in 0..<4 { hugeCount[countOffset + i] = 0xFF }
        #expect(throws: PeerProtocolError.self) { try PeerWireFormat.decode(hugeCount) }
    }

    @Test("the hello frame carries the node and the cluster token, bounded in length")
    func hello() throws {
        let frame = PeerFrame.hello(node: NodeID(3), token: Array("token".utf8))
        var buffer = ByteBuffer(bytes: PeerFrameFormat.encode(frame))
        #expect(try PeerFrameDecoder().decodeFrame(&buffer) == frame)
        var limits = PeerLimits()
        limits.tokenSizeMax = 3
        var again = ByteBuffer(bytes: PeerFrameFormat.encode(frame))
        #expect(throws: PeerProtocolError.self) { try PeerFrameDecoder(limits: limits).decodeFrame(&again) }
    }

    @Test("random corruption of valid payloads never traps: each decodes or is refused")
    func fuzzedPayloads() {
        var random = SeededRandom(seed: 2026)
        var refused = 0
        for round in 0..<3000 {
            var payload = PeerWireFormat.encode(Self.message(UInt64(round % 50) + 1))
            for _ in 0..<(1 + Int(random.next() % 4)) {
                let position = Int(random.next() % UInt64(payload.count))
                payload[position] = UInt8(truncatingIfNeeded: random.next())
            }
            if random.next() % 4 == 0 { payload.removeLast(Int(random.next() % UInt64(payload.count))) }
            do { _ = try PeerWireFormat.decode(payload) } catch { refused += 1 }
        }
        #expect(refused > 0)
    }
}
