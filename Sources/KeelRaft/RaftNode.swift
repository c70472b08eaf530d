// Raft as a pure, deterministic state machine (the shape of etcd's raft library).
//
// No I/O, no clock, no `async`, no locks. Time enters as `tick()`, the network as `step(_:)`,
// clients as `propose(_:)` and `readIndex(context:)`, randomness as a seed. Everything the node
// wants done comes back in a `Ready` (see Ready.swift for the order the caller must follow).
// docs/raft.md maps each part to the paper and lists the deviations.

import KeelCore

/// One member of a Raft group.
public final class RaftNode {
    /// Context of a vote request that comes from a leadership transfer (bypasses the lease, §3.10).
    static let transferContext = Array("keel-transfer".utf8)

    struct ReadRequest {
        /// The leader's own number for the request; heartbeats carry it, so contexts need not be unique.
        var id: UInt64
        var index: LogIndex
        var context: [UInt8]
        var requester: NodeID
        var acknowledged: Set<NodeID>
    }

    public let configuration: RaftConfiguration
    public var id: NodeID { configuration.id }
    private var random: SeededRandom
    private var log: RaftLog

    // Persistent state (Raft Figure 2)
    private(set) var term: Term
    private(set) var votedFor: NodeID?

    // Volatile state
    private(set) var role = Role.follower
    public private(set) var leader: NodeID?
    private(set) var membership: Membership
    /// Configuration changes are applied when committed; this is how far they have been.
    private var configurationAppliedThrough: LogIndex
    private var progress: [NodeID: Progress] = [:]
    private var votes: [NodeID: Bool] = [:]
    private var electionElapsed = 0
    private var heartbeatElapsed = 0
    private var randomizedElectionTimeout = 0
    private var leadTransferee: NodeID?
    /// On a leader, the index of the newest configuration change it appended.
    private var pendingConfigurationIndex = LogIndex.zero
    private var uncommittedSize = 0
    private var pendingReads: [ReadRequest] = []
    private var nextReadID: UInt64 = 1
    private var readsAwaitingCommit: [(context: [UInt8], requester: NodeID, lease: Bool)] = []
    private var incomingSnapshot: (metadata: SnapshotMetadata, received: Int)?
    private var snapshotResendTicks: [NodeID: Int] = [:]
    /// Ticks counted while leading; heartbeats carry the count and replies echo it (lease reads).
    private var leaderTicks: UInt64 = 0
    /// For each member, the newest heartbeat tick it acknowledged in this term.
    private var heartbeatAcknowledged: [NodeID: UInt64] = [:]

    // Output, handed out by ready()
    private var messages: [Message] = []
    private var readStates: [ReadState] = []
    private var incomingChunks: [IncomingSnapshotChunk] = []
    private var previousSoftState: SoftState
    private var previousHardState: HardState
    private var highestCommitSeen = LogIndex.zero

    /// Creates a node over what the caller has persisted.
    ///
    /// - Parameters:
    ///   - configuration: settings (validated).
    ///   - storage: the persisted log, hard state and snapshot.
    ///   - randomSeed: the source of the randomized election timeouts.
    ///   - applied: the index the caller's state machine has applied through (entries up to it are
    ///     not handed out again); zero means the snapshot's index.
    public init(configuration: RaftConfiguration, storage: any RaftStorage, randomSeed: UInt64, applied: LogIndex = .zero) throws(RaftError) {
        try configuration.validate()
        self.configuration = configuration
        random = SeededRandom(seed: randomSeed)
        let (hardState, snapshotMembership) = storage.initialState()
        log = RaftLog(storage: storage, committed: hardState.commit, applied: applied)
        term = hardState.term
        votedFor = hardState.votedFor
        membership = snapshotMembership
        configurationAppliedThrough = storage.snapshot.index
        previousSoftState = SoftState(leader: nil, role: .follower)
        previousHardState = hardState
        highestCommitSeen = log.committed
        applyCommittedConfigurationChanges()
        becomeFollower(term: term, leader: nil)
    }

    // MARK: - Inputs

    /// Advances the logical clock by one tick.
    public func tick() {
        switch role {
        case .leader: tickHeartbeat()
        case .follower, .preCandidate, .candidate: tickElection()
        }
        afterInput()
    }

    /// Starts an election now (tests, and a single node that wants to lead at once).
    public func campaign() {
        startElection(transfer: false)
        afterInput()
    }

    /// Proposes data to be appended to the log.
    ///
    /// - Throws: `.noLeader` when none is known, `.leadershipTransferInProgress`, `.overloaded`.
    public func propose(_ data: [UInt8]) throws(RaftError) {
        try proposeEntry(Entry(index: .zero, term: .zero, kind: .normal, data: data))
        afterInput()
    }

    /// Proposes several entries at once: one AppendEntries round carries them all.
    ///
    /// - Throws: as `propose`; on an error none of them was proposed.
    public func propose(batch: [[UInt8]]) throws(RaftError) {
        guard !batch.isEmpty else { return }
        let entries = batch.map { Entry(index: .zero, term: .zero, kind: .normal, data: $0) }
        switch role {
        case .leader:
            if leadTransferee != nil { throw .leadershipTransferInProgress }
            let size = entries.reduce(0) { $0 + $1.size }
            if uncommittedSize + size > configuration.uncommittedSizeMax { throw .overloaded }
            appendEntries(entries)
            broadcastAppend()
        case .follower:
            guard let leader else { throw .noLeader }
            var message = Message(kind: .propose, from: id, to: leader, term: .zero)
            message.entries = entries
            send(message)
        case .preCandidate, .candidate:
            throw .noLeader
        }
        afterInput()
    }

    /// Proposes a membership change (one server at a time).
    ///
    /// - Throws: as `propose`, and `.configurationChangeInProgress`, `.leaderNotReady`, or
    ///   `.invalidConfiguration` for a change that would leave no voter.
    public func proposeConfigurationChange(_ change: ConfigurationChange) throws(RaftError) {
        try validate(change)
        try proposeEntry(Entry(index: .zero, term: .zero, kind: .configurationChange, data: change.encoded))
        afterInput()
    }

    /// Checks a change against the membership this node knows (the leader checks again).
    private func validate(_ change: ConfigurationChange) throws(RaftError) {
        if change.kind == .remove, membership.voters == [change.node] {
            throw .invalidConfiguration("removing the last voter would leave no one to elect a leader")
        }
        if change.kind == .promoteLearner, !membership.isLearner(change.node) {
            throw .invalidConfiguration("node \(change.node) is not a learner")
        }
        if change.node.rawValue == 0 { throw .invalidConfiguration("node id 0 is reserved") }
    }

    /// Asks for a read index (linearizable read, dissertation §6.4). A `ReadState` with the same
    /// context comes back in a later `Ready`; serve the read once that index is applied.
    ///
    /// - Parameter consistency: how the leader confirms it still leads; nil takes the configured
    ///   default. `.lease` needs check-quorum.
    public func readIndex(context: [UInt8], consistency: ReadConsistency? = nil) throws(RaftError) {
        guard !context.isEmpty else { throw .invalidMessage("a read needs a non-empty context to be matched with its answer") }
        let lease = (consistency ?? configuration.readConsistency) == .lease
        if lease, !configuration.checkQuorum { throw .invalidConfiguration("lease reads need check-quorum") }
        defer { afterInput() }
        if configuration.faults.readWithoutReadIndex {
            readStates.append(ReadState(index: log.committed, context: context))
            return
        }
        switch role {
        case .leader:
            try handleReadIndex(context: context, requester: id, lease: lease)
        case .follower:
            guard let leader else { throw .noLeader }
            var message = Message(kind: .readIndex, from: id, to: leader, term: .zero)
            message.context = context
            message.leaseRead = lease
            send(message)
        case .preCandidate, .candidate:
            throw .noLeader
        }
    }

    /// Asks the leader to hand leadership to `target` (dissertation §3.10).
    public func transferLeadership(to target: NodeID) throws(RaftError) {
        guard role == .leader else { throw .notLeader(leader) }
        guard target != id, membership.isVoter(target) else {
            throw .invalidConfiguration("node \(target) is not another voter")
        }
        if leadTransferee == target { return }
        leadTransferee = target
        electionElapsed = 0
        if progress[target]?.matchIndex == log.lastIndex {
            send(Message(kind: .timeoutNow, from: id, to: target, term: term))
        } else {
            _ = maybeSendAppend(to: target, sendIfEmpty: true)
        }
        afterInput()
    }

    /// Handles a message from another node. Malformed or stale messages are ignored.
    public func step(_ message: Message) {
        stepMessage(message)
        afterInput()
    }

    // MARK: - Ready

    /// Whether `ready()` has anything.
    public var hasReady: Bool {
        softState != previousSoftState || hardState != previousHardState || !log.unstable.isEmpty || log.unstableSnapshot != nil
            || !messages.isEmpty || !readStates.isEmpty || !incomingChunks.isEmpty || log.committed > log.applied
    }

    /// The work for the caller. Call `advance(_:)` with it once done.
    public func ready() -> Ready {
        var ready = Ready()
        if softState != previousSoftState { ready.softState = softState }
        if hardState != previousHardState { ready.hardState = hardState }
        ready.entries = log.unstable
        ready.snapshot = log.unstableSnapshot
        ready.incomingSnapshotChunks = incomingChunks
        ready.messages = messages
        ready.committedEntries = log.nextCommittedEntries(maxSize: configuration.messageSizeMax * 4)
        ready.readStates = readStates
        return ready
    }

    /// Records that the caller persisted, sent and applied a `Ready`.
    public func advance(_ ready: Ready) {
        if let state = ready.softState { previousSoftState = state }
        if let state = ready.hardState { previousHardState = state }
        if let snapshot = ready.snapshot { log.stableSnapshot(snapshot) }
        if let last = ready.entries.last { log.stable(to: last.index, term: last.term) }
        if let last = ready.committedEntries.last { log.applied(to: last.index) }
        messages.removeFirst(min(messages.count, ready.messages.count))
        readStates.removeFirst(min(readStates.count, ready.readStates.count))
        incomingChunks.removeFirst(min(incomingChunks.count, ready.incomingSnapshotChunks.count))
        if role == .leader {
            // The leader counts itself only for entries it has persisted (dissertation §10.2.1).
            _ = progress[id]?.maybeUpdate(persistedLastIndex)
            if maybeCommit() { broadcastAppend() }
        }
        afterInput()
    }

    // MARK: - State

    private var softState: SoftState { SoftState(leader: leader, role: role) }
    private var hardState: HardState { HardState(term: term, votedFor: votedFor, commit: log.committed) }

    /// The last index the caller has persisted.
    private var persistedLastIndex: LogIndex {
        if log.unstableSnapshot != nil { return LogIndex(log.unstableOffset.rawValue - 1) }
        return log.unstable.isEmpty ? log.lastIndex : LogIndex(log.unstableOffset.rawValue - 1)
    }

    /// The node's state.
    public var status: RaftStatus {
        RaftStatus(
            id: id, role: role, term: term, leader: leader, votedFor: votedFor, commitIndex: log.committed,
            appliedIndex: log.applied, lastIndex: log.lastIndex, membership: membership,
            matchIndex: role == .leader ? progress.mapValues(\.matchIndex) : [:], leadTransferee: leadTransferee)
    }

    /// Whether this node alone decides what is committed: the leader and the only voter, with an
    /// entry of its term committed. Its commit index is then a valid read index with no round trip.
    public var isSoleVoterLeader: Bool { role == .leader && membership.voters == [id] && committedEntryInCurrentTerm }

    /// The commit index this node knows.
    public var commitIndex: LogIndex { log.committed }

    /// The term of an entry this node holds (for checkers).
    public func term(at index: LogIndex) -> Term? { try? log.term(at: index) }

    /// Whether this node may campaign: a voter.
    private var isPromotable: Bool { membership.isVoter(id) }

    private var committedEntryInCurrentTerm: Bool { (try? log.term(at: log.committed)) == term }

    // MARK: - Role changes

    private func reset(term newTerm: Term) {
        if newTerm != term {
            term = newTerm
            votedFor = nil
        }
        leader = nil
        electionElapsed = 0
        heartbeatElapsed = 0
        randomizedElectionTimeout = configuration.electionTicks + Int(random.next() % UInt64(configuration.electionTicks))
        leadTransferee = nil
        votes = [:]
        pendingConfigurationIndex = .zero
        uncommittedSize = 0
        pendingReads = []
        readsAwaitingCommit = []
        snapshotResendTicks = [:]
        heartbeatAcknowledged = [:]
        progress = [:]
        for member in membership.all {
            var entry = Progress(nextIndex: log.lastIndex.next, isLearner: membership.isLearner(member))
            if member == id { entry.matchIndex = persistedLastIndex }
            progress[member] = entry
        }
    }

    private func becomeFollower(term newTerm: Term, leader newLeader: NodeID?) {
        reset(term: newTerm)
        role = .follower
        leader = newLeader
    }

    private func becomePreCandidate() {
        precondition(role != .leader, "a leader does not pre-campaign")
        // Pre-vote changes neither the term nor the vote (dissertation §9.6).
        votes = [:]
        leader = nil
        role = .preCandidate
    }

    private func becomeCandidate() {
        precondition(role != .leader, "a leader does not campaign")
        reset(term: Term(term.rawValue + 1))
        votedFor = id
        role = .candidate
    }

    private func becomeLeader() {
        precondition(role == .candidate, "only a candidate becomes leader")
        reset(term: term)
        role = .leader
        leader = id
        // Any configuration change in the uncommitted tail is pending until it commits.
        pendingConfigurationIndex = log.lastIndex
        // A no-op entry of the new term lets the leader commit, and learn what is committed (§8).
        // (The fault for checker tests leaves it out, as in the paper's Figure 8.)
        if !configuration.faults.commitEntriesOfOlderTerms { appendEntries([Entry(index: .zero, term: .zero)]) }
    }

    // MARK: - Elections (§5.2, pre-vote §9.6)

    private func tickElection() {
        electionElapsed += 1
        if isPromotable && electionElapsed >= randomizedElectionTimeout {
            electionElapsed = 0
            startElection(transfer: false)
        }
    }

    private func startElection(transfer: Bool) {
        guard role != .leader, isPromotable else { return }
        if configuration.preVote && !transfer {
            becomePreCandidate()
            requestVotes(kind: .preVote, term: Term(term.rawValue + 1), transfer: false)
        } else {
            becomeCandidate()
            requestVotes(kind: .requestVote, term: term, transfer: transfer)
        }
    }

    private func requestVotes(kind: MessageKind, term voteTerm: Term, transfer: Bool) {
        if poll(id, granted: true) == .won {
            winElection()
            return
        }
        for voter in membership.voters where voter != id {
            var message = Message(kind: kind, from: id, to: voter, term: voteTerm)
            message.index = log.lastIndex
            message.logTerm = log.lastTerm
            if transfer { message.context = Self.transferContext }
            send(message)
        }
    }

    private enum ElectionResult { case won, lost, pending }

    private func poll(_ voter: NodeID, granted: Bool) -> ElectionResult {
        if votes[voter] == nil { votes[voter] = granted }
        let yes = membership.voters.filter { votes[$0] == true }.count
        let no = membership.voters.filter { votes[$0] == false }.count
        if yes >= membership.quorum { return .won }
        if no >= membership.quorum { return .lost }
        return .pending
    }

    private func winElection() {
        switch role {
        case .preCandidate:
            becomeCandidate()
            requestVotes(kind: .requestVote, term: term, transfer: false)
        case .candidate:
            becomeLeader()
            broadcastAppend()
        case .follower, .leader:
            break
        }
    }

    // MARK: - Leader duties

    private func tickHeartbeat() {
        leaderTicks += 1
        heartbeatElapsed += 1
        electionElapsed += 1
        if electionElapsed >= configuration.electionTicks {
            electionElapsed = 0
            if configuration.checkQuorum && !quorumRecentlyActive() {
                // Check-quorum (§6.2): without word from a majority for an election timeout, step down.
                becomeFollower(term: term, leader: nil)
                return
            }
            leadTransferee = nil // a transfer that did not finish within an election timeout is abandoned
        }
        guard role == .leader else { return }
        if heartbeatElapsed >= configuration.heartbeatTicks {
            heartbeatElapsed = 0
            broadcastHeartbeat(context: pendingReads.last.map { Self.readContext($0.id) } ?? [])
        }
    }

    /// Whether a majority of voters replied since the last check; resets the marks.
    private func quorumRecentlyActive() -> Bool {
        var active = 0
        for voter in membership.voters {
            if voter == id || progress[voter]?.recentlyActive == true { active += 1 }
        }
        for member in progress.keys { progress[member]?.recentlyActive = false }
        return active >= membership.quorum
    }

    private func proposeEntry(_ entry: Entry) throws(RaftError) {
        switch role {
        case .leader:
            if leadTransferee != nil { throw .leadershipTransferInProgress }
            if entry.kind == .configurationChange {
                guard let change = ConfigurationChange(decoding: entry.data) else { throw .invalidMessage("not a configuration change") }
                try validate(change)
                if pendingConfigurationIndex > configurationAppliedThrough { throw .configurationChangeInProgress }
                // The fix to single-server changes: commit an entry of this term first (dissertation §4.1, 2015 erratum).
                if !committedEntryInCurrentTerm { throw .leaderNotReady }
            }
            if uncommittedSize + entry.size > configuration.uncommittedSizeMax { throw .overloaded }
            appendEntries([entry])
            broadcastAppend()
        case .follower:
            guard let leader else { throw .noLeader }
            var message = Message(kind: .propose, from: id, to: leader, term: .zero)
            message.entries = [entry]
            send(message)
        case .preCandidate, .candidate:
            throw .noLeader
        }
    }

    private func appendEntries(_ entries: [Entry]) {
        var last = log.lastIndex
        var stamped: [Entry] = []
        for var entry in entries {
            last = last.next
            entry.index = last
            entry.term = term
            if entry.kind == .configurationChange { pendingConfigurationIndex = last }
            uncommittedSize += entry.size
            stamped.append(entry)
        }
        log.append(stamped)
    }

    /// Advances the commit index to what a majority has, counting only entries of this term (§5.4.2).
    private func maybeCommit() -> Bool {
        var matches = membership.voters.map { progress[$0]?.matchIndex ?? .zero }
        guard !matches.isEmpty else { return false }
        matches.sort(by: >)
        let candidate = matches[membership.quorum - 1]
        guard candidate > log.committed else { return false }
        guard configuration.faults.commitEntriesOfOlderTerms || (try? log.term(at: candidate)) == term else { return false }
        log.commit(to: candidate)
        uncommittedSize = 0
        applyCommittedConfigurationChanges()
        releaseReadsAwaitingCommit()
        return true
    }

    private func broadcastAppend() {
        for member in membership.all where member != id { _ = maybeSendAppend(to: member, sendIfEmpty: true) }
    }

    private func broadcastHeartbeat(context: [UInt8]) {
        for member in membership.all where member != id {
            guard let entry = progress[member] else { continue }
            var message = Message(kind: .heartbeat, from: id, to: member, term: term)
            message.commit = min(entry.matchIndex, log.committed)
            message.context = context
            message.index = LogIndex(leaderTicks) // echoed back: when the follower last heard from us
            send(message)
            if entry.isSnapshot {
                let waited = (snapshotResendTicks[member] ?? 0) + 1
                snapshotResendTicks[member] = waited
                if waited >= 3, case .snapshot(let metadata, let offset, _) = entry.state {
                    // The chunk or its reply was lost: send it again.
                    progress[member]?.state = .snapshot(metadata, offset: offset, inFlight: false)
                    sendSnapshotChunk(to: member)
                }
            }
        }
    }

    /// Sends AppendEntries to a follower if its flow control allows; returns whether it sent.
    private func maybeSendAppend(to member: NodeID, sendIfEmpty: Bool) -> Bool {
        guard var entry = progress[member], !entry.isPaused(inflightMax: configuration.inflightAppendsMax) else { return false }
        let previous = LogIndex(entry.nextIndex.rawValue - 1)
        let previousTerm: Term
        let entries: [Entry]
        do {
            previousTerm = try log.term(at: previous)
            entries = try log.entries(from: entry.nextIndex, maxSize: configuration.messageSizeMax, maxCount: configuration.messageEntriesMax)
        } catch {
            // The follower needs entries that were compacted: send the snapshot instead (§7).
            entry.becomeSnapshot(log.storage.snapshot)
            progress[member] = entry
            sendSnapshotChunk(to: member)
            return false
        }
        if entries.isEmpty && !sendIfEmpty { return false }
        var message = Message(kind: .appendEntries, from: id, to: member, term: term)
        message.index = previous
        message.logTerm = previousTerm
        message.entries = entries
        message.commit = log.committed
        send(message)
        entry.sentEntries(upTo: entries.last?.index ?? previous, count: entries.count)
        progress[member] = entry
        return true
    }

    /// One last append to a member that was just removed, from what it is known to hold, with the
    /// commit index: a removed node learns its removal committed (it gets nothing more from this
    /// leader). Best effort: lost, or if it lags too far, it learns nothing and stays idle.
    private func sendFarewell(to member: NodeID) {
        guard let entry = progress[member] else { return }
        // Before the member's first answer to this leader (a leader just elected, or handed the
        // lead) its match index is not known: start where the leader probes, which a member that
        // was up to date holds (without this, a removal right after a transfer of leadership
        // told the removed node nothing; found as a flaky test under CI's load).
        let from = entry.matchIndex > .zero ? entry.matchIndex : LogIndex(entry.nextIndex.rawValue &- 1)
        guard from > .zero, let previousTerm = try? log.term(at: from),
              let entries = try? log.entries(from: from.next, maxSize: configuration.messageSizeMax,
                                             maxCount: configuration.messageEntriesMax) else { return }
        var message = Message(kind: .appendEntries, from: id, to: member, term: term)
        message.index = from
        message.logTerm = previousTerm
        message.entries = entries
        message.commit = log.committed
        send(message)
    }

    private func sendSnapshotChunk(to member: NodeID) {
        guard case .snapshot(var metadata, var offset, let inFlight) = progress[member]?.state, !inFlight else { return }
        // A transfer that starts over (the follower lost it, or refused a file that did not
        // verify) starts with the newest snapshot.
        if offset == 0, log.storage.snapshot.index > metadata.index { metadata = log.storage.snapshot }
        let chunk: SnapshotChunk
        do {
            chunk = try log.storage.snapshotChunk(of: metadata, offset: offset, maxSize: configuration.snapshotChunkSizeMax)
        } catch {
            // The storage took a newer snapshot meanwhile: start that one from the beginning.
            metadata = log.storage.snapshot
            offset = 0
            guard let fresh = try? log.storage.snapshotChunk(of: metadata, offset: 0, maxSize: configuration.snapshotChunkSizeMax) else { return }
            chunk = fresh
        }
        var message = Message(kind: .installSnapshot, from: id, to: member, term: term)
        message.snapshot = metadata
        message.snapshotOffset = offset
        message.snapshotData = chunk.data
        message.snapshotDone = chunk.isLast
        send(message)
        progress[member]?.state = .snapshot(metadata, offset: offset, inFlight: true)
        snapshotResendTicks[member] = 0
    }

    // MARK: - Reads (§6.4)

    private func handleReadIndex(context: [UInt8], requester: NodeID, lease: Bool) throws(RaftError) {
        guard committedEntryInCurrentTerm else {
            // A new leader does not know the commit index until it commits an entry of its term.
            guard readsAwaitingCommit.count < configuration.pendingReadsMax else { throw .overloaded }
            readsAwaitingCommit.append((context, requester, lease))
            return
        }
        if membership.voters == [id] || (lease && leaseIsValid) {
            respondToRead(index: log.committed, context: context, requester: requester)
            return
        }
        guard pendingReads.count < configuration.pendingReadsMax else { throw .overloaded }
        let request = ReadRequest(id: nextReadID, index: log.committed, context: context, requester: requester, acknowledged: [id])
        nextReadID += 1
        pendingReads.append(request)
        broadcastHeartbeat(context: Self.readContext(request.id))
    }

    /// Whether the leader's lease holds (dissertation §6.4.1): a majority of voters acknowledged a
    /// heartbeat sent less than an election timeout ago (with two ticks of margin for the phase of
    /// the followers' clocks), so none of them can have started an election since; and no transfer
    /// is under way (its vote requests bypass the followers' lease). Assumes clocks that tick at
    /// the same rate within that margin.
    private var leaseIsValid: Bool {
        guard configuration.checkQuorum, leadTransferee == nil else { return false }
        var sent = membership.voters.map { $0 == id ? leaderTicks : (heartbeatAcknowledged[$0] ?? 0) }
        guard sent.count >= membership.quorum else { return false }
        sent.sort(by: >)
        let quorumSent = sent[membership.quorum - 1]
        return quorumSent > 0 && leaderTicks + 2 < quorumSent + UInt64(configuration.electionTicks)
    }

    /// The heartbeat context that stands for a pending read.
    static func readContext(_ id: UInt64) -> [UInt8] {
        var writer = ByteWriter(capacity: 8)
        writer.write(id)
        return writer.bytes
    }

    private func releaseReadsAwaitingCommit() {
        guard committedEntryInCurrentTerm, !readsAwaitingCommit.isEmpty else { return }
        let waiting = readsAwaitingCommit
        readsAwaitingCommit = []
        for read in waiting {
            do { try handleReadIndex(context: read.context, requester: read.requester, lease: read.lease) } catch {
                // Over the limit: the read is dropped and its caller times out, as with a lost message.
                continue
            }
        }
    }

    private func acknowledgeRead(context: [UInt8], from member: NodeID) {
        var reader = ByteReader(context)
        guard let readID = try? reader.readUInt64(), reader.isAtEnd,
              let position = pendingReads.firstIndex(where: { $0.id == readID }) else { return }
        pendingReads[position].acknowledged.insert(member)
        let votes = membership.voters.filter { pendingReads[position].acknowledged.contains($0) }.count
        guard votes >= membership.quorum else { return }
        // A heartbeat round that confirms this read confirms every earlier one too.
        for read in pendingReads[...position] { respondToRead(index: read.index, context: read.context, requester: read.requester) }
        pendingReads.removeFirst(position + 1)
    }

    private func respondToRead(index: LogIndex, context: [UInt8], requester: NodeID) {
        if requester == id {
            readStates.append(ReadState(index: index, context: context))
        } else {
            var message = Message(kind: .readIndexResponse, from: id, to: requester, term: term)
            message.index = index
            message.context = context
            send(message)
        }
    }

    // MARK: - Membership (applied at commit)

    private func applyCommittedConfigurationChanges() {
        guard log.committed > configurationAppliedThrough else { return }
        var from = configurationAppliedThrough.next
        if from < log.firstIndex {
            // Compacted into the snapshot the log now starts from.
            membership = log.unstableSnapshot?.membership ?? log.storage.snapshot.membership
            from = log.firstIndex
        }
        var changed = false
        while from <= log.committed {
            guard let batch = try? log.entries(from: from, maxSize: 1 << 20, maxCount: 256), let last = batch.last else { break }
            for entry in batch where entry.kind == .configurationChange {
                if let change = ConfigurationChange(decoding: entry.data) {
                    membership = membership.applying(change)
                    changed = true
                }
            }
            from = last.index.next
        }
        configurationAppliedThrough = log.committed
        if changed { membershipChanged() }
    }

    private func membershipChanged() {
        guard role == .leader else {
            if !membership.isVoter(id) && (role == .candidate || role == .preCandidate) { becomeFollower(term: term, leader: nil) }
            return
        }
        if !membership.isVoter(id) {
            // This leader was removed; the others elect a new one.
            becomeFollower(term: term, leader: nil)
            return
        }
        for member in membership.all where progress[member] == nil {
            var entry = Progress(nextIndex: log.lastIndex.next, isLearner: membership.isLearner(member))
            entry.recentlyActive = true
            progress[member] = entry
        }
        for member in Array(progress.keys) where !membership.contains(member) {
            sendFarewell(to: member)
            progress[member] = nil
        }
        if let transferee = leadTransferee, !membership.isVoter(transferee) { leadTransferee = nil }
        if maybeCommit() { broadcastAppend() }
        broadcastAppend()
    }

    // MARK: - Messages

    private func send(_ message: Message) {
        messages.append(message)
    }

    private func respond(to message: Message, kind: MessageKind, term responseTerm: Term? = nil, build: (inout Message) -> Void = { _ in }) {
        var response = Message(kind: kind, from: id, to: message.from, term: responseTerm ?? term)
        build(&response)
        send(response)
    }

    /// The largest term or index a message may carry (so `+ 1` never overflows).
    static let numberMax: UInt64 = 1 << 62

    /// Whether a message from the network is well formed; anything else is dropped, never trapped on.
    func isWellFormed(_ message: Message) -> Bool {
        let limit = Self.numberMax
        guard message.from.rawValue != 0, message.term.rawValue <= limit, message.logTerm.rawValue <= limit,
              message.index.rawValue <= limit, message.commit.rawValue <= limit, message.rejectHint.rawValue <= limit,
              message.snapshotOffset >= 0, message.snapshotOffset <= Int(Int32.max),
              message.entries.count <= configuration.messageEntriesMax * 4 else { return false }
        if let snapshot = message.snapshot, snapshot.index.rawValue > limit || snapshot.term.rawValue > limit { return false }
        switch message.kind {
        case .appendEntries:
            // Entries follow the previous index one by one, and none is newer than the sender's term.
            for (offset, entry) in message.entries.enumerated() {
                guard entry.index.rawValue == message.index.rawValue + UInt64(offset) + 1, entry.term <= message.term else { return false }
            }
        case .propose:
            guard message.entries.allSatisfy({ $0.data.count <= configuration.messageSizeMax }) else { return false }
        case .appendEntriesResponse, .requestVote, .requestVoteResponse, .preVote, .preVoteResponse, .heartbeat,
             .heartbeatResponse, .installSnapshot, .installSnapshotResponse, .timeoutNow, .readIndex, .readIndexResponse:
            guard message.entries.isEmpty else { return false }
        }
        return true
    }

    private func stepMessage(_ message: Message) {
        guard message.to == id, message.from != id, isWellFormed(message) else { return }
        if message.term == .zero {
            // Local relays (proposals and read requests forwarded by followers) carry no term.
            guard message.kind == .propose || message.kind == .readIndex else { return }
        } else if message.term > term {
            if message.kind == .requestVote || message.kind == .preVote {
                let forced = message.context == Self.transferContext
                let inLease = configuration.checkQuorum && leader != nil && electionElapsed < configuration.electionTicks
                // Check-quorum's lease (§4.2.3): a node that hears from a leader ignores disruptive candidates.
                if !forced && inLease { return }
            }
            switch message.kind {
            case .preVote:
                break // a pre-vote never changes anyone's term
            case .preVoteResponse where !message.reject:
                break // granted for the term we would campaign in; counted below
            case .appendEntries, .heartbeat, .installSnapshot:
                becomeFollower(term: message.term, leader: message.from)
            default:
                becomeFollower(term: message.term, leader: nil)
            }
        } else if message.term < term {
            if (configuration.checkQuorum || configuration.preVote) && (message.kind == .appendEntries || message.kind == .heartbeat) {
                // Tell a stale leader about the newer term so it steps down (etcd's answer to §9.6's liveness issue).
                respond(to: message, kind: .appendEntriesResponse)
            } else if message.kind == .preVote {
                respond(to: message, kind: .preVoteResponse) { $0.reject = true }
            }
            return
        }

        switch message.kind {
        case .requestVote, .preVote:
            handleVoteRequest(message)
            return
        default:
            break
        }
        switch role {
        case .leader: stepLeader(message)
        case .candidate, .preCandidate: stepCandidate(message)
        case .follower: stepFollower(message)
        }
    }

    private func handleVoteRequest(_ message: Message) {
        let isPreVote = message.kind == .preVote
        let canVote = votedFor == message.from
            || (votedFor == nil && leader == nil)
            || (isPreVote && message.term > term)
            || (configuration.faults.voteTwiceInTerm && role == .follower)
        let responseKind: MessageKind = isPreVote ? .preVoteResponse : .requestVoteResponse
        // A node answers vote requests even when it is not a voter in its own configuration
        // (dissertation §4.1): a removed leader's vote may be needed by those that do not yet
        // know of the removal. The candidate counts only the voters of its configuration.
        if canVote && log.isUpToDate(lastIndex: message.index, lastTerm: message.logTerm) {
            // A granted pre-vote answers in the term asked about, so the pre-candidate can count it.
            respond(to: message, kind: responseKind, term: message.term)
            if !isPreVote {
                electionElapsed = 0
                votedFor = message.from
            }
        } else {
            respond(to: message, kind: responseKind) { $0.reject = true }
        }
    }

    private func stepLeader(_ message: Message) {
        switch message.kind {
        case .propose:
            guard leadTransferee == nil else { return }
            for entry in message.entries {
                // Forwarded proposals get the same checks as local ones; refused ones are dropped
                // (the proposer's caller times out, as with a lost message).
                do { try proposeEntry(entry) } catch { continue }
            }
        case .readIndex:
            do { try handleReadIndex(context: message.context, requester: message.from, lease: message.leaseRead) } catch {
                return // over the limit: dropped, the follower's caller times out
            }
        case .appendEntriesResponse:
            handleAppendResponse(message)
        case .heartbeatResponse:
            guard progress[message.from] != nil else { return }
            progress[message.from]?.recentlyActive = true
            progress[message.from]?.probeSent = false
            if message.index.rawValue <= leaderTicks {
                heartbeatAcknowledged[message.from] = max(heartbeatAcknowledged[message.from] ?? 0, message.index.rawValue)
            }
            // A reply proves the follower is reachable again: if its window of unanswered appends
            // is full (they were lost), free the oldest slot so replication resumes (etcd does the same).
            progress[message.from]?.freeOldestInflightIfFull(configuration.inflightAppendsMax)
            if let entry = progress[message.from], entry.matchIndex < log.lastIndex { _ = maybeSendAppend(to: message.from, sendIfEmpty: true) }
            if !message.context.isEmpty { acknowledgeRead(context: message.context, from: message.from) }
        case .installSnapshotResponse:
            handleSnapshotResponse(message)
        case .appendEntries, .heartbeat, .installSnapshot, .timeoutNow, .readIndexResponse,
             .requestVote, .preVote, .requestVoteResponse, .preVoteResponse:
            // Another leader in this term is impossible unless election safety broke; ignore.
            return
        }
    }

    private func handleAppendResponse(_ message: Message) {
        guard var entry = progress[message.from] else { return }
        entry.recentlyActive = true
        if message.reject {
            var hint = message.rejectHint
            if message.logTerm > .zero { hint = log.findConflictByTerm(index: message.rejectHint, term: message.logTerm) }
            if entry.maybeDecrease(rejected: message.index, hint: hint) {
                if entry.state == .replicate { entry.becomeProbe() }
                progress[message.from] = entry
                _ = maybeSendAppend(to: message.from, sendIfEmpty: true)
            } else {
                progress[message.from] = entry
            }
            return
        }
        let wasPaused = entry.isPaused(inflightMax: configuration.inflightAppendsMax)
        // A follower cannot match past what this leader has: such a reply is stale or forged.
        guard message.index <= log.lastIndex, entry.maybeUpdate(message.index) else {
            progress[message.from] = entry
            return
        }
        switch entry.state {
        case .probe:
            entry.becomeReplicate()
        case .snapshot(let metadata, _, _):
            if entry.matchIndex >= metadata.index { entry.becomeProbe() }
        case .replicate:
            break
        }
        progress[message.from] = entry
        if maybeCommit() {
            broadcastAppend()
        } else if wasPaused {
            _ = maybeSendAppend(to: message.from, sendIfEmpty: false)
        }
        while maybeSendAppend(to: message.from, sendIfEmpty: false) {}
        if message.from == leadTransferee, progress[message.from]?.matchIndex == log.lastIndex {
            send(Message(kind: .timeoutNow, from: id, to: message.from, term: term))
        }
    }

    private func handleSnapshotResponse(_ message: Message) {
        guard case .snapshot(let metadata, _, _) = progress[message.from]?.state, message.snapshot == metadata else { return }
        progress[message.from]?.recentlyActive = true
        if message.reject {
            progress[message.from]?.becomeProbe()
            _ = maybeSendAppend(to: message.from, sendIfEmpty: true)
        } else if message.index >= metadata.index {
            guard message.index <= log.lastIndex else { return }
            // Installed (or already had it): replicate from after it.
            _ = progress[message.from]?.maybeUpdate(message.index)
            progress[message.from]?.becomeProbe()
            _ = maybeSendAppend(to: message.from, sendIfEmpty: true)
        } else {
            progress[message.from]?.state = .snapshot(metadata, offset: message.snapshotOffset, inFlight: false)
            sendSnapshotChunk(to: message.from)
        }
    }

    private func stepCandidate(_ message: Message) {
        switch message.kind {
        case .appendEntries, .heartbeat, .installSnapshot:
            // A leader for this term exists (§5.2): follow it.
            becomeFollower(term: message.term, leader: message.from)
            stepFollower(message)
        case .requestVoteResponse where role == .candidate, .preVoteResponse where role == .preCandidate:
            switch poll(message.from, granted: !message.reject) {
            case .won: winElection()
            case .lost: becomeFollower(term: term, leader: nil)
            case .pending: break
            }
        case .requestVoteResponse, .preVoteResponse, .propose, .readIndex, .readIndexResponse, .timeoutNow,
             .appendEntriesResponse, .heartbeatResponse, .installSnapshotResponse, .requestVote, .preVote:
            return
        }
    }

    private func stepFollower(_ message: Message) {
        switch message.kind {
        case .appendEntries:
            electionElapsed = 0
            leader = message.from
            handleAppendEntries(message)
        case .heartbeat:
            electionElapsed = 0
            leader = message.from
            log.commit(to: min(message.commit, log.lastIndex))
            respond(to: message, kind: .heartbeatResponse) {
                $0.context = message.context
                $0.index = message.index
            }
        case .installSnapshot:
            electionElapsed = 0
            leader = message.from
            handleSnapshotChunk(message)
        case .propose, .readIndex:
            guard let leader else { return } // no leader: dropped, the caller times out
            // A read request relayed by another node that took this one for the leader is dropped:
            // the answer must go back to the node that asked, which a message from here cannot say
            // (peers accept only messages from the node they are connected to). The asker learns
            // the leader from its next heartbeat and fails its waiting reads then.
            if message.kind == .readIndex, message.from != id { return }
            // A proposal another node relayed here is dropped too (its caller's outcome is unknown,
            // as for any proposal that times out). Passed on, a stale one — queued in a link while
            // its target was down, delivered to the target's next incarnation — commits long after
            // its caller gave up: found by `keel torture`, a REMOVE retried elsewhere removed the
            // member that had since joined again under the same id.
            if message.kind == .propose, message.from != id { return }
            var forwarded = message
            forwarded.from = id
            forwarded.to = leader
            send(forwarded)
        case .readIndexResponse:
            readStates.append(ReadState(index: message.index, context: message.context))
        case .timeoutNow:
            // Leadership transfer (§3.10): campaign at once, skipping pre-vote.
            if isPromotable { startElection(transfer: true) }
        case .appendEntriesResponse, .heartbeatResponse, .installSnapshotResponse, .requestVoteResponse, .preVoteResponse,
             .requestVote, .preVote:
            return
        }
    }

    private func handleAppendEntries(_ message: Message) {
        if message.index < log.committed {
            respond(to: message, kind: .appendEntriesResponse) { $0.index = self.log.committed }
            return
        }
        if let lastNew = log.maybeAppend(index: message.index, logTerm: message.logTerm, committed: message.commit, entries: message.entries) {
            respond(to: message, kind: .appendEntriesResponse) { $0.index = lastNew }
            return
        }
        // Fast backtracking: point the leader at the last index whose term is at most the one it asked about.
        let hintIndex = log.findConflictByTerm(index: min(message.index, log.lastIndex), term: message.logTerm)
        let hintTerm = (try? log.term(at: hintIndex)) ?? .zero
        respond(to: message, kind: .appendEntriesResponse) {
            $0.reject = true
            $0.index = message.index
            $0.rejectHint = hintIndex
            $0.logTerm = hintTerm
        }
    }

    private func handleSnapshotChunk(_ message: Message) {
        guard let metadata = message.snapshot else { return }
        if metadata.index <= log.committed {
            // Already have everything it covers.
            incomingSnapshot = nil
            respond(to: message, kind: .installSnapshotResponse) {
                $0.snapshot = metadata
                $0.index = self.log.committed
            }
            return
        }
        if incomingSnapshot?.metadata != metadata {
            guard message.snapshotOffset == 0 else {
                // A chunk from the middle of another snapshot (a delayed message, or a transfer
                // this node lost track of): keep what is under way and ask for this one's start.
                respond(to: message, kind: .installSnapshotResponse) { $0.snapshot = metadata }
                return
            }
            incomingSnapshot = (metadata, 0)
        }
        guard let incoming = incomingSnapshot, incoming.received == message.snapshotOffset else {
            // Out of order or a restart: tell the leader where to resume.
            let expected = incomingSnapshot?.received ?? 0
            respond(to: message, kind: .installSnapshotResponse) {
                $0.snapshot = metadata
                $0.snapshotOffset = expected
            }
            return
        }
        incomingChunks.append(IncomingSnapshotChunk(metadata: metadata, offset: message.snapshotOffset, data: message.snapshotData))
        let received = incoming.received + message.snapshotData.count
        incomingSnapshot = (metadata, received)
        var installedIndex = LogIndex.zero
        if message.snapshotDone {
            incomingSnapshot = nil
            if log.matchTerm(metadata.index, metadata.term) {
                log.commit(to: metadata.index) // the log already holds it: no need to install
            } else {
                log.restore(metadata)
                membership = metadata.membership
                configurationAppliedThrough = metadata.index
            }
            installedIndex = metadata.index
        }
        respond(to: message, kind: .installSnapshotResponse) {
            $0.snapshot = metadata
            $0.snapshotOffset = received
            $0.index = installedIndex
        }
    }

    private func afterInput() {
        applyCommittedConfigurationChanges()
        if role == .leader { releaseReadsAwaitingCommit() }
    }

    // MARK: - Invariants

    /// Traps if an internal invariant is broken. Tests call it after every step.
    public func checkInvariants() {
        let problems = invariantViolations()
        precondition(problems.isEmpty, "raft invariant broken on node \(id): \(problems.joined(separator: "; "))")
    }

    /// The internal invariants that do not hold (empty when all do). The simulator calls it after
    /// every step and reports what it returns, so that a deliberate fault is reported, not trapped.
    public func invariantViolations() -> [String] {
        var problems: [String] = []
        func require(_ condition: Bool, _ message: @autoclosure () -> String) {
            if !condition { problems.append(message()) }
        }
        require(log.applied <= log.committed, "applied \(log.applied) > committed \(log.committed)")
        require(log.committed <= log.lastIndex, "committed \(log.committed) > last index \(log.lastIndex)")
        require(log.committed >= highestCommitSeen, "the commit index went back from \(highestCommitSeen) to \(log.committed)")
        highestCommitSeen = max(highestCommitSeen, log.committed)
        require(term >= previousHardState.term, "the term went backwards")
        switch role {
        case .leader:
            require(leader == id, "a leader must know it leads")
            require(votedFor == id, "a leader voted for itself")
            for member in membership.all {
                guard let entry = progress[member] else {
                    problems.append("no progress for member \(member)")
                    continue
                }
                require(entry.matchIndex < entry.nextIndex, "match \(entry.matchIndex) >= next \(entry.nextIndex) for \(member)")
                require(entry.matchIndex <= log.lastIndex, "match past the leader's log for \(member)")
            }
            require(progress.keys.allSatisfy { membership.contains($0) }, "progress for a non-member")
        case .candidate:
            require(votedFor == id, "a candidate votes for itself")
            require(leader == nil, "a candidate knows no leader")
        case .preCandidate:
            require(leader == nil, "a pre-candidate knows no leader")
        case .follower:
            break
        }
        return problems
    }
}
