// What a Raft node hands its caller after a step. The caller handles it in this order:
//   1. persist `hardState` and `incomingSnapshotChunks`; install `snapshot` (replacing the state
//      and the log); then persist `entries` (which follow the snapshot when both are present);
//   2. send `messages`;
//   3. apply `committedEntries` and serve the reads in `readStates` once applied;
//   4. call `advance(ready)`.

import KeelCore

/// The work a node gives its caller.
public struct Ready: Sendable, Equatable {
    /// Set when the leader or role changed.
    public var softState: SoftState?
    /// Set when the hard state changed; persist before sending messages.
    public var hardState: HardState?
    /// Entries to persist after installing `snapshot`, if any (the first may replace a persisted suffix).
    public var entries: [Entry] = []
    /// Chunks of a snapshot being received, to store at their offsets.
    public var incomingSnapshotChunks: [IncomingSnapshotChunk] = []
    /// A snapshot whose chunks are all stored: install it (replace the state and the log).
    public var snapshot: SnapshotMetadata?
    /// Messages to send, after persisting.
    public var messages: [Message] = []
    /// Entries to apply, in order.
    public var committedEntries: [Entry] = []
    /// Reads that may be served once the state machine has applied their index.
    public var readStates: [ReadState] = []

    /// Whether there is nothing to do.
    public var isEmpty: Bool {
        softState == nil && hardState == nil && entries.isEmpty && incomingSnapshotChunks.isEmpty && snapshot == nil
            && messages.isEmpty && committedEntries.isEmpty && readStates.isEmpty
    }
}

/// A node's state for operators and tests.
public struct RaftStatus: Sendable, Equatable {
    public var id: NodeID
    public var role: Role
    public var term: Term
    public var leader: NodeID?
    public var votedFor: NodeID?
    public var commitIndex: LogIndex
    public var appliedIndex: LogIndex
    public var lastIndex: LogIndex
    public var membership: Membership
    /// On a leader: each member's match index.
    public var matchIndex: [NodeID: LogIndex]
    public var leadTransferee: NodeID?
}
