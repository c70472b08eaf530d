import Foundation
import KeelSimulation
import KeelTorture
import Testing

/// Histories built by hand: each planted fault must be reported, and a clean history must pass.
@Suite("torture checker")
struct TortureCheckerTests {
    static let ms: UInt64 = 1_000_000

    /// A three-node history whose nodes converged, with `operations`, and `adds` present at the end.
    static func history(_ operations: [TortureOperation], adds: [String] = [], nodes: [TortureNodeState]? = nil) -> TortureHistory {
        let converged = (1...3).map { TortureNodeState(node: $0, appliedIndex: 40, digest: "abc", keys: 3) }
        return TortureHistory(seed: 7, nodes: 3, durationSeconds: 1, serveArguments: [], operations: operations,
                              faults: [TortureFault(kind: .kill, nodes: [1], leader: true, start: 5 * ms, end: 8 * ms, detail: "planted")],
                              final: TortureFinal(nodes: nodes ?? converged, adds: adds))
    }

    static func op(_ id: Int, client: Int = 0, key: String = "r0:0", _ kind: TortureOperationKind, value: Int64? = nil, expected: Int64? = nil,
                   _ invoke: UInt64, _ complete: UInt64?, _ outcome: TortureOutcome = .ok, result: Int64? = nil) -> TortureOperation {
        TortureOperation(id: id, client: client, node: 1, key: key, kind: kind, value: value, expected: expected,
                         invoke: invoke * ms, complete: complete.map { $0 * ms }, outcome: outcome, result: result)
    }

    /// Writes, an increment, a swap, a compare-and-set and reads that one order explains; an
    /// acknowledged add present, an unknown one missing.
    static let clean: [TortureOperation] = [
        op(0, .write, value: 5, 0, 10),
        op(1, client: 1, .read, 11, 12, result: 5),
        op(2, client: 2, .incr, 13, 15, result: 6),
        op(3, client: 1, .swap, value: 9, 16, 18, result: 6),
        op(4, client: 2, .cas, value: 11, expected: 9, 19, 21, result: 1),
        op(5, client: 0, .cas, value: 3, expected: 9, 22, 24, .fail),
        op(6, client: 1, .write, value: 4, 25, nil, .unknown),
        op(7, client: 2, .read, 30, 31, result: 4),
        op(8, client: 0, key: "a:0:1", .add, value: 1, 2, 4),
        op(9, client: 1, key: "a:1:1", .add, value: 1, 3, nil, .unknown),
        op(10, client: 2, key: "a:2:1", .add, value: 1, 3, 6, .fail),
    ]

    @Test("a history one order explains passes, with its summary")
    func cleanHistoryPasses() {
        let report = TortureChecker.check(Self.history(Self.clean, adds: ["a:0:1"]))
        #expect(report.passed, "\(report.rendered())")
        #expect(report.exitCode == 0)
        #expect(report.keysChecked == 1)
        #expect(report.operations[.write]?[.ok] == 1 && report.operations[.write]?[.unknown] == 1)
        #expect(report.faults[.kill]?.count == 1 && report.faults[.kill]?.leader == 1)
        // The first successful write invoked after the kill at 5 ms completed at 15 ms (the incr).
        #expect(report.leaderKillUnavailability == [10 * Self.ms])
        #expect(report.rendered().contains("PASS"))
    }

    @Test("a planted stale read is reported as a linearizability violation")
    func staleRead() {
        var operations = Self.clean
        // After the write of 4 (unknown) was read back at 30 ms, a read returns the older 11.
        operations.append(Self.op(11, client: 0, .read, 40, 41, result: 11))
        let report = TortureChecker.check(Self.history(operations, adds: ["a:0:1"]))
        #expect(!report.passed)
        #expect(report.exitCode == 1)
        #expect(report.linearizabilityViolations.count == 1)
        #expect(report.linearizabilityViolations.first?.contains("r0:0") == true)
        #expect(report.lostWrites.isEmpty && report.divergence.isEmpty)
    }

    @Test("a planted lost write is reported: an acknowledged add missing at the end")
    func lostWrite() {
        let report = TortureChecker.check(Self.history(Self.clean, adds: []))
        #expect(!report.passed)
        #expect(report.lostWrites.count == 1)
        #expect(report.lostWrites.first?.contains("a:0:1") == true)
        #expect(report.linearizabilityViolations.isEmpty)
    }

    @Test("a lost register write shows in the final read")
    func lostRegisterWrite() {
        var operations = Self.clean
        operations.append(Self.op(11, client: -1, .read, 50, 51, result: 11)) // the final read misses the write of 4
        let report = TortureChecker.check(Self.history(operations, adds: ["a:0:1"]))
        #expect(report.linearizabilityViolations.count == 1)
    }

    @Test("both planted faults at once are both reported")
    func staleReadAndLostWrite() {
        var operations = Self.clean
        operations.append(Self.op(11, client: 0, .read, 40, 41, result: 11))
        let report = TortureChecker.check(Self.history(operations, adds: []))
        #expect(report.linearizabilityViolations.count == 1)
        #expect(report.lostWrites.count == 1)
        #expect(report.rendered().contains("VIOLATION (linearizability)"))
        #expect(report.rendered().contains("VIOLATION (lost write)"))
    }

    @Test("a refused add present at the end, and one nobody wrote, are phantom writes")
    func phantomWrites() {
        let report = TortureChecker.check(Self.history(Self.clean, adds: ["a:0:1", "a:2:1", "a:9:9"]))
        #expect(report.phantomWrites.count == 2)
        #expect(!report.passed)
    }

    @Test("nodes at different states, or a node missing, are divergence")
    func divergence() {
        var nodes = (1...3).map { TortureNodeState(node: $0, appliedIndex: 40, digest: "abc", keys: 3) }
        nodes[2].digest = "abd"
        #expect(TortureChecker.check(Self.history(Self.clean, adds: ["a:0:1"], nodes: nodes)).divergence.count == 1)
        let missing = TortureChecker.check(Self.history(Self.clean, adds: ["a:0:1"], nodes: Array(nodes.prefix(2))))
        #expect(missing.divergence.count == 1)
        #expect(missing.exitCode == 1)
    }

    @Test("an answer a command never gives is reported")
    func unexpectedReply() {
        var operations = Self.clean
        operations.append(Self.op(11, client: 1, .write, value: 2, 45, nil, .unknown))
        operations[11].error = "unexpected reply integer(7)"
        let report = TortureChecker.check(Self.history(operations, adds: ["a:0:1"]))
        #expect(report.unexpectedReplies.count == 1)
        #expect(!report.passed)
    }

    @Test("a compare-and-set that claims success against another value is a violation")
    func wrongCompareAndSet() {
        var operations = Self.clean
        operations[4].expected = 8 // the register held 9
        #expect(TortureChecker.check(Self.history(operations, adds: ["a:0:1"])).linearizabilityViolations.count == 1)
    }

    @Test("a history survives its JSON form unchanged, and a foreign document is refused")
    func roundTrip() throws {
        let history = Self.history(Self.clean, adds: ["a:0:1"])
        let data = try history.encoded()
        #expect(try TortureHistory.decode(data) == history)
        // One operation per line.
        #expect(String(decoding: data, as: UTF8.self).split(separator: "\n").count >= Self.clean.count)
        #expect(throws: TortureError.self) { try TortureHistory.decode(Data("{\"format\":\"other\"}".utf8)) }
        var future = history
        future.version = 2
        #expect(throws: TortureError.self) { try TortureHistory.decode(try JSONEncoder().encode(future)) }
    }
}
