// A linearizability checker for a history of operations on one register-like key (Wing & Gong's
// search with Lowe's memoization, as Knossos and Porcupine do it), with a bound on the search:
// past it the verdict is `.unknown`, never a guess.
//
// Operations: read (returns the value), write (sets it), increment (adds one, returns the new
// value), swap (sets a value, returns the old one: Redis's SET … GET), compare-and-set (sets a
// value if the register holds the expected one: WATCH/MULTI/EXEC; returns 1 if it did, 0 if not).
// An operation that completed `ok` must take effect between its invocation and its
// completion; one whose outcome is `unknown` (a timeout, a crash) may take effect at any time after
// its invocation, or never; one that `failed` never took effect and is left out.

/// What a client asked for.
public enum RegisterOperation: Sendable, Equatable, Hashable {
    case read
    case write(Int64)
    case increment
    /// Sets the value; returns the one it replaced.
    case swap(Int64)
    /// Sets `new` if the value is `expected`; returns 1 if it did, 0 if it did not.
    case compareAndSet(expected: Int64, new: Int64)
}

/// How an operation ended.
public enum OperationOutcome: Sendable, Equatable, Hashable {
    /// Completed, with the value it returned (reads and increments) or nil (writes).
    case ok(Int64?)
    /// Definitely did not take effect.
    case fail
    /// May or may not have taken effect (timed out, or its node crashed).
    case unknown
}

/// One operation in a history.
public struct HistoryOperation: Sendable, Equatable {
    public var id: Int
    public var client: Int
    public var key: String
    public var operation: RegisterOperation
    public var invoke: UInt64
    /// Completion time; ignored for `unknown` outcomes.
    public var complete: UInt64
    public var outcome: OperationOutcome

    public init(id: Int, client: Int, key: String, operation: RegisterOperation, invoke: UInt64, complete: UInt64, outcome: OperationOutcome) {
        self.id = id
        self.client = client
        self.key = key
        self.operation = operation
        self.invoke = invoke
        self.complete = complete
        self.outcome = outcome
    }
}

/// The checker's answer for one key.
public enum LinearizabilityVerdict: Sendable, Equatable, CustomStringConvertible {
    case linearizable
    /// No order explains the history; the operations the search could not get past.
    case violation(String)
    /// The search hit its bound.
    case unknown(explored: Int)

    public var description: String {
        switch self {
        case .linearizable: "linearizable"
        case .violation(let detail): "NOT linearizable: \(detail)"
        case .unknown(let explored): "unknown (search stopped after \(explored) states)"
        }
    }
}

/// Checks histories of register operations.
public enum LinearizabilityChecker {
    /// Checks each key's operations separately (linearizability is compositional) and returns
    /// the verdicts by key, in key order.
    public static func check(_ history: [HistoryOperation], initialValue: Int64 = 0, stateBound: Int = 200_000) -> [(key: String, verdict: LinearizabilityVerdict)] {
        var byKey: [String: [HistoryOperation]] = [:]
        for operation in history where operation.outcome != .fail { byKey[operation.key, default: []].append(operation) }
        return byKey.keys.sorted().map { key in (key, checkKey(byKey[key]!, initialValue: initialValue, stateBound: stateBound)) }
    }

    private struct Event {
        var isCall: Bool
        var operation: Int // position in `operations`
        var time: UInt64
        var previous: Int
        var next: Int
        var match: Int // for a call, its return event; for a return, its call event
    }

    private struct CacheKey: Hashable {
        var linearized: [UInt64]
        var state: Int64
    }

    /// Wing–Gong search with memoization over (set of linearized operations, state).
    static func checkKey(_ operations: [HistoryOperation], initialValue: Int64, stateBound: Int) -> LinearizabilityVerdict {
        if operations.isEmpty { return .linearizable }
        // Events sorted by time; at equal times calls come first (treated as concurrent).
        var raw: [(time: UInt64, isCall: Bool, operation: Int)] = []
        for (position, operation) in operations.enumerated() {
            raw.append((operation.invoke, true, position))
            let end = operation.outcome == .unknown ? UInt64.max : max(operation.complete, operation.invoke)
            raw.append((end, false, position))
        }
        raw.sort { ($0.time, $0.isCall ? 0 : 1, $0.operation) < ($1.time, $1.isCall ? 0 : 1, $1.operation) }
        // A doubly linked list with a sentinel head at index 0.
        var events = [Event(isCall: false, operation: -1, time: 0, previous: -1, next: 1, match: -1)]
        var callOf = [Int](repeating: -1, count: operations.count)
        var returnOf = [Int](repeating: -1, count: operations.count)
        for (position, item) in raw.enumerated() {
            let index = position + 1
            events.append(Event(isCall: item.isCall, operation: item.operation, time: item.time, previous: index - 1,
                                next: index + 1 <= raw.count ? index + 1 : -1, match: -1))
            if item.isCall { callOf[item.operation] = index } else { returnOf[item.operation] = index }
        }
        for operation in 0..<operations.count {
            events[callOf[operation]].match = returnOf[operation]
            events[returnOf[operation]].match = callOf[operation]
        }
        var required = operations.filter { $0.outcome != .unknown }.count
        let words = (operations.count + 63) / 64
        var linearized = [UInt64](repeating: 0, count: words)
        var cache = Set<CacheKey>()
        var stack: [(call: Int, state: Int64)] = []
        var state = initialValue
        var cursor = events[0].next
        var explored = 0
        var deepest = 0

        func unlink(_ index: Int) {
            let event = events[index]
            events[event.previous].next = event.next
            if event.next != -1 { events[event.next].previous = event.previous }
        }
        func relink(_ index: Int) {
            let event = events[index]
            events[event.previous].next = index
            if event.next != -1 { events[event.next].previous = index }
        }

        while true {
            if required == 0 { return .linearizable }
            guard cursor != -1 else { break }
            let event = events[cursor]
            if event.isCall {
                let operation = operations[event.operation]
                let (allowed, next) = apply(operation, to: state)
                var candidate = linearized
                candidate[event.operation / 64] |= 1 << UInt64(event.operation % 64)
                if allowed, cache.insert(CacheKey(linearized: candidate, state: next)).inserted {
                    explored += 1
                    if explored > stateBound { return .unknown(explored: explored) }
                    stack.append((cursor, state))
                    state = next
                    linearized = candidate
                    if operation.outcome != .unknown { required -= 1 }
                    unlink(cursor)
                    unlink(event.match)
                    deepest = max(deepest, stack.count)
                    cursor = events[0].next
                } else {
                    cursor = event.next
                }
            } else {
                // An operation returned before any order could place it: undo the last choice.
                guard let (call, previousState) = stack.popLast() else { break }
                let operation = events[call].operation
                state = previousState
                linearized[operation / 64] &= ~(1 << UInt64(operation % 64))
                if operations[operation].outcome != .unknown { required += 1 }
                relink(events[call].match)
                relink(call)
                cursor = events[call].next
            }
        }
        let stuck = operations.filter { $0.outcome != .unknown }.sorted { $0.invoke < $1.invoke }.prefix(deepest + 3).suffix(4)
        return .violation("no order fits; near operations " + stuck.map { describe($0) }.joined(separator: ", "))
    }

    /// Whether the operation may take effect in `state`, and the state after it.
    static func apply(_ operation: HistoryOperation, to state: Int64) -> (Bool, Int64) {
        switch (operation.operation, operation.outcome) {
        case (.read, .ok(let value)):
            return (value == state, state)
        case (.read, _):
            return (true, state)
        case (.write(let value), _):
            return (true, value)
        case (.increment, .ok(let value)):
            return (value == state &+ 1, state &+ 1)
        case (.increment, _):
            return (true, state &+ 1)
        case (.swap(let value), .ok(let old)):
            return (old == state, value)
        case (.swap(let value), _):
            return (true, value)
        case (.compareAndSet(let expected, let new), .ok(let swapped)):
            return swapped == 1 ? (state == expected, new) : (swapped == 0 && state != expected, state)
        case (.compareAndSet(let expected, let new), _):
            // Unknown: it took effect only where it could have (a no-op is the same as never).
            return (state == expected, new)
        }
    }

    static func describe(_ operation: HistoryOperation) -> String {
        let what: String
        switch operation.operation {
        case .read: what = "read"
        case .write(let value): what = "write \(value)"
        case .increment: what = "incr"
        case .swap(let value): what = "swap \(value)"
        case .compareAndSet(let expected, let new): what = "cas \(expected)->\(new)"
        }
        let result: String
        switch operation.outcome {
        case .ok(let value): result = value.map { "-> \($0)" } ?? "ok"
        case .fail: result = "fail"
        case .unknown: result = "?"
        }
        return "#\(operation.id) c\(operation.client) \(what) \(result) [\(operation.invoke), \(operation.outcome == .unknown ? "∞" : String(operation.complete))]"
    }
}
