// A state machine made durable: the single-node composition of the log, checkpoints and recovery.
//
// `execute` appends a command to the log; once the command is durable (fsync policy), the log's
// writer thread applies it to the state machine in index order and the caller gets the result.
// Write-ahead: nothing is applied or acknowledged before it is in the log (DESIGN.md contract 1).
//
// Checkpoints: when enough log bytes have accumulated since the last one (or on demand), the
// state machine's O(1) immutable copy is taken at an exact index, under the same lock that
// `apply` holds, and encoded on a thread of its own while appends go on. After it is published
// the store keeps the newest two checkpoints and removes the log segments the *older* of the two
// no longer needs (minus `retainedLogEntries`), so that falling back to the older checkpoint
// never lacks an entry.

import Foundation
import KeelCore
import Logging
import Synchronization

/// A deterministic state machine that the storage engine can make durable.
public protocol DurableStateMachine: SendableMetatype {
    /// What applying a command returns to its caller.
    associatedtype Output: Sendable
    /// The immutable copy that writes a checkpoint.
    associatedtype Snapshot: CheckpointSource

    /// The empty state.
    init()

    /// Restores a state from a checkpoint body written by ``Snapshot``.
    init(checkpoint body: [UInt8], limits: Limits) throws(StorageError)

    /// Applies one entry. Deterministic: no clock, no randomness, no hash-order iteration.
    mutating func apply(_ entry: LogEntry) -> Output

    /// An immutable copy of the current state.
    ///
    /// - Complexity: O(1) is expected (a persistent collection).
    func snapshot() -> Snapshot
}

/// Settings of a ``DurableStore``.
public struct StoreOptions: Sendable {
    /// The log's settings.
    public var log = LogOptions()
    /// Take a checkpoint once this many bytes have been logged since the last one (0 turns it off).
    /// What the log held after that checkpoint when the store opened counts.
    public var checkpointLogBytes = 256 * 1024 * 1024
    /// A checkpoint `checkpointLogBytes` makes due also waits until the log since the last one is
    /// this percentage of that checkpoint's file size (0, the default: no such wait). 100 bounds
    /// the checkpoint bytes written per log byte on a large state, at the cost of replaying up to
    /// about that much log at the next open. `checkpoint()` does not wait.
    public var checkpointLogGrowthPercent: UInt64 = 0
    /// Log entries to keep before what compaction would otherwise remove (for lagging followers).
    public var retainedLogEntries: UInt64 = 0
    /// The term written into entries (a single node without Raft uses term 1).
    public var term = Term(1)

    public init() {}
}

/// A state machine, its log and its checkpoints in one data directory.
public final class DurableStore<Machine: DurableStateMachine>: @unchecked Sendable {
    // @unchecked Sendable: `state` is a Mutex; `log`, `directory` and `checkpoints` are Sendable;
    // `checkpointsInFlight` is a DispatchGroup. The machine is touched only under `state`.

    private struct State {
        var machine: Machine
        var appliedIndex: LogIndex
        var appliedTerm: Term
        var checkpointRunning = false
        /// `log.bytesWritten` when the last checkpoint began; at open, minus what the log held
        /// after the recovered checkpoint (wrapping arithmetic).
        var bytesAtLastCheckpoint: UInt64 = 0
        /// The size of the newest checkpoint's file (0 when there is none).
        var checkpointBytes = 0
        var lastCheckpoint: CheckpointMetadata?
        /// Callers waiting for the checkpoint that is running.
        var waiters: [@Sendable (Result<CheckpointMetadata, StorageError>) -> Void] = []
        /// Callers who asked while one was running: they get the next one, taken after it.
        var laterWaiters: [@Sendable (Result<CheckpointMetadata, StorageError>) -> Void] = []
        /// Checkpoint files found damaged at recovery: never kept in place of a valid one.
        var damagedCheckpoints: Set<String> = []
        var lastCheckpointError: StorageError?
        var closed = false
    }

    /// What recovery found and did.
    public let recoveryReport: RecoveryReport
    /// The data directory.
    public let directory: DataDirectory
    /// The log.
    public let log: WriteAheadLog
    let checkpoints: CheckpointStore
    let options: StoreOptions
    let logger: Logger
    let wallClock: @Sendable () -> Int64
    private let state: Locked<State>
    private let checkpointsInFlight = DispatchGroup()

    /// Opens (creating if needed) a store: locks the directory, recovers, starts the log writer.
    ///
    /// - Parameters:
    ///   - path: the data directory.
    ///   - options: log, checkpoint and retention settings.
    ///   - fileSystem: the POSIX file system, or a simulated one in tests.
    ///   - logger: receives the recovery report and checkpoint events.
    ///   - wallClock: milliseconds since 1970, recorded in checkpoint headers for operators.
    public init(
        path: String,
        options: StoreOptions = StoreOptions(),
        fileSystem: any FileSystem = POSIXFileSystem(),
        logger: Logger = Logger(label: "keel.storage"),
        wallClock: @escaping @Sendable () -> Int64 = { Int64(Date().timeIntervalSince1970 * 1000) }
    ) throws(StorageError) {
        try options.log.validate()
        let directory = try DataDirectory(path: path, fileSystem: fileSystem)
        var machine = Machine()
        var checkpoint: CheckpointMetadata?
        var checkpointBytes = 0
        var appliedTerm = Term.zero
        let recovered: RecoveredLog
        do {
            recovered = try Recovery.run(directory: directory, options: options.log) { (metadata, body) throws(StorageError) in
                machine = try Machine(checkpoint: body, limits: options.log.limits)
                checkpoint = metadata
                checkpointBytes = body.count
                appliedTerm = metadata.term
            } apply: { entry in
                _ = machine.apply(entry)
                appliedTerm = entry.term
            }
        } catch {
            directory.unlock()
            throw error
        }
        logger.info("\(recovered.report)")
        do {
            log = try WriteAheadLog(directory: directory.logPath, fileSystem: fileSystem, options: options.log,
                                    scans: recovered.scans, nextIndex: recovered.nextIndex)
        } catch {
            directory.unlock()
            throw error
        }
        self.directory = directory
        self.recoveryReport = recovered.report
        self.checkpoints = CheckpointStore(directory: directory.checkpointsPath, fileSystem: fileSystem, limits: options.log.limits)
        self.options = options
        self.logger = logger
        self.wallClock = wallClock
        self.state = Locked(State(machine: machine, appliedIndex: recovered.report.lastIndex, appliedTerm: appliedTerm,
                                  bytesAtLastCheckpoint: log.bytesWritten &- log.bytes(after: checkpoint?.index ?? .zero),
                                  checkpointBytes: checkpointBytes, lastCheckpoint: checkpoint,
                                  damagedCheckpoints: Set(recovered.report.rejectedCheckpoints.map(\.name))))
    }

    /// Point-in-time recovery: the state after entry `index`, rebuilt from the newest valid
    /// checkpoint at or below it and the log, without changing any file or taking the lock.
    ///
    /// - Throws: `.unrecoverable` if the checkpoints and log cannot reach exactly `index`.
    public static func state(
        at index: LogIndex, path: String, options: StoreOptions = StoreOptions(), fileSystem: any FileSystem = POSIXFileSystem()
    ) throws(StorageError) -> Machine {
        let directory = try DataDirectory(path: path, fileSystem: fileSystem, lock: false)
        var machine = Machine()
        _ = try Recovery.run(directory: directory, options: options.log, stopAt: index) { (_, body) throws(StorageError) in
            machine = try Machine(checkpoint: body, limits: options.log.limits)
        } apply: { entry in
            _ = machine.apply(entry)
        }
        return machine
    }

    /// The index of the last applied entry.
    public var appliedIndex: LogIndex { state.withLock { $0.appliedIndex } }

    /// The newest checkpoint this store wrote or loaded.
    public var lastCheckpoint: CheckpointMetadata? { state.withLock { $0.lastCheckpoint } }

    /// The last error of an automatic checkpoint, if the most recent one failed.
    public var lastCheckpointError: StorageError? { state.withLock { $0.lastCheckpointError } }

    /// Reads the state under the lock that `apply` holds.
    public func read<T>(_ body: (borrowing Machine) -> T) -> T {
        state.withLock { body($0.machine) }
    }

    /// Logs a command, applies it once it is durable, and returns the result.
    ///
    /// - Throws: `StorageError`: the log refused or failed the write; then the command was not applied.
    public func execute(_ command: [UInt8]) async throws(StorageError) -> Machine.Output {
        let result: Result<Machine.Output, StorageError> = await withCheckedContinuation { continuation in
            execute(command) { continuation.resume(returning: $0) }
        }
        return try result.get()
    }

    /// Logs a command; `completion` runs on the log's writer thread with the result once it is applied.
    public func execute(_ command: [UInt8], completion: @escaping @Sendable (Result<Machine.Output, StorageError>) -> Void) {
        let term = options.term
        do {
            try log.append(term: term, payload: command) { [self] result in
                switch result {
                case .failure(let error):
                    completion(.failure(error))
                case .success(let index):
                    let output = applyDurable(LogEntry(index: index, term: term, payload: command))
                    completion(.success(output))
                }
            }
        } catch {
            completion(.failure(error))
        }
    }

    /// Applies a durable entry (on the writer thread, in index order) and starts a checkpoint when due.
    private func applyDurable(_ entry: LogEntry) -> Machine.Output {
        let logged = log.bytesWritten
        let (output, due) = state.withLock { state -> (Machine.Output, (Machine.Snapshot, CheckpointMetadata)?) in
            precondition(entry.index == state.appliedIndex.next, "entries are applied in order, each once")
            let output = state.machine.apply(entry)
            state.appliedIndex = entry.index
            state.appliedTerm = entry.term
            let since = logged &- state.bytesAtLastCheckpoint
            guard options.checkpointLogBytes > 0, !state.checkpointRunning, !state.closed, since >= UInt64(options.checkpointLogBytes),
                  Self.grewEnough(since, checkpointBytes: state.checkpointBytes, percent: options.checkpointLogGrowthPercent)
            else { return (output, nil) }
            return (output, beginCheckpoint(&state, logged: logged))
        }
        if let (snapshot, metadata) = due { runCheckpoint(snapshot, metadata) }
        return output
    }

    /// Whether `logged` bytes are at least `percent` of a checkpoint of `checkpointBytes`.
    static func grewEnough(_ logged: UInt64, checkpointBytes: Int, percent: UInt64) -> Bool {
        guard percent > 0 else { return true }
        let (needed, overflow) = UInt64(checkpointBytes).multipliedReportingOverflow(by: percent)
        return !overflow && logged >= needed / 100
    }

    private func beginCheckpoint(_ state: inout State, logged: UInt64) -> (Machine.Snapshot, CheckpointMetadata) {
        state.checkpointRunning = true
        state.bytesAtLastCheckpoint = logged
        checkpointsInFlight.enter()
        return (state.machine.snapshot(), CheckpointMetadata(index: state.appliedIndex, term: state.appliedTerm, wallTimeMilliseconds: wallClock()))
    }

    /// Takes a checkpoint of the state as it is now (after any running checkpoint finishes) and
    /// returns once it is published and the log compacted.
    public func checkpoint() async throws(StorageError) -> CheckpointMetadata {
        let result: Result<CheckpointMetadata, StorageError> = await withCheckedContinuation { continuation in
            let logged = log.bytesWritten
            let start = state.withLock { state -> (Machine.Snapshot, CheckpointMetadata)? in
                if state.closed {
                    continuation.resume(returning: .failure(.closed))
                    return nil
                }
                let waiter: @Sendable (Result<CheckpointMetadata, StorageError>) -> Void = { continuation.resume(returning: $0) }
                if state.checkpointRunning {
                    state.laterWaiters.append(waiter)
                    return nil
                }
                state.waiters.append(waiter)
                return beginCheckpoint(&state, logged: logged)
            }
            if let (snapshot, metadata) = start { runCheckpoint(snapshot, metadata) }
        }
        return try result.get()
    }

    /// Encodes and publishes a checkpoint on its own thread, then compacts.
    private func runCheckpoint(_ snapshot: Machine.Snapshot, _ metadata: CheckpointMetadata) {
        let thread = Thread { [self] in
            let outcome = publish(snapshot, metadata)
            // Only the growth condition reads the size: a failure to read it keeps the old one.
            let outcomeSize = (try? outcome.get()).flatMap { published in
                try? checkpoints.size(of: CheckpointFile(name: CheckpointFormat.fileName(index: published.index, term: published.term),
                                                         index: published.index, term: published.term))
            }
            let next = state.withLock { state -> ([() -> Void], (Machine.Snapshot, CheckpointMetadata)?) in
                let waiters = state.waiters
                state.waiters = state.laterWaiters
                state.laterWaiters = []
                state.checkpointRunning = false
                switch outcome {
                case .success(let published):
                    state.lastCheckpoint = published
                    state.lastCheckpointError = nil
                    if let size = outcomeSize { state.checkpointBytes = size }
                case .failure(let error):
                    state.lastCheckpointError = error
                }
                // Waiters who arrived while this one ran want a checkpoint at least as new as their call.
                var finished = waiters.map { waiter in { waiter(outcome) } }
                if state.closed {
                    let abandoned = state.waiters
                    state.waiters = []
                    finished += abandoned.map { waiter in { waiter(.failure(.closed)) } }
                }
                let again = state.waiters.isEmpty ? nil : beginCheckpoint(&state, logged: log.bytesWritten)
                return (finished, again)
            }
            for finish in next.0 { finish() }
            if let (snapshot, metadata) = next.1 { runCheckpoint(snapshot, metadata) }
            checkpointsInFlight.leave()
        }
        thread.name = "keel-checkpoint"
        thread.start()
    }

    private func publish(_ snapshot: Machine.Snapshot, _ metadata: CheckpointMetadata) -> Result<CheckpointMetadata, StorageError> {
        let started = ContinuousClock.now
        do {
            let (previous, damaged) = state.withLock { ($0.lastCheckpoint, $0.damagedCheckpoints) }
            if let previous, previous.index == metadata.index {
                return .success(previous) // nothing applied since: the valid checkpoint stands
            }
            let file = try checkpoints.write(snapshot, metadata: metadata)
            // A rewrite under a damaged file's name replaced it with a valid one.
            let stillDamaged = damaged.subtracting([file.name])
            state.withLock { $0.damagedCheckpoints = stillDamaged }
            let kept = try checkpoints.prune(keep: 2, damaged: stillDamaged)
            var removed: [String] = []
            if kept.count == 2 {
                let older = kept[1].index
                let through = older.rawValue > options.retainedLogEntries ? LogIndex(older.rawValue - options.retainedLogEntries) : .zero
                removed = try log.removeSegments(through: through)
            }
            logger.info("checkpoint \(file.name) published in \(ContinuousClock.now - started); removed \(removed.count) log segments")
            return .success(metadata)
        } catch {
            logger.error("checkpoint at index \(metadata.index) failed: \(error)")
            return .failure(error)
        }
    }

    /// Drains the log (everything queued is written and synced), waits for a running checkpoint,
    /// and releases the data directory.
    public func close() {
        let already = state.withLock { state -> Bool in
            defer { state.closed = true }
            return state.closed
        }
        guard !already else { return }
        // No checkpoint can begin once `closed` is set, so this waits for the last one.
        checkpointsInFlight.wait()
        log.close()
        directory.unlock()
    }
}
