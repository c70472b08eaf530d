// A Keel node: Raft on the storage engine's log, talking to its peers over TCP.
//
// One event loop owns the node: the Raft core and the waiting callers are touched only there,
// and the state machine too, but for a leader's large batches of committed entries, which its
// apply thread applies (in order, under `machineLock`) while the loop goes on. The loop follows
// the Ready order (Ready.swift):
//   1. persist entries and hard state: handed to the storage queue and the log's writer thread
//      (never on the loop); the loop takes no new Ready until that write is durable. A leader
//      sends its appends and heartbeats *while* they are written (dissertation §10.2.1): the core
//      counts the leader's own copy only once it is durable, so commitment still needs a
//      majority of durable copies;
//   2. send the other messages (votes and replies wait for the write);
//   3. apply committed entries in order, each once, and answer the callers waiting for them;
//      serve reads whose index is applied;
//   4. advance.
// A timer ticks the core. A failed fsync stops the node: it stops taking part and says why.
//
// Storage: a Ready of entries and hard state is queued straight to the log's writer thread (the
// call does not block); snapshot chunks, installs and checkpoints run on the storage queue.
//
// Snapshots: after `snapshotInterval` applied entries or `snapshotLogBytes` of log, once the log
// has also grown by `snapshotLogGrowthPercent` of the last checkpoint (or on `checkpoint()`), the state machine's
// O(1) snapshot is taken on the loop and written as a checkpoint on the storage queue, and the log
// is compacted; a follower that needs compacted entries receives the checkpoint file in chunks,
// installs it once it verifies, and restores the state machine from it. A received snapshot that
// does not verify is dropped and the core restarts from what is durable (as after a crash), so the
// transfer starts again from its first byte.
//
// Membership: a change's entry carries the member's peer address (ChangeContext), so every node
// learns where a new member listens from the log; snapshots carry the addresses too.

import DequeModule
import Dispatch
import KeelCore
import KeelRaft
import KeelStorage
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// A running node of a Keel cluster: a replicated, durable `StateMachine`.
///
/// ```swift
/// let node = try await KeelNode.start(configuration: configuration, machine: Counter(), group: group)
/// let result = try await node.propose(Array("add 5".utf8))      // once committed and applied
/// let value = try await node.read(consistency: .linearizable) { $0.value }
/// await node.shutdown()
/// ```
///
/// Every call may be made from any task; the node does its work on one event loop. Calls throw
/// `NodeError`.
public final class KeelNode<Machine: StateMachine>: @unchecked Sendable {
    // @unchecked Sendable: every mutable field below is touched only on `loop` (public calls hop
    // onto it); `transport`, `storage` and `configuration` are set once.
    public let configuration: NodeConfiguration
    let loop: any EventLoop
    private var raft: RaftNode
    let storage: DurableRaftStorage
    let machine: Machine
    private var transport: PeerTransport!
    /// Where the transport delivers messages: this node until it shuts down (a strong reference,
    /// not a weak one: a weak reference gives an object a side table, and every retain and
    /// release of it then takes the runtime's slow path; the node is retained on every request).
    private let delivery = NIOLockedValueBox<KeelNode?>(nil)
    /// Held while the state machine changes (on the loop, or on the apply thread) and by
    /// `readDirectly` while it reads it; guards `directApplied`.
    private let machineLock = NIOLock()
    /// Guards `directReadsAllowed` and `directCommit` (written on the loop only, read by
    /// `readDirectly` under `machineLock`). Not `machineLock` itself: the loop raises the commit
    /// index with every Ready, and would wait there while the apply thread applies a batch.
    private let directLock = NIOLock()
    /// This node is the only voter and leads, and serves: its applied state is linearizable once
    /// it has applied everything it committed.
    private var directReadsAllowed = false
    /// A `process()` is due on the next turn of the loop (see `startProposal`).
    private var processScheduled = false
    /// The newest entry applied to the machine (it trails `appliedIndex` by the entry being applied).
    private var directApplied = LogIndex.zero
    /// The newest commit index anything outside the loop may have learned (set before a Ready's
    /// messages go out: a learner applies and acknowledges entries only once it knows them committed).
    private var directCommit = LogIndex.zero
    let logger: Logger
    private var persisting = false
    private var stopped: String?
    private var closing = false
    private var removed = false
    private var wasMember: Bool
    private var ticker: RepeatedTask?
    private var role = Role.follower
    private var leader: NodeID?
    /// The hard state as last made durable (messages may go out before a write only if it keeps
    /// the term and vote).
    private var persistedHardState: HardState
    private var nextRequest: UInt64 = 1
    /// Distinguishes this run's requests from an earlier run's still in the log (request ids
    /// restart at 1 after a restart).
    private let run = UInt64.random(in: 1...UInt64.max)
    private var writes: [UInt64: WriteWaiter] = [:]
    /// Above zero while the node does its own work (a tick, a message, a Ready and its write's
    /// completion), during which waiters' callbacks run: a call made from such a callback is
    /// started on a later turn of the loop, never inside that work.
    private var working = 0
    /// Set when a write failed for a full disk, until this node leads again.
    private var diskFull = false
    /// Whether a call on the loop may start at once.
    private var mayStartInline: Bool { loop.inEventLoop && working == 0 }
    /// When each proposal and read times out, in request order (so in deadline order); the
    /// ticker fails the expired ones (one scheduled task per request would cost a timer-heap
    /// insertion each).
    private var deadlines = Deque<(deadline: NIODeadline, request: UInt64)>()
    /// Proposals not yet handed to Raft (see `startProposal`).
    private var proposalBuffer: [(data: [UInt8], request: UInt64)] = []
    /// The leader each proposal and read was handed to (this node, or the one it forwarded to).
    private var handedTo: [UInt64: NodeID] = [:]
    /// A leader this node stopped following in the Ready being handled: what was handed to it
    /// and is still unanswered is failed once the Ready's committed entries are applied.
    private var lostLeader: NodeID?
    /// A hard state whose only change was the commit index, not yet written (see `process`).
    private var unwrittenHardState: HardState?
    /// The snapshot index last rewritten because its file failed verification (once per index).
    private var rewroteDamaged: LogIndex?
    private var changes: [UInt64: EventLoopPromise<Void>] = [:]
    /// Reads by request id, from the call until they are served or time out.
    private var reads: [UInt64: Waiter<LogIndex>] = [:]
    /// Reads whose index is known, waiting for it to be applied.
    private var readsAwaitingApply: [(index: LogIndex, request: UInt64)] = []
    private var transfer: (target: NodeID, promise: EventLoopPromise<Void>)?
    private var checkpointWaiters: [EventLoopPromise<LogIndex>] = []
    private(set) var appliedIndex: LogIndex
    /// The membership as of `appliedIndex` (configuration entries applied in order), for snapshots.
    private var appliedMembership: Membership
    /// Where members listen for peers.
    private var addresses: [NodeID: PeerAddress]
    /// A promotion this node (as leader) proposed and has not seen applied, with the tick it expires.
    private var promoting: (node: NodeID, untilTick: UInt64)?
    private var ticks: UInt64 = 0
    /// Set when a Ready is handed to storage: its entries are this leader's own and were sent to
    /// no one (a full disk may then refuse them).
    private var writeIsOwnUnsent = false
    /// The tick of the last full-disk warning logged.
    private var lastFullDiskWarning: UInt64?
    /// Storage work that may block (snapshot files, install): never on the loop.
    let storageQueue = DispatchQueue(label: "keel.node.storage")
    /// Where large batches of committed commands are applied, off the loop (see `applyEntries`).
    private let applyQueue = DispatchQueue(label: "keel.node.apply")
    /// Batches handed to `applyQueue` and not yet finished on the loop. While any is, the state
    /// machine may be ahead of `appliedIndex` (never behind it), so nothing that needs the two to
    /// agree (a snapshot, a restart of the core) happens before `drainApplies`.
    private var applying = 0
    /// Batches `applyQueue` has applied, with their results, for the loop to finish in order.
    private let appliedOffLoop = NIOLockedValueBox<[(entries: [Entry], results: [[UInt8]?])]>([])
    private var snapshotting = false
    /// The log's bytes written (since it opened) when the last snapshot started or a received one
    /// was installed. At start, the bytes written so far minus those the log holds after the
    /// checkpoint it recovered from, so the growth since that checkpoint counts what was written
    /// before a restart too (wrapping arithmetic).
    private var logBytesAtSnapshot: UInt64 = 0
    private var rejectedSnapshots = 0

    /// Starts a node: recovers its state from its data directory (newest checkpoint, then the
    /// log), listens for peers, and starts ticking. A single-member cluster elects itself at once.
    ///
    /// - Parameters:
    ///   - configuration: the settings (checked with `NodeConfiguration.validate()`).
    ///   - machine: the state machine, empty; it is restored from the newest checkpoint.
    ///   - group: the event loops the node and its connections run on.
    ///   - fileSystem: where the data directory lives (tests pass a `SimulatedFileSystem` to
    ///     inject faults).
    /// - Throws: `NodeError.invalidArgument` for bad settings, `StorageError` when the data
    ///   directory cannot be recovered (it names the damage and the command that repairs it), or
    ///   a bind error when the peer port is taken.
    public static func start(configuration: NodeConfiguration, machine: Machine, group: any EventLoopGroup,
                             logger: Logger = Logger(label: "keel.node"),
                             fileSystem: any FileSystem = POSIXFileSystem()) async throws -> KeelNode {
        try configuration.validate()
        // The membership lives in the log and in snapshots only (never recomputed from `members`
        // after the founding): a new cluster's founding voters are its first log entries.
        let (storage, state) = try DurableRaftStorage.open(path: configuration.dataDirectory, options: configuration.log,
                                                           initialMembership: Membership(voters: []), fileSystem: fileSystem,
                                                           allowUnsyncedLog: configuration.allowUnsyncedLog)
        let raft: RaftNode
        var addresses = configuration.members
        do {
            if !configuration.join, storage.snapshot.index == .zero, storage.hardState.term == .zero {
                try await found(storage, voters: configuration.members.keys.sorted())
            }
            if let state {
                let (known, machineState) = try NodeSnapshotDecoding.decode(state)
                // The configured addresses win over the snapshot's (an operator may have moved a member).
                addresses = known.merging(configuration.members) { _, configured in configured }
                try machine.restore(from: machineState)
            }
            raft = try RaftNode(configuration: configuration.raft, storage: storage, randomSeed: UInt64.random(in: 1...UInt64.max),
                                applied: storage.snapshot.index)
        } catch {
            storage.close()
            throw error
        }
        let node = KeelNode(configuration: configuration, loop: group.next(), raft: raft, storage: storage, machine: machine,
                            addresses: addresses, logger: logger)
        node.delivery.withLockedValue { $0 = node }
        node.transport = PeerTransport(
            configuration: PeerTransportConfiguration(node: configuration.node, listen: configuration.members[configuration.node]!,
                                                      clusterToken: configuration.clusterToken),
            peers: dialTable(addresses, configuration), group: group, logger: logger
        ) { [delivery = node.delivery] message in
            guard let node = delivery.withLockedValue({ $0 }) else { return }
            node.loop.execute { node.receive(message) }
        }
        do { try await node.transport.start() } catch {
            node.delivery.withLockedValue { $0 = nil }
            storage.close()
            throw error
        }
        try await node.loop.submit {
            node.ticker = node.loop.scheduleRepeatedTask(initialDelay: .milliseconds(configuration.tickMilliseconds),
                                                         delay: .milliseconds(configuration.tickMilliseconds)) { _ in
                node.tick()
            }
            if node.raft.status.membership.voters == [configuration.node] { node.raft.campaign() }
            node.process()
        }.get()
        return node
    }

    /// Writes a new cluster's founding: one "add voter" entry per founding member (index 1...n,
    /// term 1, in id order, so every founder writes the same bytes) and a hard state that commits
    /// them. Written again if a crash cut it short: a node whose hard state is still at term 0
    /// has voted for no one and acknowledged nothing.
    private static func found(_ storage: DurableRaftStorage, voters: [NodeID]) async throws {
        let entries = voters.enumerated().map { position, voter in
            Entry(index: LogIndex(UInt64(position + 1)), term: Term(1), kind: .configurationChange,
                  data: ConfigurationChange(.addVoter, voter).encoded)
        }
        try await storage.persist(entries: entries, hardState: HardState(term: Term(1), votedFor: nil, commit: LogIndex(UInt64(voters.count))))
    }

    init(configuration: NodeConfiguration, loop: any EventLoop, raft: RaftNode, storage: DurableRaftStorage,
         machine: Machine, addresses: [NodeID: PeerAddress], logger: Logger) {
        self.configuration = configuration
        self.loop = loop
        self.raft = raft
        self.storage = storage
        self.machine = machine
        self.addresses = addresses
        self.logger = logger
        appliedIndex = storage.snapshot.index
        appliedMembership = storage.snapshot.membership
        persistedHardState = storage.hardState
        logBytesAtSnapshot = storage.log.bytesWritten &- storage.log.bytes(after: storage.snapshot.index)
        // Judged by what is applied: a new node applying the founding entries one by one is not
        // "removed" by the first of them.
        wasMember = appliedMembership.contains(configuration.node)
        // A node that was removed before it restarted (a joiner is not a member until its
        // addition is applied, so it is not judged before that).
        removed = !configuration.join && !raft.status.membership.contains(configuration.node)
    }

    // MARK: - Calls

    /// Proposes a command; returns the state machine's result once the command is committed (on
    /// a majority's disks) and applied on this node. Any node takes proposals (followers forward
    /// them to the leader).
    ///
    /// - Throws: `NodeError.noLeader` (try again), `.timedOut` (the outcome is unknown: the command
    ///   may still commit), `.notMember`, `.shuttingDown`, `.storageFailed`.
    public func propose(_ command: [UInt8]) async throws -> [UInt8] {
        let promise = loop.makePromise(of: [UInt8].self)
        loop.execute { self.startProposal(command, WriteWaiter(promise)) }
        return try await Self.wait(promise.futureResult)
    }

    /// `propose` for callers on event loops: the future completes on the node's loop.
    public func proposeFuture(_ command: [UInt8]) -> EventLoopFuture<[UInt8]> {
        let promise = loop.makePromise(of: [UInt8].self)
        loop.execute { self.startProposal(command, WriteWaiter(promise)) }
        return promise.futureResult
    }

    /// `propose` for callers on event loops, without futures (a server's hot path):
    /// `completion` runs on the node's loop, once. Called on the node's loop, the proposal is
    /// taken at once (called from another call's completion, on the next turn of the loop).
    public func propose(_ command: [UInt8], completion: @escaping @Sendable (Result<[UInt8], NodeError>) -> Void) {
        let waiter = WriteWaiter(completion)
        if mayStartInline { startProposal(command, waiter) } else { loop.execute { self.startProposal(command, waiter) } }
    }

    /// Runs `body` on the node's loop with the state machine and the index it has applied, without
    /// asking Raft (a local read of this replica, for diagnostics that compare replicas).
    public func inspect<T: Sendable>(_ body: @escaping @Sendable (Machine, LogIndex) -> T) -> EventLoopFuture<T> {
        loop.submit {
            // The machine and the index agree only once what is applied off the loop is finished.
            self.drainApplies()
            return body(self.machine, self.appliedIndex)
        }
    }

    /// `read` for callers on event loops: the future completes on the node's loop.
    public func readFuture<T: Sendable>(consistency: Consistency = .linearizable,
                                        _ body: @escaping @Sendable (Machine) -> T) -> EventLoopFuture<T> {
        @Sendable func run() throws -> T {
            if let error = self.refusal() { throw error }
            return self.machineLock.withLock { body(self.machine) }
        }
        if consistency == .local { return loop.submit { try run() } }
        let promise = loop.makePromise(of: LogIndex.self)
        loop.execute { self.startRead(Waiter(promise), lease: consistency == .lease) }
        return promise.futureResult.flatMapThrowing { _ in try run() }
    }

    /// `read` for callers on event loops, without futures: `body` and then `completion` run on
    /// the node's loop. Called on the node's loop, the read is taken at once (a `.local` read,
    /// or one a sole voter can answer, then completes before the call returns).
    public func read<T>(consistency: Consistency = .linearizable, _ body: @escaping @Sendable (Machine) -> T,
                        completion: @escaping @Sendable (Result<T, NodeError>) -> Void) {
        let start: @Sendable () -> Void = {
            let finish: @Sendable (Result<LogIndex, NodeError>) -> Void = { result in
                switch result {
                case .success:
                    if let error = self.refusal() { return completion(.failure(error)) }
                    completion(.success(self.machineLock.withLock { body(self.machine) }))
                case .failure(let error):
                    completion(.failure(error))
                }
            }
            if consistency == .local { return finish(.success(self.appliedIndex)) }
            self.startRead(Waiter(finish), lease: consistency == .lease)
        }
        if mayStartInline { start() } else { loop.execute(start) }
    }

    /// Runs `body` on the state machine at once, on the calling thread, when that is a
    /// linearizable read: this node is the cluster's only voter, leads, and has applied every
    /// entry it committed (so every write any node acknowledged is in the state, and no other
    /// node can commit one). Otherwise nil: use `read`. A server's connections on other event
    /// loops read this way without a hop to the node's loop.
    ///
    /// `body` runs under a lock the node's loop takes to apply each entry: keep it short, and do
    /// not keep references to the state.
    public func readDirectly<T>(_ body: (Machine) -> T) -> T? {
        machineLock.withLock {
            // A commit index raised just after this look is one whose new entries no caller has
            // been answered for yet (they are answered once applied, and applying needs this lock).
            let (allowed, commit) = directLock.withLock { (directReadsAllowed, directCommit) }
            guard allowed, directApplied >= commit else { return nil }
            return body(machine)
        }
    }

    /// Whether `readDirectly` may answer (on the loop, after anything that can change the role,
    /// the membership, the commit index or the node's state). The commit index is raised in the
    /// same step that allows reads: a leader that just committed its first entry (after a restart,
    /// or an election) may have committed entries it has not applied, acknowledged before (found by
    /// review: a restarted sole voter could otherwise serve state without its last writes until
    /// the next Ready).
    private func updateDirectReads() {
        let allowed = raft.isSoleVoterLeader && refusal() == nil
        let commit = raft.commitIndex
        guard allowed != directReadsAllowed || commit > directCommit else { return }
        directLock.withLock {
            directReadsAllowed = allowed
            directCommit = max(directCommit, commit)
        }
    }

    /// The event loop the node runs on.
    public var eventLoop: any EventLoop { loop }

    /// fdatasync calls and bytes written by this node's log since it opened (thread-safe).
    public var logStatistics: (syncs: UInt64, bytesWritten: UInt64) { (storage.log.syncCount, storage.log.bytesWritten) }

    /// Runs `body` on the state machine at the chosen consistency and returns its result.
    ///
    /// - `.linearizable` (the default) sees every write acknowledged before the call, on any node;
    /// - `.lease` the same, confirmed by the leader's lease (no round trip; needs check-quorum);
    /// - `.local` this node's state at once (possibly stale).
    ///
    /// `body` runs on the node's event loop: keep it short, and do not keep references to the state.
    public func read<T: Sendable>(consistency: Consistency = .linearizable,
                                  _ body: @escaping @Sendable (Machine) -> T) async throws -> T {
        if consistency != .local {
            let promise = loop.makePromise(of: LogIndex.self)
            loop.execute { self.startRead(Waiter(promise), lease: consistency == .lease) }
            _ = try await Self.wait(promise.futureResult)
        }
        let future = loop.submit { () throws -> T in
            if let error = self.refusal() { throw error }
            return self.machineLock.withLock { body(self.machine) }
        }
        return try await Self.wait(future)
    }

    /// Takes a checkpoint of the applied state now (then compacts the log).
    ///
    /// - Returns: the log index the checkpoint covers, once it is durable.
    public func checkpoint() async throws -> LogIndex {
        let promise = loop.makePromise(of: LogIndex.self)
        loop.execute {
            if let error = self.refusal() { return promise.fail(error) }
            if self.appliedIndex == .zero { return promise.fail(NodeError.refused("nothing is applied yet (a joining node waits for its first snapshot)")) }
            if self.appliedIndex == self.storage.snapshot.index, !self.snapshotting, self.storage.damagedSnapshot == nil {
                return promise.succeed(self.appliedIndex)
            }
            self.checkpointWaiters.append(promise)
            self.maybeSnapshot()
        }
        return try await Self.wait(promise.futureResult)
    }

    /// Adds a voter that listens for peers at `address` (any member takes the call: a follower
    /// forwards it to the leader, and answers once the change is applied here); then start the new
    /// node with `join` set. Until it has caught up, the cluster needs it for a majority: prefer
    /// `addLearner`, which promotes it once it has caught up.
    ///
    /// - Throws: `.notLeader`, `.refused` (another change is under way), `.timedOut`, ...
    public func addMember(_ id: NodeID, address: PeerAddress) async throws {
        try await change(.addVoter, id, address: address)
    }

    /// Adds a learner: it receives the log but does not vote. With `autoPromoteLearners` (the
    /// default) the leader promotes it once it is within `promotionLagEntries` of the log.
    public func addLearner(_ id: NodeID, address: PeerAddress) async throws {
        try await change(.addLearner, id, address: address)
    }

    /// Makes a learner a voter.
    public func promote(_ id: NodeID) async throws {
        try await change(.promoteLearner, id, address: nil)
    }

    /// Removes a voter or learner. A removed node stops serving (`.notMember`); shut it down.
    public func removeMember(_ id: NodeID) async throws {
        try await change(.remove, id, address: nil)
    }

    /// Hands leadership to another voter; returns once it leads (call on the leader).
    public func transferLeadership(to target: NodeID) async throws {
        let promise = loop.makePromise(of: Void.self)
        loop.execute {
            if let error = self.refusal() { return promise.fail(error) }
            do throws(RaftError) { try self.raft.transferLeadership(to: target) } catch { return promise.fail(NodeError(error)) }
            self.transfer?.promise.fail(NodeError.refused("another transfer started"))
            self.transfer = (target, promise)
            self.loop.scheduleTask(in: .milliseconds(self.configuration.requestTimeoutMilliseconds)) {
                if let transfer = self.transfer, transfer.promise.futureResult === promise.futureResult {
                    self.transfer = nil
                    promise.fail(NodeError.timedOut)
                }
            }
            self.process()
        }
        try await Self.wait(promise.futureResult)
    }

    /// This node's view of itself and the cluster. Match indexes are known on the leader.
    public func status() async throws -> NodeStatus {
        try await Self.wait(loop.submit { self.currentStatus() })
    }

    /// Stops ticking, fails what waits (`.shuttingDown`), closes the transport, lets a write in
    /// flight finish, and closes the storage.
    public func shutdown() async {
        let waiting: Void? = try? await loop.submit {
            self.closing = true
            self.updateDirectReads()
            self.ticker?.cancel()
            self.failAll(NodeError.shuttingDown)
        }.get()
        _ = waiting
        await transport.shutdown()
        delivery.withLockedValue { $0 = nil }
        // Let a write or a snapshot in flight finish before the log closes, however long it takes:
        // closing the log under it would lose it.
        while (try? await loop.submit { self.persisting || self.snapshotting }.get()) ?? false {
            try? await Task.sleep(for: .milliseconds(10))
        }
        storageQueue.sync {}
        applyQueue.sync {}
        // The newest commit index, if only memory had it (a clean stop leaves nothing to relearn).
        if let unwritten = try? await loop.submit({ self.stopped == nil ? self.unwrittenHardState : nil }).get() {
            try? await storage.persist(entries: [], hardState: unwritten)
        }
        storage.close()
    }

    private static func wait<T: Sendable>(_ future: EventLoopFuture<T>) async throws -> T {
        try await future.get()
    }

    // MARK: - On the loop

    private func tag(_ request: UInt64) -> RequestTag {
        RequestTag(origin: configuration.node.rawValue, run: run, request: request)
    }

    private func startProposal(_ command: [UInt8], _ promise: WriteWaiter) {
        if let error = refusal() { return promise.fail(error) }
        guard command.count <= configuration.commandSizeMax else {
            return promise.fail(NodeError.invalidArgument("the command is \(command.count) bytes, over the limit of \(configuration.commandSizeMax) (an entry must fit in one peer message)"))
        }
        let request = nextRequest
        nextRequest += 1
        writes[request] = promise
        proposalBuffer.append((CommandRecord.encode(tag(request), command: command), request))
        deadlines.append((NIODeadline.now() + .milliseconds(configuration.requestTimeoutMilliseconds), request))
        // Proposals that arrive while a write is in flight wait here and go to Raft together, as
        // one batch (one AppendEntries per follower) when the next Ready is taken. With no write
        // in flight, the Ready is taken once this turn of the loop has read every connection
        // (group commit: the other requests of the same turn share the write and its fsync,
        // instead of waiting a whole write behind the first), and has run the tasks those reads
        // queued (a server's batch of one turn's single writes proposes from such a task): the
        // task that takes it queues itself once more, behind them.
        if !persisting, !processScheduled {
            processScheduled = true
            loop.execute {
                self.loop.execute {
                    self.processScheduled = false
                    self.process()
                }
            }
        }
    }

    /// Hands the buffered proposals to Raft as one batch.
    private func flushProposals() {
        guard !proposalBuffer.isEmpty else { return }
        let buffered = proposalBuffer
        proposalBuffer = []
        // In batches no larger than one message may carry (a follower forwards each as one).
        var start = 0
        while start < buffered.count {
            var end = start
            var bytes = 0
            while end < buffered.count, end - start < configuration.raft.messageEntriesMax,
                  end == start || bytes + buffered[end].data.count + 64 <= configuration.raft.messageSizeMax / 2 {
                bytes += buffered[end].data.count + 64
                end += 1
            }
            let batch = buffered[start..<end]
            do {
                try raft.propose(batch: batch.map(\.data))
                if let leader = raft.leader { for (_, request) in batch { handedTo[request] = leader } }
            } catch {
                for (_, request) in batch { writes.removeValue(forKey: request)?.fail(NodeError(error)) }
            }
            start = end
        }
    }

    private func startRead(_ promise: Waiter<LogIndex>, lease: Bool) {
        if let error = refusal() { return promise.fail(error) }
        if raft.isSoleVoterLeader {
            // One voter: its commit index is the read index (what the core would answer, without
            // a Ready). Served once applied (entries applied early may already cover it).
            let index = raft.commitIndex
            if index <= appliedIndex { return promise.succeed(index) }
        } else if diskFull, appliedMembership.voters == [configuration.node], raft.status.membership.voters == [configuration.node] {
            // The sole voter gave up leading when its disk filled (its core restarted; it leads
            // again once a write of its own fits). No other node can commit anything, and every
            // acknowledged write was applied before it was acknowledged: its applied state is
            // linearizable, so reads go on.
            return promise.succeed(appliedIndex)
        }
        let request = nextRequest
        nextRequest += 1
        // The context carries this run's id too: a reply meant for an earlier run of this node
        // (queued while it was down) must not answer a new read with the same request id.
        var context = ByteWriter(capacity: 16)
        context.write(run)
        context.write(request)
        do { try raft.readIndex(context: context.bytes, consistency: lease ? .lease : .readIndex) } catch {
            return promise.fail(NodeError(error))
        }
        reads[request] = promise
        if let leader = raft.leader { handedTo[request] = leader }
        deadlines.append((NIODeadline.now() + .milliseconds(configuration.requestTimeoutMilliseconds), request))
        process()
    }

    private func change(_ kind: ConfigurationChange.Kind, _ id: NodeID, address: PeerAddress?) async throws {
        let promise = loop.makePromise(of: Void.self)
        let deadline = NIODeadline.now() + .milliseconds(configuration.requestTimeoutMilliseconds)
        loop.execute { self.startChange(kind, id, address: address, deadline: deadline, promise) }
        try await Self.wait(promise.futureResult)
    }

    private func startChange(_ kind: ConfigurationChange.Kind, _ id: NodeID, address: PeerAddress?, deadline: NIODeadline,
                             _ promise: EventLoopPromise<Void>) {
        if let error = refusal() { return promise.fail(error) }
        if let address, address.host.isEmpty || address.host.utf8.count > 255 || !(1...65535).contains(address.port) {
            return promise.fail(NodeError.invalidArgument("\(address) is not a peer address"))
        }
        let membership = raft.status.membership
        if kind == .addVoter || kind == .addLearner, membership.contains(id) {
            return promise.fail(NodeError.invalidArgument("node \(id) is already a member (remove it first to change its address)"))
        }
        if kind == .remove || kind == .promoteLearner, !membership.contains(id) {
            return promise.fail(NodeError.invalidArgument("node \(id) is not a member"))
        }
        let request = nextRequest
        nextRequest += 1
        let change = ConfigurationChange(kind, id, context: ChangeContext.encode(tag(request), address: address))
        do {
            try raft.proposeConfigurationChange(change)
        } catch .leaderNotReady where NIODeadline.now() < deadline {
            // A new leader commits an entry of its term first (a tick or two): try again then.
            loop.scheduleTask(in: .milliseconds(configuration.tickMilliseconds)) {
                self.startChange(kind, id, address: address, deadline: deadline, promise)
            }
            return
        } catch {
            return promise.fail(NodeError(error))
        }
        changes[request] = promise
        loop.scheduleTask(deadline: deadline) {
            self.changes.removeValue(forKey: request)?.fail(NodeError.timedOut)
        }
        process()
    }

    private func refusal() -> NodeError? {
        if let stopped { return .storageFailed(stopped) }
        if closing { return .shuttingDown }
        if removed { return .notMember }
        return nil
    }

    private func currentStatus() -> NodeStatus {
        let raftStatus = raft.status
        let membership = raftStatus.membership
        let members = membership.all.map { id in
            MemberStatus(id: id, address: addresses[id], isVoter: membership.isVoter(id), matchIndex: raftStatus.matchIndex[id])
        }
        return NodeStatus(id: configuration.node, role: raftStatus.role, term: raftStatus.term, leader: raftStatus.leader,
                          commitIndex: raftStatus.commitIndex, appliedIndex: appliedIndex, lastIndex: raftStatus.lastIndex,
                          snapshotIndex: storage.snapshot.index, members: members, stopped: stopped, rejectedSnapshots: rejectedSnapshots)
    }

    private func tick() {
        working += 1
        defer { working -= 1 }
        guard stopped == nil, !closing else { return }
        ticks += 1
        let now = NIODeadline.now()
        while let first = deadlines.first, first.deadline <= now {
            deadlines.removeFirst()
            writes.removeValue(forKey: first.request)?.fail(NodeError.timedOut)
            reads.removeValue(forKey: first.request)?.fail(NodeError.timedOut)
            handedTo[first.request] = nil
        }
        raft.tick()
        maybePromoteLearner()
        if storage.damagedSnapshot != nil { maybeSnapshot() }
        process()
    }

    /// On the leader: promotes a learner that has caught up to within `promotionLagEntries`.
    private func maybePromoteLearner() {
        guard configuration.autoPromoteLearners, role == .leader else { return }
        if let promoting, promoting.untilTick > ticks { return }
        promoting = nil
        let status = raft.status
        for learner in status.membership.learners {
            guard let match = status.matchIndex[learner], match > .zero,
                  status.lastIndex.rawValue - min(match.rawValue, status.lastIndex.rawValue) <= configuration.promotionLagEntries else { continue }
            let change = ConfigurationChange(.promoteLearner, learner, context: ChangeContext.encode(tag(0), address: nil))
            // One change at a time: a refusal (another change under way) is tried again next tick.
            guard (try? raft.proposeConfigurationChange(change)) != nil else { return }
            logger.info("node \(configuration.node) promotes learner \(learner) (match \(match), last \(status.lastIndex))")
            promoting = (learner, ticks + 20 * UInt64(configuration.raft.electionTicks))
            return
        }
    }

    private func receive(_ message: Message) {
        working += 1
        defer { working -= 1 }
        guard stopped == nil, !closing else { return }
        raft.step(message)
        process()
    }

    /// Takes the next Ready unless one is being persisted.
    private func process() {
        working += 1
        defer { working -= 1 }
        // Every change to Raft's state (a step, a tick, a proposal, an advance) is followed by a
        // call here, before anything it produced is sent.
        updateDirectReads()
        guard !persisting, stopped == nil, !closing else { return }
        flushProposals()
        guard raft.hasReady else { return }
        let ready = raft.ready()
        let commit = raft.commitIndex
        if commit > directCommit { directLock.withLock { directCommit = commit } }
        if let soft = ready.softState { noteSoftState(soft) }
        learnAddresses(from: ready.entries)
        // A leader's appends go out while they are written, unless this Ready changes the term
        // or vote (then everything waits until that is durable).
        let keepsVote = ready.hardState.map { $0.term == persistedHardState.term && $0.votedFor == persistedHardState.votedFor } ?? true
        let sendsEarly = role == .leader && keepsVote
        let early = sendsEarly ? ready.messages.filter(Self.mayPrecedePersistence) : []
        let late = sendsEarly ? ready.messages.filter { !Self.mayPrecedePersistence($0) } : ready.messages
        if !early.isEmpty { transport.send(early) }
        // Whether this write's entries are this leader's own and reached no one else yet: only
        // then may a full disk refuse them (a follower's entries came from a leader, and sent
        // appends may be held by followers; either may commit).
        writeIsOwnUnsent = role == .leader && !early.contains { $0.kind == .appendEntries && !$0.entries.isEmpty }
        persisting = true
        let storage = self.storage
        // A hard state that only moves the commit index needs no fsync of its own (as etcd's
        // MustSync): a node that restarts with an older commit index learns it again from the
        // leader, and its state machine is rebuilt from what it held. It is written with the next
        // entries, at shutdown, or at once when it commits a configuration change.
        // The membership is applied at commit, so a commit that covers a configuration change is
        // written at once: after a restart the node must not fall back to an older membership.
        let commitOnly = ready.entries.isEmpty && ready.snapshot == nil
            && ready.hardState.map { $0.term == persistedHardState.term && $0.votedFor == persistedHardState.votedFor } == true
        let coversChange = ready.committedEntries.contains { $0.kind == .configurationChange }
        var toWrite = ready.hardState
        if commitOnly && !coversChange {
            unwrittenHardState = ready.hardState
            toWrite = nil
        } else if toWrite == nil, let unwritten = unwrittenHardState, !ready.entries.isEmpty || coversChange {
            // Written with the next entries (or before a configuration change is applied).
            toWrite = unwritten
        }
        if toWrite != nil { unwrittenHardState = nil }
        let hardState = toWrite
        if ready.incomingSnapshotChunks.isEmpty && ready.snapshot == nil {
            // Entries and hard state only: hand them straight to the log's writer thread (the
            // call only queues them), or, inline, write them here.
            // Committed entries this node already holds on disk (before this Ready's first new
            // entry) are applied while the writer syncs, and their callers answered: they are on
            // a majority's disks, this one's included, so nothing about this write can undo them.
            // Configuration changes wait for the write (it records the commit that covers them).
            // A sole voter with `syncOnLoop` writes and syncs here, on the loop, which waits for
            // the disk: those entries are applied and answered first, so that their clients send
            // their next requests while it waits (Redis's order: the replies of one turn go out
            // before the next turn's fsync).
            let firstNew = ready.entries.first?.index ?? LogIndex(UInt64.max)
            let applyNow = ready.committedEntries.prefix { $0.index < firstNew && $0.kind == .normal }.count
            let inline = configuration.syncOnLoop && raft.isSoleVoterLeader
            if inline { applyEntries(ready.committedEntries.prefix(applyNow)) }
            storage.persist(entries: ready.entries, hardState: hardState, inline: inline) { result in
                self.loop.execute { self.persisted(ready, late: late, result, installed: nil, appliedBefore: applyNow) }
            }
            if !inline { applyEntries(ready.committedEntries.prefix(applyNow)) }
            return
        }
        storageQueue.async {
            // 1. Persist: snapshot chunks, then the installed snapshot, then entries and hard state.
            let installed: [UInt8]?
            do throws(StorageError) {
                for chunk in ready.incomingSnapshotChunks { try storage.receive(chunk) }
                installed = try ready.snapshot.map { snapshot throws(StorageError) in try storage.installBlocking(snapshot) }
            } catch {
                self.loop.execute { self.persisted(ready, late: late, .failure(error), installed: nil) }
                return
            }
            storage.persist(entries: ready.entries, hardState: hardState) { result in
                self.loop.execute { self.persisted(ready, late: late, result, installed: installed) }
            }
        }
    }

    /// A leader's appends, heartbeats and snapshot chunks carry nothing it must have on disk first.
    private static func mayPrecedePersistence(_ message: Message) -> Bool {
        message.kind == .appendEntries || message.kind == .heartbeat || message.kind == .installSnapshot
    }

    private func noteSoftState(_ soft: SoftState) {
        let previous = leader
        role = soft.role
        if role == .leader { diskFull = false }
        leader = soft.leader
        if let previous, soft.leader != previous {
            // What was handed to the old leader may never be answered (a forwarded proposal or
            // read lost with it): answer it `leaderChanged` rather than at the timeout, once this
            // Ready's committed entries are applied (those are answered with their results).
            lostLeader = previous
        }
        if let transfer, let leader = soft.leader, leader != transfer.target {
            self.transfer = nil
            transfer.promise.fail(NodeError.refused("node \(leader) leads, not node \(transfer.target)"))
        }
        if let transfer, soft.leader == transfer.target {
            self.transfer = nil
            transfer.promise.succeed(())
        }
    }

    private func persisted(_ ready: Ready, late: [Message], _ result: Result<Void, StorageError>, installed: [UInt8]?,
                           appliedBefore: Int = 0) {
        working += 1
        defer { working -= 1 }
        persisting = false
        // After shutdown began, nothing more is applied or sent (its callers were failed already).
        guard !closing else { return }
        // A failed write answers what waits with an error: the entries out on the apply thread
        // are committed, and are answered with their results first.
        if case .failure = result { drainApplies() }
        switch result {
        case .failure(.corruption(let file, _, let reason, _)) where ready.snapshot != nil || !ready.incomingSnapshotChunks.isEmpty:
            // A received snapshot that does not verify (a corrupted transfer, or one resumed from a
            // leader whose checkpoint differs): drop it, and restart the core from what is durable.
            return restartCore(because: "the received snapshot \(file) does not verify (\(reason))", refusedSnapshot: true)
        case .failure(.noSpace(let cause)):
            // A full disk (DESIGN contract 3): the log cut back to its last record; refuse what
            // waited, forget what was not written (as after a crash), keep serving reads, and take
            // writes again once there is room.
            failAfterFullDisk(ready, ownUnsent: writeIsOwnUnsent, cause: "\(cause)")
            diskFull = true
            // Said once per 10 s at most: a follower meets the full disk with every append.
            let quietTicks = UInt64(10_000 / max(1, configuration.tickMilliseconds))
            let quietly = lastFullDiskWarning.map { ticks &- $0 < quietTicks } ?? false
            if !quietly { lastFullDiskWarning = ticks }
            return restartCore(because: "the disk is full (\(cause)); writes are refused until there is room", refusedSnapshot: false,
                               quietly: quietly)
        case .failure(let error):
            // A failed fsync (or any other write error): stop taking part, and say why.
            return stop("\(error)")
        case .success:
            break
        }
        if let hardState = ready.hardState { persistedHardState = hardState }
        if let installed, let snapshot = ready.snapshot {
            drainApplies()
            do {
                let (known, machineState) = try NodeSnapshotDecoding.decode(installed)
                try machineLock.withLock {
                    try machine.restore(from: machineState)
                    directApplied = snapshot.index
                }
                addresses = known.merging(configuration.members) { _, configured in configured }
                transport.updatePeers(Self.dialTable(addresses, configuration))
                appliedIndex = snapshot.index
                appliedMembership = snapshot.membership
                // The log before it was thrown away: growth counts from here.
                logBytesAtSnapshot = storage.log.bytesWritten
                noteMembership(snapshot.membership)
            } catch {
                return stop("a received snapshot does not restore: \(error)")
            }
        }
        // 2. Send. 3. Apply. 4. Advance.
        transport.send(late)
        applyEntries(ready.committedEntries.dropFirst(appliedBefore))
        for state in ready.readStates {
            var reader = ByteReader(state.context)
            guard (try? reader.readUInt64()) == run, let request = try? reader.readUInt64(), reads[request] != nil else { continue }
            readsAwaitingApply.append((state.index, request))
        }
        raft.advance(ready)
        serveReads()
        if let lost = lostLeader {
            lostLeader = nil
            // Entries this Ready committed are answered with their results, not `leaderChanged`.
            drainApplies()
            failHanded(to: lost)
            // A membership change this Ready did not apply may never be (it went to the old leader).
            changes.values.forEach { $0.fail(NodeError.leaderChanged) }
            changes = [:]
        }
        maybeSnapshot()
        process()
    }

    /// Fails the writes and reads handed to `leader` that are still unanswered (reads whose index
    /// is known are kept: that index stays valid).
    private func failHanded(to leader: NodeID) {
        let confirmed = Set(readsAwaitingApply.map(\.request))
        for (request, target) in handedTo where target == leader {
            if let promise = writes.removeValue(forKey: request) {
                promise.fail(NodeError.leaderChanged)
            } else if !confirmed.contains(request), let promise = reads.removeValue(forKey: request) {
                promise.fail(NodeError.leaderChanged)
            } else if confirmed.contains(request) {
                continue
            }
            handedTo[request] = nil
        }
    }

    private func stop(_ reason: String) {
        stopped = reason
        updateDirectReads()
        logger.critical("node \(configuration.node) stops: \(reason)")
        ticker?.cancel()
        failAll(NodeError.storageFailed(reason))
    }

    /// Replaces the core with one made from what is durable, as a crash and restart would; what
    /// was not yet persisted (and the messages not yet sent) is gone, and their callers time out.
    private func restartCore(because reason: String, refusedSnapshot: Bool, quietly: Bool = false) {
        if quietly {
            logger.debug("node \(configuration.node): \(reason); restarting Raft from the durable state")
        } else {
            logger.warning("node \(configuration.node): \(reason); restarting Raft from the durable state")
        }
        if refusedSnapshot { rejectedSnapshots += 1 }
        // The new core starts from `appliedIndex`: it must be the machine's.
        drainApplies()
        do {
            raft = try RaftNode(configuration: configuration.raft, storage: storage, randomSeed: UInt64.random(in: 1...UInt64.max),
                                applied: appliedIndex)
        } catch {
            return stop("Raft does not restart: \(error)")
        }
        role = .follower
        leader = nil
        // What the old core held (forwarded or not yet persisted) is gone with it.
        failWaiting(NodeError.leaderChanged)
        // (No campaign at once: the election timeout paces retries against a disk still full.)
        process()
    }

    /// Where the transport dials each other member: its configured route, else its address.
    static func dialTable(_ addresses: [NodeID: PeerAddress], _ configuration: NodeConfiguration) -> [NodeID: PeerAddress] {
        var table: [NodeID: PeerAddress] = [:]
        for (id, address) in addresses where id != configuration.node { table[id] = configuration.routes[id] ?? address }
        return table
    }

    /// Learns the addresses new configuration entries carry, so messages can reach new members.
    private func learnAddresses(from entries: [Entry]) {
        var changed = false
        for entry in entries where entry.kind == .configurationChange {
            guard let change = ConfigurationChange(decoding: entry.data), change.kind != .remove,
                  let (_, address) = ChangeContext.decode(change.context), let address, addresses[change.node] != address else { continue }
            addresses[change.node] = address
            changed = true
        }
        if changed { transport.updatePeers(Self.dialTable(addresses, configuration)) }
    }

    /// Takes a snapshot when enough entries were applied since the last one, or one was asked
    /// for: the state machine's snapshot is taken on the loop, written on the storage queue.
    /// Whether the log written since the last checkpoint is at least `snapshotLogGrowthPercent`
    /// of that checkpoint's size (so a large state is not rewritten for every small stretch of log).
    private func logGrewEnough(_ logBytes: UInt64) -> Bool {
        let percent = configuration.snapshotLogGrowthPercent
        guard percent > 0 else { return true }
        let (needed, overflow) = UInt64(storage.newestCheckpointBytes).multipliedReportingOverflow(by: percent)
        return !overflow && logBytes >= needed / 100
    }

    private func maybeSnapshot() {
        guard !snapshotting, !closing, stopped == nil else { return }
        // (A snapshot being installed moves the storage's index before `appliedIndex` follows.)
        guard appliedIndex >= storage.snapshot.index else { return }
        let logBytes = storage.log.bytesWritten &- logBytesAtSnapshot
        let due = (appliedIndex.rawValue - storage.snapshot.index.rawValue >= configuration.snapshotInterval
                   || (configuration.snapshotLogBytes > 0 && logBytes >= configuration.snapshotLogBytes))
            && logGrewEnough(logBytes)
        // Our newest checkpoint failed verification when a follower was to receive it: write a
        // fresh one (at the same index if nothing was applied since) instead of sending bad bytes;
        // once per index, so a file that can never verify is not rewritten forever.
        let damaged = storage.damagedSnapshot.map { $0.index != rewroteDamaged } ?? false
        guard due || damaged || !checkpointWaiters.isEmpty else { return }
        if damaged { rewroteDamaged = storage.damagedSnapshot?.index }
        // The machine is ahead of `appliedIndex` while batches are out (which only moves the
        // index on, so what is due stays due). Under sustained load the apply thread may never
        // run dry: a snapshot that is due, or asked for, waits for it here.
        drainApplies()
        guard appliedIndex > storage.snapshot.index || (damaged && appliedIndex == storage.snapshot.index && appliedIndex > .zero),
              let term = raft.term(at: appliedIndex) else {
            // Nothing new since the last checkpoint, or (at index 0) nothing applied yet: the
            // waiters are answered by the next one.
            if appliedIndex == storage.snapshot.index, appliedIndex > .zero {
                for waiter in checkpointWaiters { waiter.succeed(appliedIndex) }
                checkpointWaiters = []
            }
            return
        }
        snapshotting = true
        logBytesAtSnapshot = storage.log.bytesWritten
        let state = NodeSnapshot(addresses: addresses, inner: machine.snapshot())
        let index = appliedIndex
        let membership = appliedMembership
        let waiters = checkpointWaiters
        checkpointWaiters = []
        let storage = self.storage
        storageQueue.async {
            let result: Result<LogIndex, StorageError>
            do throws(StorageError) {
                try storage.createSnapshot(at: index, term: term, membership: membership, state: state, wallTimeMilliseconds: 0)
                result = .success(index)
            } catch {
                result = .failure(error)
            }
            self.loop.execute {
                self.snapshotting = false
                switch result {
                case .success(let index): for waiter in waiters { waiter.succeed(index) }
                case .failure(let error):
                    self.logger.error("snapshot at \(index) failed: \(error)")
                    for waiter in waiters { waiter.fail(NodeError.storageFailed("checkpoint failed: \(error)")) }
                }
                self.maybeSnapshot()
            }
        }
    }

    /// A lone entry at least this large may hold several commands (a transaction, or a
    /// connection's pipelined writes): worth `willApply`.
    static var hintBytesMin: Int { 256 }

    /// Applies committed entries in order: on the loop (announced to the machine first with
    /// `willApply`, when there is more than a small one), or, for a leader's large batch, on
    /// `applyQueue` (and everything after it until that queue has caught up, to keep the order).
    private func applyEntries(_ entries: ArraySlice<Entry>) {
        guard !entries.isEmpty else { return }
        if applying == 0 {
            let threshold = configuration.applyOffLoopBytes
            let large = threshold > 0 && role == .leader && entries.reduce(0) { $0 + $1.data.count } >= threshold
            if !large {
                if entries.count > 1 || entries.first.map({ $0.data.count >= Self.hintBytesMin }) == true {
                    let commands = entries.compactMap { $0.kind == .normal ? CommandRecord.decode($0.data)?.1 : nil }
                    machineLock.withLock { machine.willApply(commands) }
                }
                for entry in entries { finishApply(entry, result: applyToMachine(entry)) }
                return
            }
        }
        // In pieces of about `applyOffLoopBytes / 2`, each finished on the loop as soon as it is
        // applied: the first callers are answered while the rest is applied.
        var start = entries.startIndex
        while start < entries.endIndex {
            var end = start
            var bytes = 0
            while end < entries.endIndex, end == start || bytes < configuration.applyOffLoopBytes / 2 {
                bytes += entries[end].data.count
                end += 1
            }
            let batch = Array(entries[start..<end])
            start = end
            applying += 1
            applyQueue.async {
                let results = batch.map { self.applyToMachine($0) }
                self.appliedOffLoop.withLockedValue { $0.append((batch, results)) }
                self.loop.execute { self.finishApplied() }
            }
        }
    }

    /// Finishes on the loop what `applyQueue` applied: answers, membership, reads that waited,
    /// a snapshot that came due; then the next Ready.
    private func finishApplied() {
        working += 1
        defer { working -= 1 }
        guard takeApplied() else { return }
        serveReads()
        maybeSnapshot()
        process()
    }

    /// Finishes the batches `applyQueue` has applied; whether there were any.
    private func takeApplied() -> Bool {
        let batches = appliedOffLoop.withLockedValue { done in
            defer { done.removeAll() }
            return done
        }
        guard !batches.isEmpty else { return false }
        applying -= batches.count
        // After shutdown began, callers were failed already.
        guard !closing else { return true }
        for (entries, results) in batches {
            for (entry, result) in zip(entries, results) { finishApply(entry, result: result) }
        }
        return true
    }

    /// Waits on the loop for `applyQueue` to catch up and finishes what it applied, so that the
    /// machine's state is `appliedIndex`'s.
    private func drainApplies() {
        guard applying > 0 else { return }
        working += 1
        defer { working -= 1 }
        applyQueue.sync {}
        _ = takeApplied()
        serveReads()
    }

    /// The state machine's part of applying an entry (on the loop or on `applyQueue`, one entry
    /// at a time, in log order): a normal entry's command, and its result.
    private func applyToMachine(_ entry: Entry) -> [UInt8]? {
        guard entry.kind == .normal, let (_, command) = CommandRecord.decode(entry.data) else {
            machineLock.withLock { directApplied = entry.index }
            return nil
        }
        return machineLock.withLock {
            directApplied = entry.index
            return machine.apply(command)
        }
    }

    /// The loop's part of applying an entry, after `applyToMachine`: the applied index, a
    /// membership change, and the proposer's answer.
    private func finishApply(_ entry: Entry, result: [UInt8]?) {
        appliedIndex = entry.index
        switch entry.kind {
        case .configurationChange:
            guard let change = ConfigurationChange(decoding: entry.data) else { return }
            appliedMembership = appliedMembership.applying(change)
            let decoded = ChangeContext.decode(change.context)
            if change.kind == .remove, change.node != configuration.node {
                // Close the link a little later, so the leader's last append (which tells the
                // removed node it was removed) can still leave: ten ticks, and at least two
                // seconds, as a loaded machine can hold the link's writes back that long (a
                // 200 ms window in the tests lost the append under CI's load).
                addresses[change.node] = nil
                loop.scheduleTask(in: .milliseconds(max(10 * configuration.tickMilliseconds, 2000))) {
                    guard self.addresses[change.node] == nil else { return }
                    self.transport.updatePeers(Self.dialTable(self.addresses, self.configuration))
                }
            } else if let address = decoded?.1, addresses[change.node] != address {
                addresses[change.node] = address
                transport.updatePeers(Self.dialTable(addresses, configuration))
            }
            if promoting?.node == change.node { promoting = nil }
            // The caller learns its change applied before anything else happens (a node that just
            // removed itself then stops serving).
            if let (tag, _) = decoded, tag.origin == configuration.node.rawValue, tag.run == run,
               let promise = changes.removeValue(forKey: tag.request) {
                promise.succeed(())
            }
            noteMembership(appliedMembership)
        case .normal:
            guard let result, let (tag, _) = CommandRecord.decode(entry.data) else { return }
            if tag.origin == configuration.node.rawValue, tag.run == run, let promise = writes.removeValue(forKey: tag.request) {
                handedTo[tag.request] = nil
                promise.succeed(result)
            }
        }
    }

    /// A node that sees itself removed stops serving. (A joining node is not a member until its
    /// addition is applied: the snapshot it starts from may predate it.)
    private func noteMembership(_ membership: Membership) {
        if membership.contains(configuration.node) {
            wasMember = true
            removed = false
        } else if wasMember, !removed {
            removed = true
            updateDirectReads()
            logger.notice("node \(configuration.node) was removed from the cluster (\(membership))")
            failAll(NodeError.notMember)
        }
    }

    private func serveReads() {
        readsAwaitingApply.removeAll { read in
            guard read.index <= appliedIndex else { return reads[read.request] == nil }
            reads.removeValue(forKey: read.request)?.succeed(read.index)
            handedTo[read.request] = nil
            return true
        }
    }

    private func failAll(_ error: NodeError) {
        failWaiting(error)
        for waiter in checkpointWaiters { waiter.fail(error) }
        checkpointWaiters = []
        transfer?.promise.fail(error)
        transfer = nil
    }

    /// After a full disk: the proposals not yet handed to Raft were refused (`noSpace`), and so
    /// were those whose entries were in the failed write if it was this leader's own and none of
    /// its appends had gone out (`ownUnsent`). Otherwise the entries may commit: a follower's
    /// came from a leader that has them (found by `keel torture`: a write refused on a follower
    /// with a full disk was committed), and a leader's sent appends may be held by followers
    /// (§10.2.1). Those, and the proposals handed to Raft earlier (durable here, or forwarded), are
    /// answered `interrupted`; reads are retried (`noLeader`: the core restarts without one).
    /// Of the failed write, only entries past the log's end after the cut-back are refused: a
    /// write whose entries straddled a segment rotation may have its first entries durable.
    private func failAfterFullDisk(_ ready: Ready, ownUnsent: Bool, cause: String) {
        var refused = Set(proposalBuffer.map(\.request))
        let durableEnd = storage.lastIndex
        for entry in ready.entries where entry.kind == .normal && ownUnsent && entry.index > durableEnd {
            if let (tag, _) = CommandRecord.decode(entry.data), tag.origin == configuration.node.rawValue, tag.run == run {
                refused.insert(tag.request)
            }
        }
        let interrupted = NodeError.interrupted("the disk filled: \(cause)")
        failWaiting(write: { refused.contains($0) ? NodeError.noSpace(cause) : interrupted }, change: interrupted, read: .noLeader)
    }

    /// Fails the proposals, membership changes and reads that wait for Raft.
    private func failWaiting(_ error: NodeError) {
        failWaiting(write: { _ in error }, change: error, read: error)
    }

    /// Fails what waits for Raft, each proposal with the error `write` gives for its request.
    private func failWaiting(write: (UInt64) -> NodeError, change: NodeError, read: NodeError) {
        // Emptied before anyone is told: a callback may already make a new call.
        let (failedWrites, failedChanges, failedReads) = (writes, changes, reads)
        handedTo = [:]
        writes = [:]
        proposalBuffer = []
        changes = [:]
        reads = [:]
        readsAwaitingApply = []
        for (request, waiter) in failedWrites { waiter.fail(write(request)) }
        for (_, promise) in failedChanges { promise.fail(change) }
        for (_, waiter) in failedReads { waiter.fail(read) }
    }
}

/// Who waits for a proposal: `Waiter<[UInt8]>`, but not generic. A generic struct holds a
/// caller's callback behind a reabstraction thunk (its closure type is the generic one): an
/// allocation, and a call more, for every write; this one holds it as the caller gave it.
struct WriteWaiter: Sendable {
    let complete: @Sendable (Result<[UInt8], NodeError>) -> Void

    init(_ complete: @escaping @Sendable (Result<[UInt8], NodeError>) -> Void) {
        self.complete = complete
    }

    init(_ promise: EventLoopPromise<[UInt8]>) {
        complete = { result in promise.completeWith(result.mapError { $0 }) }
    }

    func succeed(_ value: [UInt8]) { complete(.success(value)) }
    func fail(_ error: NodeError) { complete(.failure(error)) }
}

/// Who waits for a read or a membership change: a promise, or a callback (callers on event
/// loops). Runs on the node's loop, once.
struct Waiter<Value: Sendable>: Sendable {
    let complete: @Sendable (Result<Value, NodeError>) -> Void

    init(_ complete: @escaping @Sendable (Result<Value, NodeError>) -> Void) {
        self.complete = complete
    }

    init(_ promise: EventLoopPromise<Value>) {
        complete = { result in
            switch result {
            case .success(let value): promise.succeed(value)
            case .failure(let error): promise.fail(error)
            }
        }
    }

    func succeed(_ value: Value) { complete(.success(value)) }
    func fail(_ error: NodeError) { complete(.failure(error)) }
}
