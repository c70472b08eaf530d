// A leader's view of one follower (Raft Figure 2's nextIndex and matchIndex), with the flow
// control etcd's raft uses: probing one message at a time until the follower's log is found,
// then pipelining up to `inflightAppendsMax` messages, or streaming a snapshot.

import KeelCore

struct Progress {
    enum State: Equatable {
        /// Looking for where the logs agree: one AppendEntries per heartbeat until a reply.
        case probe
        /// Logs agree: send optimistically, pipelined.
        case replicate
        /// Sending a snapshot; `offset` is what the follower has acknowledged.
        case snapshot(SnapshotMetadata, offset: Int, inFlight: Bool)
    }

    // Invariant: matchIndex < nextIndex
    var matchIndex: LogIndex
    var nextIndex: LogIndex
    var state = State.probe
    /// In probe state, set after a message is sent and cleared by a reply or heartbeat reply.
    var probeSent = false
    /// Last indexes of the AppendEntries in flight, oldest first (replicate state).
    var inflight: [LogIndex] = []
    /// Whether the follower answered recently (check-quorum).
    var recentlyActive = false
    let isLearner: Bool

    init(nextIndex: LogIndex, isLearner: Bool) {
        matchIndex = .zero
        self.nextIndex = nextIndex
        self.isLearner = isLearner
    }

    var isSnapshot: Bool {
        if case .snapshot = state { return true }
        return false
    }

    mutating func becomeProbe() {
        if case .snapshot(let metadata, _, _) = state {
            nextIndex = max(matchIndex.next, metadata.index.next)
        } else {
            nextIndex = matchIndex.next
        }
        state = .probe
        probeSent = false
        inflight = []
    }

    mutating func becomeReplicate() {
        state = .replicate
        nextIndex = matchIndex.next
        inflight = []
    }

    mutating func becomeSnapshot(_ metadata: SnapshotMetadata) {
        state = .snapshot(metadata, offset: 0, inFlight: false)
        inflight = []
    }

    /// A successful reply up to `index`; returns whether it moved anything.
    mutating func maybeUpdate(_ index: LogIndex) -> Bool {
        var updated = false
        if index > matchIndex {
            matchIndex = index
            updated = true
            probeSent = false
        }
        if nextIndex < index.next { nextIndex = index.next }
        inflight.removeAll { $0 <= index }
        return updated
    }

    /// A rejection: move `nextIndex` back. Returns false if the rejection is stale.
    mutating func maybeDecrease(rejected: LogIndex, hint: LogIndex) -> Bool {
        if state == .replicate {
            // In replicate state nextIndex runs ahead; only a rejection of what follows matchIndex counts.
            if rejected <= matchIndex { return false }
            nextIndex = matchIndex.next
            return true
        }
        // Probe: only the rejection of the probe just sent counts.
        if nextIndex.rawValue == 0 || rejected != LogIndex(nextIndex.rawValue - 1) { return false }
        nextIndex = max(min(rejected, hint.next), matchIndex.next)
        if nextIndex.rawValue == 0 { nextIndex = LogIndex(1) }
        probeSent = false
        return true
    }

    /// After a reply from a follower whose window of unanswered appends is full: forget the oldest
    /// (it was lost, or the reply would have freed it), so one more append can go.
    mutating func freeOldestInflightIfFull(_ inflightMax: Int) {
        if state == .replicate, inflight.count >= inflightMax { inflight.removeFirst() }
    }

    /// Whether no more AppendEntries may be sent now.
    func isPaused(inflightMax: Int) -> Bool {
        switch state {
        case .probe: probeSent
        case .replicate: inflight.count >= inflightMax
        case .snapshot: true
        }
    }

    /// Records an AppendEntries sent with entries up to `last`.
    mutating func sentEntries(upTo last: LogIndex, count: Int) {
        switch state {
        case .replicate:
            if count > 0 {
                nextIndex = last.next
                inflight.append(last)
            }
        case .probe:
            probeSent = true
        case .snapshot:
            preconditionFailure("entries sent during a snapshot")
        }
    }
}
