// The simulated network: every message gets a delivery time from the seed, and may be dropped,
// duplicated or held back (which reorders it); links can be cut one way or both.

import KeelCore
import KeelRaft

/// Fault rates of the simulated network.
public struct NetworkFaults: Sendable, Equatable {
    /// Probability that a message is lost.
    public var dropRate = 0.02
    /// Probability that a message is delivered twice.
    public var duplicateRate = 0.01
    /// Delivery takes 1...delayMax time units (different delays reorder messages).
    public var delayMax: UInt64 = 8
    /// Probability that a message is held back for up to 10x delayMax.
    public var longDelayRate = 0.01

    public init() {}
}

struct SimulatedNetwork {
    struct InFlight {
        var deliverAt: UInt64
        var sequence: UInt64
        var message: Message
    }

    var faults: NetworkFaults
    // Invariant: sorted by (deliverAt, sequence)
    private(set) var inFlight: [InFlight] = []
    private var sequence: UInt64 = 0
    /// Directed links that are cut: (from, to).
    private(set) var cut: Set<[UInt64]> = []
    private(set) var sent = 0
    private(set) var dropped = 0

    init(faults: NetworkFaults) { self.faults = faults }

    func isCut(from: NodeID, to: NodeID) -> Bool { cut.contains([from.rawValue, to.rawValue]) }

    mutating func send(_ message: Message, now: UInt64, random: inout SeededRandom) {
        sent += 1
        if isCut(from: message.from, to: message.to) || random.chance(faults.dropRate) {
            dropped += 1
            return
        }
        let copies = random.chance(faults.duplicateRate) ? 2 : 1
        for _ in 0..<copies {
            var delay = 1 + random.next() % faults.delayMax
            if random.chance(faults.longDelayRate) { delay += random.next() % (faults.delayMax * 10) }
            insert(InFlight(deliverAt: now + delay, sequence: sequence, message: message))
            sequence += 1
        }
    }

    private mutating func insert(_ item: InFlight) {
        var low = 0
        var high = inFlight.count
        while low < high {
            let middle = (low + high) / 2
            if (inFlight[middle].deliverAt, inFlight[middle].sequence) < (item.deliverAt, item.sequence) { low = middle + 1 } else { high = middle }
        }
        inFlight.insert(item, at: low)
    }

    /// Removes and returns the messages due at or before `now`, in delivery order. A message on
    /// a link cut after it was sent is lost.
    mutating func due(at now: UInt64) -> [Message] {
        var count = 0
        while count < inFlight.count, inFlight[count].deliverAt <= now { count += 1 }
        let ready = inFlight.prefix(count).map(\.message)
        inFlight.removeFirst(count)
        return ready.filter { message in
            if isCut(from: message.from, to: message.to) {
                dropped += 1
                return false
            }
            return true
        }
    }

    /// Cuts the links between two groups, both ways.
    mutating func partition(_ groupA: [NodeID], _ groupB: [NodeID]) {
        for a in groupA {
            for b in groupB {
                cut.insert([a.rawValue, b.rawValue])
                cut.insert([b.rawValue, a.rawValue])
            }
        }
    }

    /// Cuts one direction of one link.
    mutating func cutOneWay(from: NodeID, to: NodeID) {
        cut.insert([from.rawValue, to.rawValue])
    }

    mutating func heal() { cut = [] }

    /// Drops everything addressed to a node (it crashed: its sockets are gone).
    mutating func dropAll(to node: NodeID) {
        inFlight.removeAll { $0.message.to == node }
    }
}
