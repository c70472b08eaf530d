// A Keel node: Raft on the storage engine's log, talking to its peers over TCP.
//
// One event loop owns the node: the Raft core, the state machine, and the waiting callers are
// touched only there. The loop follows the Ready order (Ready.swift):
//   1. persist entries and hard state: handed to the log's writer thread (never on the loop);
//      the loop takes no new Ready until that write is durable;
//   2. send messages;
//   3. apply committed entries in order, each once, and answer the callers waiting for them;
//      serve reads whose index is applied;
//   4. advance.
// A timer ticks the core. A failed fsync stops the node: it stops taking part and says why.
//
// Snapshots: after `snapshotInterval` applied entries the state machine's bytes become a checkpoint
// and the log is compacted; a follower that needs compacted entries receives the checkpoint file in
// chunks, installs it once it verifies, and restores the state machine from it.
//
// Not yet here (the node issue continues): membership calls, learner promotion, lease and local
// reads, and the public DocC'd API surface.

import Dispatch
import KeelCore
import KeelRaft
import KeelStorage
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// The state machine a node replicates. Called on the node's event loop; deterministic.
public protocol ReplicatedStateMachine: AnyObject {
    /// Applies a command and returns its result.
    func apply(_ command: [UInt8]) -> [UInt8]
    /// The whole state as bytes, for a snapshot. (A copy, taken on the loop; an O(1) snapshot
    /// encoded off the loop is the next step.)
    func snapshot() -> [UInt8]
    /// Replaces the state with a snapshot's bytes.
    func restore(_ bytes: [UInt8]) throws
}

/// Errors a node's callers see.
public enum NodeError: Error, Sendable, Equatable, CustomStringConvertible {
    /// No leader is known; try again after an election.
    case noLeader
    /// The node is shutting down or stopped.
    case shuttingDown
    /// The node's storage failed (a failed fsync): it has stopped.
    case storageFailed(String)
    /// The request did not complete in time (the outcome of a write is then unknown).
    case timedOut
    /// Raft refused the request.
    case refused(String)

    public var description: String {
        switch self {
        case .noLeader: "keel: no leader is known"
        case .shuttingDown: "keel: the node is shutting down"
        case .storageFailed(let reason): "keel: storage failed, the node has stopped: \(reason)"
        case .timedOut: "keel: timed out; the outcome is unknown"
        case .refused(let reason): "keel: refused: \(reason)"
        }
    }
}

/// How to run a node.
public struct NodeConfiguration: Sendable {
    public var node: NodeID
    public var dataDirectory: String
    /// Every voter of a new cluster, with where it listens for peers (this node included).
    public var members: [NodeID: PeerAddress]
    public var clusterToken: [UInt8]
    /// Milliseconds per Raft tick (the election timeout is 10 to 20 ticks).
    public var tickMilliseconds: Int64 = 50
    /// Milliseconds a proposal or read may wait.
    public var requestTimeoutMilliseconds: Int64 = 5000
    /// Take a snapshot (a checkpoint, then log compaction) after this many applied entries.
    public var snapshotInterval: UInt64 = 10_000
    public var log = LogOptions()
    public var raft: RaftConfiguration

    public init(node: NodeID, dataDirectory: String, members: [NodeID: PeerAddress], clusterToken: [UInt8]) {
        self.node = node
        self.dataDirectory = dataDirectory
        self.members = members
        self.clusterToken = clusterToken
        raft = RaftConfiguration(id: node)
    }
}

/// A state machine's bytes as a checkpoint body.
struct BytesCheckpoint: CheckpointSource {
    let bytes: [UInt8]
    func writeCheckpoint(to sink: inout CheckpointSink) throws(StorageError) { try sink.write(bytes) }
}

/// A running node.
public final class KeelNode: @unchecked Sendable {
    // @unchecked Sendable: every mutable field below is touched only on `loop` (public calls hop
    // onto it); `transport`, `storage` handles and `configuration` are set once.
    public let configuration: NodeConfiguration
    let loop: any EventLoop
    let raft: RaftNode
    let storage: DurableRaftStorage
    let machine: any ReplicatedStateMachine
    var transport: PeerTransport!
    let logger: Logger
    private var persisting = false
    private var stopped: String?
    private var closing = false
    private var ticker: RepeatedTask?
    private var nextRequest: UInt64 = 1
    /// Distinguishes this run's requests from an earlier run's still in the log (request ids
    /// restart at 1 after a restart).
    private let run = UInt64.random(in: 1...UInt64.max)
    private var writes: [UInt64: EventLoopPromise<[UInt8]>] = [:]
    /// Reads by request id, from the call until they are served or time out.
    private var reads: [UInt64: EventLoopPromise<LogIndex>] = [:]
    /// Reads whose index is known, waiting for it to be applied.
    private var readsAwaitingApply: [(index: LogIndex, request: UInt64)] = []
    private(set) var appliedIndex: LogIndex
    /// The membership as of `appliedIndex` (configuration entries applied in order), for snapshots.
    private var appliedMembership: Membership
    /// Storage work that may block (snapshot files, install): never on the loop.
    let storageQueue = DispatchQueue(label: "keel.node.storage")
    private var snapshotting = false

    /// Starts a node: recovers its storage, listens for peers, starts ticking.
    public static func start(configuration: NodeConfiguration, machine: any ReplicatedStateMachine, group: any EventLoopGroup,
                             logger: Logger = Logger(label: "keel.node")) async throws -> KeelNode {
        let membership = Membership(voters: Array(configuration.members.keys))
        var logOptions = configuration.log
        logOptions.fsyncPolicy = .always
        let (storage, state) = try DurableRaftStorage.open(path: configuration.dataDirectory, options: logOptions, initialMembership: membership)
        let raft: RaftNode
        do {
            if let state { try machine.restore(state) }
            raft = try RaftNode(configuration: configuration.raft, storage: storage, randomSeed: UInt64.random(in: 1...UInt64.max))
        } catch {
            storage.close()
            throw error
        }
        let node = KeelNode(configuration: configuration, loop: group.next(), raft: raft, storage: storage, machine: machine, logger: logger)
        node.transport = PeerTransport(
            configuration: PeerTransportConfiguration(node: configuration.node, listen: configuration.members[configuration.node]!,
                                                      clusterToken: configuration.clusterToken),
            peers: configuration.members.filter { $0.key != configuration.node }, group: group, logger: logger
        ) { [weak node] message in
            guard let node else { return }
            node.loop.execute { node.receive(message) }
        }
        do { try await node.transport.start() } catch {
            storage.close()
            throw error
        }
        try await node.loop.submit {
            node.ticker = node.loop.scheduleRepeatedTask(initialDelay: .milliseconds(configuration.tickMilliseconds),
                                                         delay: .milliseconds(configuration.tickMilliseconds)) { _ in
                node.raft.tick()
                node.process()
            }
            if membership.voters == [configuration.node] { node.raft.campaign() }
            node.process()
        }.get()
        return node
    }

    init(configuration: NodeConfiguration, loop: any EventLoop, raft: RaftNode, storage: DurableRaftStorage,
         machine: any ReplicatedStateMachine, logger: Logger) {
        self.configuration = configuration
        self.loop = loop
        self.raft = raft
        self.storage = storage
        self.machine = machine
        self.logger = logger
        appliedIndex = storage.snapshot.index
        appliedMembership = storage.snapshot.membership
    }

    // MARK: - Calls

    /// Proposes a command; returns the state machine's result once it is committed and applied here.
    public func propose(_ command: [UInt8]) async throws -> [UInt8] {
        let promise = loop.makePromise(of: [UInt8].self)
        loop.execute { self.startProposal(command, promise) }
        return try await promise.futureResult.get()
    }

    /// Runs `body` on the state machine once it reflects every write committed before the call
    /// (a linearizable read through ReadIndex).
    public func read<T: Sendable>(_ body: @escaping @Sendable (any ReplicatedStateMachine) -> T) async throws -> T {
        let promise = loop.makePromise(of: LogIndex.self)
        loop.execute { self.startRead(promise) }
        _ = try await promise.futureResult.get()
        return try await loop.submit { body(self.machine) }.get()
    }

    /// The Raft state.
    public func status() async throws -> RaftStatus {
        try await loop.submit { self.raft.status }.get()
    }

    /// Stops ticking, fails what waits, closes the transport and the storage.
    public func shutdown() async {
        let waiting: Void? = try? await loop.submit {
            self.closing = true
            self.ticker?.cancel()
            self.failAll(NodeError.shuttingDown)
        }.get()
        _ = waiting
        await transport.shutdown()
        // Let a write or a snapshot in flight finish before the log closes, however long it takes:
        // closing the log under it would lose it.
        while (try? await loop.submit { self.persisting || self.snapshotting }.get()) ?? false {
            try? await Task.sleep(for: .milliseconds(10))
        }
        storageQueue.sync {}
        storage.close()
    }

    // MARK: - On the loop

    private func startProposal(_ command: [UInt8], _ promise: EventLoopPromise<[UInt8]>) {
        if let error = refusal() { return promise.fail(error) }
        let request = nextRequest
        nextRequest += 1
        var writer = ByteWriter(capacity: 25 + command.count)
        writer.write(UInt8(1))
        writer.write(configuration.node.rawValue)
        writer.write(run)
        writer.write(request)
        writer.write(bytes: command)
        do {
            try raft.propose(writer.bytes)
        } catch RaftError.noLeader {
            return promise.fail(NodeError.noLeader)
        } catch {
            return promise.fail(NodeError.refused("\(error)"))
        }
        writes[request] = promise
        loop.scheduleTask(in: .milliseconds(configuration.requestTimeoutMilliseconds)) {
            self.writes.removeValue(forKey: request)?.fail(NodeError.timedOut)
        }
        process()
    }

    private func startRead(_ promise: EventLoopPromise<LogIndex>) {
        if let error = refusal() { return promise.fail(error) }
        let request = nextRequest
        nextRequest += 1
        var context = ByteWriter(capacity: 8)
        context.write(request)
        do {
            try raft.readIndex(context: context.bytes)
        } catch RaftError.noLeader {
            return promise.fail(NodeError.noLeader)
        } catch {
            return promise.fail(NodeError.refused("\(error)"))
        }
        reads[request] = promise
        loop.scheduleTask(in: .milliseconds(configuration.requestTimeoutMilliseconds)) {
            self.reads.removeValue(forKey: request)?.fail(NodeError.timedOut)
        }
        process()
    }

    private func refusal() -> NodeError? {
        if let stopped { return .storageFailed(stopped) }
        if closing { return .shuttingDown }
        return nil
    }

    private func receive(_ message: Message) {
        guard stopped == nil, !closing else { return }
        raft.step(message)
        process()
    }

    /// Takes the next Ready unless one is being persisted.
    private func process() {
        guard !persisting, stopped == nil, !closing, raft.hasReady else { return }
        let ready = raft.ready()
        persisting = true
        let storage = self.storage
        storageQueue.async {
            // 1. Persist: snapshot chunks, then the installed snapshot, then entries and hard state.
            let installed: [UInt8]?
            do throws(StorageError) {
                for chunk in ready.incomingSnapshotChunks { try storage.receive(chunk) }
                installed = try ready.snapshot.map { snapshot throws(StorageError) in try storage.installBlocking(snapshot) }
            } catch {
                self.loop.execute { self.persisted(ready, .failure(error), installed: nil) }
                return
            }
            storage.persist(entries: ready.entries, hardState: ready.hardState) { result in
                self.loop.execute { self.persisted(ready, result, installed: installed) }
            }
        }
    }

    private func persisted(_ ready: Ready, _ result: Result<Void, StorageError>, installed: [UInt8]?) {
        persisting = false
        // After shutdown began, nothing more is applied or sent (its callers were failed already).
        guard !closing else { return }
        if case .failure(let error) = result {
            // A failed fsync (or any write error): stop taking part, and say why.
            stopped = "\(error)"
            logger.critical("node \(configuration.node) stops: \(error)")
            ticker?.cancel()
            failAll(NodeError.storageFailed("\(error)"))
            return
        }
        if let installed, let snapshot = ready.snapshot {
            do {
                try machine.restore(installed)
                appliedIndex = snapshot.index
                appliedMembership = snapshot.membership
            } catch {
                stopped = "a received snapshot does not restore: \(error)"
                logger.critical("node \(configuration.node) stops: \(stopped!)")
                ticker?.cancel()
                failAll(NodeError.storageFailed(stopped!))
                return
            }
        }
        // 2. Send. 3. Apply. 4. Advance.
        if !closing { transport.send(ready.messages) }
        for entry in ready.committedEntries { apply(entry) }
        for state in ready.readStates {
            var reader = ByteReader(state.context)
            guard let request = try? reader.readUInt64(), reads[request] != nil else { continue }
            readsAwaitingApply.append((state.index, request))
        }
        raft.advance(ready)
        serveReads()
        maybeSnapshot()
        process()
    }

    /// Takes a snapshot when enough entries were applied since the last one: the state is copied
    /// on the loop, written and the log compacted on the storage queue.
    private func maybeSnapshot() {
        guard !snapshotting, !closing, appliedIndex.rawValue >= storage.snapshot.index.rawValue + configuration.snapshotInterval,
              let term = raft.term(at: appliedIndex) else { return }
        snapshotting = true
        let bytes = machine.snapshot()
        let index = appliedIndex
        let membership = appliedMembership
        let storage = self.storage
        storageQueue.async {
            do throws(StorageError) {
                try storage.createSnapshot(at: index, term: term, membership: membership, state: BytesCheckpoint(bytes: bytes),
                                           wallTimeMilliseconds: 0)
            } catch {
                self.logger.error("snapshot at \(index) failed: \(error)")
            }
            self.loop.execute { self.snapshotting = false }
        }
    }

    private func apply(_ entry: Entry) {
        appliedIndex = entry.index
        if entry.kind == .configurationChange, let change = ConfigurationChange(decoding: entry.data) {
            appliedMembership = appliedMembership.applying(change)
        }
        // An entry: version 1, origin node, origin run, request id, command.
        guard entry.kind == .normal, entry.data.count >= 25, entry.data[0] == 1 else { return }
        var reader = ByteReader(entry.data)
        guard (try? reader.readUInt8()) == 1, let origin = try? reader.readUInt64(), let originRun = try? reader.readUInt64(),
              let request = try? reader.readUInt64() else { return }
        let result = machine.apply(Array(entry.data[25...]))
        if origin == configuration.node.rawValue, originRun == run, let promise = writes.removeValue(forKey: request) {
            promise.succeed(result)
        }
    }

    private func serveReads() {
        readsAwaitingApply.removeAll { read in
            guard read.index <= appliedIndex else { return reads[read.request] == nil }
            reads.removeValue(forKey: read.request)?.succeed(read.index)
            return true
        }
    }

    private func failAll(_ error: NodeError) {
        for (_, promise) in writes { promise.fail(error) }
        writes = [:]
        for (_, promise) in reads { promise.fail(error) }
        reads = [:]
        readsAwaitingApply = []
    }
}
