import KeelSimulation
import Testing

@Suite("Linearizability checker")
struct LinearizabilityCheckerTests {
    func op(_ id: Int, _ operation: RegisterOperation, _ invoke: UInt64, _ complete: UInt64, _ outcome: OperationOutcome, key: String = "k") -> HistoryOperation {
        HistoryOperation(id: id, client: id, key: key, operation: operation, invoke: invoke, complete: complete, outcome: outcome)
    }

    func verdict(_ history: [HistoryOperation]) -> LinearizabilityVerdict {
        LinearizabilityChecker.check(history).first?.verdict ?? .linearizable
    }

    @Test("sequential writes and reads that agree are linearizable")
    func sequential() {
        let history = [
            op(1, .write(5), 0, 1, .ok(nil)),
            op(2, .read, 2, 3, .ok(5)),
            op(3, .increment, 4, 5, .ok(6)),
            op(4, .read, 6, 7, .ok(6)),
        ]
        #expect(verdict(history) == .linearizable)
    }

    @Test("a planted stale read is reported")
    func staleRead() {
        let history = [
            op(1, .write(1), 0, 1, .ok(nil)),
            op(2, .write(2), 2, 3, .ok(nil)),
            op(3, .read, 4, 5, .ok(1)), // after the second write completed: stale
        ]
        guard case .violation = verdict(history) else {
            Issue.record("the stale read was not reported")
            return
        }
    }

    @Test("a planted lost write is reported: an acknowledged increment missing from later reads")
    func lostWrite() {
        let history = [
            op(1, .increment, 0, 1, .ok(1)),
            op(2, .increment, 2, 3, .ok(2)),
            op(3, .read, 4, 5, .ok(1)),
        ]
        guard case .violation = verdict(history) else {
            Issue.record("the lost write was not reported")
            return
        }
    }

    @Test("concurrent operations may take effect in either order")
    func concurrency() {
        let history = [
            op(1, .write(1), 0, 10, .ok(nil)),
            op(2, .write(2), 1, 9, .ok(nil)),
            op(3, .read, 11, 12, .ok(1)),
        ]
        #expect(verdict(history) == .linearizable)
    }

    @Test("an operation with an unknown outcome may or may not have taken effect, at any time after its invocation")
    func unknownOutcome() {
        let tookEffect = [op(1, .write(7), 0, 0, .unknown), op(2, .read, 50, 51, .ok(7))]
        let didNot = [op(1, .write(7), 0, 0, .unknown), op(2, .read, 50, 51, .ok(0))]
        let before = [op(1, .read, 0, 1, .ok(7)), op(2, .write(7), 5, 0, .unknown)]
        #expect(verdict(tookEffect) == .linearizable)
        #expect(verdict(didNot) == .linearizable)
        guard case .violation = verdict(before) else {
            Issue.record("a read cannot see a write invoked after it returned")
            return
        }
    }

    @Test("a failed operation never took effect")
    func failedOperation() {
        let history = [op(1, .write(3), 0, 1, .fail), op(2, .read, 2, 3, .ok(3))]
        guard case .violation = verdict(history) else {
            Issue.record("a read saw a failed write")
            return
        }
    }

    @Test("keys are checked independently")
    func keysIndependent() {
        let history = [
            op(1, .write(1), 0, 1, .ok(nil), key: "a"),
            op(2, .read, 2, 3, .ok(0), key: "b"),
        ]
        #expect(LinearizabilityChecker.check(history).map(\.verdict) == [.linearizable, .linearizable])
    }

    @Test("past its bound the search answers unknown rather than guess")
    func bound() {
        var history: [HistoryOperation] = []
        for i in 0..<14 { history.append(op(i, .increment, 0, 100, .unknown)) }
        history.append(op(99, .read, 200, 201, .ok(-1)))
        let result = LinearizabilityChecker.check(history, stateBound: 50).first!.verdict
        guard case .unknown = result else {
            Issue.record("expected unknown, got \(result)")
            return
        }
    }
}
