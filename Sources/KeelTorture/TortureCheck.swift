// Checks a torture history: linearizability of every register key (the simulator's checker, one
// key at a time), no acknowledged `add` lost and no refused one present, every node converged to
// the same state at the same applied index; and sums the run up (operations by outcome, faults by
// kind, the longest stretch without a successful write, unavailability after leader kills).

import Foundation
import KeelSimulation

/// The verdict on a history, and its summary.
public struct TortureReport: Sendable {
    /// Register keys whose history no order explains (a stale read, a lost or phantom write…).
    public var linearizabilityViolations: [String] = []
    /// `add` keys acknowledged but missing at the end.
    public var lostWrites: [String] = []
    /// `add` keys present at the end that were refused (`fail`), or never written.
    public var phantomWrites: [String] = []
    /// How the nodes disagree at the end.
    public var divergence: [String] = []
    /// Answers a command never gives (recorded with an error beginning "unexpected reply").
    public var unexpectedReplies: [String] = []
    /// What could not be decided (a search that hit its bound, an end state that could not be read).
    public var undecided: [String] = []
    /// Register keys checked.
    public var keysChecked = 0
    /// Operation counts: kind -> outcome -> count.
    public var operations: [TortureOperationKind: [TortureOutcome: Int]] = [:]
    /// Fault counts by kind, and how many of them hit the leader.
    public var faults: [TortureFaultKind: (count: Int, leader: Int)] = [:]
    public var skippedFaults: [String] = []
    /// The longest time between two successful writes (or from the first invocation to the first
    /// success, or from the last success to the last completion), and where it began.
    public var longestWriteGap: (nanoseconds: UInt64, from: UInt64) = (0, 0)
    /// For each SIGKILL of the leader: nanoseconds from the kill to the first successful write
    /// invoked after it (nil: none succeeded before the run ended).
    public var leaderKillUnavailability: [UInt64?] = []

    /// Whether nothing was violated.
    public var passed: Bool {
        linearizabilityViolations.isEmpty && lostWrites.isEmpty && phantomWrites.isEmpty && divergence.isEmpty && unexpectedReplies.isEmpty
    }

    /// 0: passed; 1: a violation; 2: passed as far as it could be checked, but something was
    /// undecided.
    public var exitCode: Int32 { !passed ? 1 : (undecided.isEmpty ? 0 : 2) }

    /// The verdict line.
    public var verdict: String {
        if !passed {
            let count = linearizabilityViolations.count + lostWrites.count + phantomWrites.count + divergence.count + unexpectedReplies.count
            return "VIOLATION: \(count) found (linearizability \(linearizabilityViolations.count), lost writes \(lostWrites.count), phantom writes \(phantomWrites.count), divergence \(divergence.count), unexpected replies \(unexpectedReplies.count))"
        }
        return undecided.isEmpty ? "PASS: no violation found" : "PASS WITH UNDECIDED PARTS: \(undecided.count) could not be checked"
    }

    /// A human-readable report: the verdict, the summary, then every finding.
    public func rendered() -> String {
        var lines: [String] = []
        let total = operations.values.reduce(0) { $0 + $1.values.reduce(0, +) }
        var byOutcome: [TortureOutcome: Int] = [:]
        for counts in operations.values { for (outcome, count) in counts { byOutcome[outcome, default: 0] += count } }
        lines.append("operations: \(total) (ok \(byOutcome[.ok] ?? 0), fail \(byOutcome[.fail] ?? 0), unknown \(byOutcome[.unknown] ?? 0))")
        for kind in TortureOperationKind.allCases {
            guard let counts = operations[kind] else { continue }
            lines.append("  \(kind.rawValue): ok \(counts[.ok] ?? 0), fail \(counts[.fail] ?? 0), unknown \(counts[.unknown] ?? 0)")
        }
        let faultTotal = faults.values.reduce(0) { $0 + $1.count }
        lines.append("faults: \(faultTotal)")
        for kind in TortureFaultKind.allCases {
            guard let counts = faults[kind] else { continue }
            lines.append("  \(kind.rawValue): \(counts.count) (\(counts.leader) hit the leader)")
        }
        for skipped in skippedFaults { lines.append("  skipped: \(skipped)") }
        lines.append("register keys checked: \(keysChecked)")
        lines.append(String(format: "longest time without a successful write: %.3f s (from %.3f s)",
                            Double(longestWriteGap.nanoseconds) / 1e9, Double(longestWriteGap.from) / 1e9))
        if !leaderKillUnavailability.isEmpty {
            let known = leaderKillUnavailability.compactMap { $0 }.sorted()
            let median = known.isEmpty ? "-" : String(format: "%.3f s", Double(known[known.count / 2]) / 1e9)
            let longest = known.last.map { String(format: "%.3f s", Double($0) / 1e9) } ?? "-"
            let never = leaderKillUnavailability.count - known.count
            lines.append("leader kills: \(leaderKillUnavailability.count); unavailable until the next successful write: median \(median), longest \(longest)"
                         + (never > 0 ? "; \(never) with no successful write after them" : ""))
        }
        for item in linearizabilityViolations { lines.append("VIOLATION (linearizability): \(item)") }
        for item in lostWrites { lines.append("VIOLATION (lost write): \(item)") }
        for item in phantomWrites { lines.append("VIOLATION (phantom write): \(item)") }
        for item in divergence { lines.append("VIOLATION (divergence): \(item)") }
        for item in unexpectedReplies { lines.append("VIOLATION (unexpected reply): \(item)") }
        for item in undecided { lines.append("UNDECIDED: \(item)") }
        lines.append(verdict)
        return lines.joined(separator: "\n")
    }
}

/// Checks torture histories.
public enum TortureChecker {
    /// The bound on each key's linearizability search (past it the key is undecided).
    public static let stateBound = 1_000_000

    /// Checks a history.
    /// - Complexity: the linearizability search is exponential in the number of concurrent and
    ///   unknown operations on one key, bounded by `stateBound`; the rest is O(n log n).
    public static func check(_ history: TortureHistory, stateBound: Int = TortureChecker.stateBound) -> TortureReport {
        var report = TortureReport()
        report.skippedFaults = history.skippedFaults
        for operation in history.operations {
            report.operations[operation.kind, default: [:]][operation.outcome, default: 0] += 1
        }
        for fault in history.faults {
            var counts = report.faults[fault.kind] ?? (0, 0)
            counts.count += 1
            if fault.leader { counts.leader += 1 }
            report.faults[fault.kind] = counts
        }
        for operation in history.operations where operation.error?.hasPrefix("unexpected reply") == true {
            report.unexpectedReplies.append("#\(operation.id) \(operation.kind.rawValue) \(operation.key) on node \(operation.node): \(operation.error ?? "")")
        }
        checkRegisters(history, stateBound: stateBound, into: &report)
        checkAdds(history, into: &report)
        checkConvergence(history, into: &report)
        summarizeAvailability(history, into: &report)
        return report
    }

    /// Linearizability of each register key.
    static func checkRegisters(_ history: TortureHistory, stateBound: Int, into report: inout TortureReport) {
        var register: [HistoryOperation] = []
        for operation in history.operations where operation.kind != .add {
            // Reads that did not answer say nothing.
            if operation.kind == .read, operation.outcome != .ok { continue }
            let kind: RegisterOperation
            switch operation.kind {
            case .read: kind = .read
            case .write: kind = .write(operation.value ?? 0)
            case .incr: kind = .increment
            case .swap: kind = .swap(operation.value ?? 0)
            case .cas: kind = .compareAndSet(expected: operation.expected ?? 0, new: operation.value ?? 0)
            case .add: continue
            }
            let outcome: OperationOutcome
            switch operation.outcome {
            case .ok: outcome = .ok(operation.kind == .write ? nil : operation.result)
            case .fail: outcome = .fail
            case .unknown: outcome = .unknown
            }
            register.append(HistoryOperation(id: operation.id, client: operation.client, key: operation.key, operation: kind,
                                             invoke: operation.invoke, complete: operation.complete ?? operation.invoke, outcome: outcome))
        }
        let verdicts = LinearizabilityChecker.check(register, initialValue: 0, stateBound: stateBound)
        report.keysChecked = verdicts.count
        for (key, verdict) in verdicts {
            switch verdict {
            case .linearizable: continue
            case .violation: report.linearizabilityViolations.append("key \(key): \(verdict)")
            case .unknown: report.undecided.append("key \(key): \(verdict)")
            }
        }
    }

    /// Every acknowledged add present at the end; no refused one present.
    static func checkAdds(_ history: TortureHistory, into report: inout TortureReport) {
        let adds = history.operations.filter { $0.kind == .add }
        guard !adds.isEmpty else { return }
        guard let present = history.final?.adds.map(Set.init) else {
            report.undecided.append("the add keys could not be read at the end (\(history.final?.problem ?? "no end state recorded")): \(adds.count) adds unchecked")
            return
        }
        var attempted = Set<String>()
        for add in adds {
            attempted.insert(add.key)
            switch add.outcome {
            case .ok where !present.contains(add.key):
                report.lostWrites.append("\(add.key) acknowledged at \(seconds(add.complete ?? add.invoke)) (client \(add.client), node \(add.node)) is missing at the end")
            case .fail where present.contains(add.key):
                report.phantomWrites.append("\(add.key) was refused at \(seconds(add.complete ?? add.invoke)) (\(add.error ?? "no error text")) but is present at the end")
            case .ok, .fail, .unknown:
                continue
            }
        }
        for key in present.subtracting(attempted).sorted() {
            report.phantomWrites.append("\(key) is present at the end but no client wrote it")
        }
    }

    /// Every node at the same applied index with the same digest.
    static func checkConvergence(_ history: TortureHistory, into report: inout TortureReport) {
        guard let final = history.final else {
            report.undecided.append("no end state recorded: convergence unchecked")
            return
        }
        if let problem = final.problem { report.undecided.append("end state: \(problem)") }
        let reported = Set(final.nodes.map(\.node))
        for node in 1...max(1, history.nodes) where !reported.contains(node) {
            report.divergence.append("node \(node) did not report its state after the faults were healed")
        }
        guard let first = final.nodes.first else { return }
        let states = Set(final.nodes.map { "\($0.appliedIndex)/\($0.digest)" })
        if states.count > 1 {
            let described = final.nodes.map { "node \($0.node): applied \($0.appliedIndex), digest \($0.digest), \($0.keys) keys" }
            report.divergence.append("the nodes did not converge: " + described.joined(separator: "; "))
        } else if first.keys < 0 {
            report.divergence.append("node \(first.node) reported a negative key count")
        }
    }

    /// The longest stretch without a successful write, and unavailability after leader kills.
    static func summarizeAvailability(_ history: TortureHistory, into report: inout TortureReport) {
        let clientOperations = history.operations.filter { $0.client >= 0 }
        guard let firstInvoke = clientOperations.map(\.invoke).min() else { return }
        let lastTime = clientOperations.map { $0.complete ?? $0.invoke }.max() ?? firstInvoke
        let successes = clientOperations.filter(isSuccessfulWrite).map { (invoke: $0.invoke, complete: $0.complete ?? $0.invoke) }
        let completions = successes.map(\.complete).sorted()
        var previous = firstInvoke
        for time in completions + [lastTime] {
            if time > previous, time - previous > report.longestWriteGap.nanoseconds {
                report.longestWriteGap = (time - previous, previous)
            }
            previous = max(previous, time)
        }
        for fault in history.faults where fault.kind == .kill && fault.leader {
            let next = successes.filter { $0.invoke >= fault.start }.map(\.complete).min()
            report.leaderKillUnavailability.append(next.map { $0 - fault.start })
        }
    }

    static func isSuccessfulWrite(_ operation: TortureOperation) -> Bool {
        guard operation.outcome == .ok else { return false }
        switch operation.kind {
        case .read: return false
        case .write, .incr, .swap, .add: return true
        case .cas: return operation.result == 1
        }
    }

    static func seconds(_ nanoseconds: UInt64) -> String { String(format: "%.3f s", Double(nanoseconds) / 1e9) }
}
