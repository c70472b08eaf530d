// Raft's persisted state on the storage engine: one log, never a second copy.
//
// - Entries and the hard state live in the data directory's write-ahead log (explicit-index
//   writes; a conflicting suffix is replaced in place; the hard state shares the entries'
//   fdatasync). An entry's payload is its kind (one byte) followed by its data.
// - Snapshots are checkpoints. A Raft snapshot's checkpoint body is the membership at its index
//   followed by the state machine's bytes. Followers receive the checkpoint *file*, chunk by chunk,
//   exactly as it is on the leader's disk, so its checksums travel with it; the follower writes the
//   chunks to a temporary file and installs it only once the whole file verifies.
//
// Thread safety: reads (the RaftStorage calls) may come from the node's loop while writes run
// elsewhere: `persist` only queues to the log's writer thread (the node calls it from its loop,
// one Ready at a time); `receive`, `install` and `createSnapshot` run on the node's storage queue,
// one at a time, and never while a `persist` of the same Ready is outstanding. The
// hard state and snapshot are behind a lock, the log and the checkpoint store are thread-safe.

import DequeModule
import Dispatch
import KeelCore
import KeelRaft
import KeelStorage
import NIOConcurrencyHelpers

/// `RaftStorage` on a Keel data directory.
public final class DurableRaftStorage: RaftStorage, @unchecked Sendable {
    // @unchecked Sendable: `guarded` is a lock-protected box; `log` (its own locks and writer
    // thread) and `checkpoints` (stateless) are safe from any thread; writers are serialized by
    // the owner (see the file comment).
    public let directory: DataDirectory
    public let log: WriteAheadLog
    let checkpoints: CheckpointStore
    let fileSystem: any FileSystem
    /// The persisted hard state and the newest snapshot, behind a lock: the node's loop reads them
    /// while its storage queue takes snapshots.
    private let guarded: NIOLockedValueBox<(hardState: HardState, snapshot: SnapshotMetadata, damaged: SnapshotMetadata?)>
    /// The size in bytes of the newest checkpoint's file (0 when there is none).
    private let checkpointBytes: NIOLockedValueBox<Int>
    /// The snapshot whose file was last checked whole before a transfer.
    private let verifiedSnapshot = NIOLockedValueBox<SnapshotMetadata?>(nil)
    /// The newest entries handed to `persist`, so that applying them (and sending them to
    /// followers) does not read them back from the log file. Served only up to the log's last
    /// written index; a persisted suffix that replaces cached entries replaces them here too.
    private let recent = NIOLockedValueBox(RecentEntries())
    /// What `recent` may hold.
    static let recentBytesMax = 32 << 20
    static let recentCountMax = 1 << 16

    /// The newest snapshot, if its file failed verification when a transfer was to start; nil
    /// again once a newer checkpoint is written.
    public var damagedSnapshot: SnapshotMetadata? { guarded.withLockedValue { $0.damaged } }

    /// The persisted hard state.
    public private(set) var hardState: HardState {
        get { guarded.withLockedValue { $0.hardState } }
        set { guarded.withLockedValue { $0.hardState = newValue } }
    }

    public private(set) var snapshot: SnapshotMetadata {
        get { guarded.withLockedValue { $0.snapshot } }
        set { guarded.withLockedValue { $0.snapshot = newValue } }
    }
    /// The name of the temporary file an incoming snapshot is written to.
    static let incomingName = "incoming.ckpt.tmp"

    /// Opens (creating) the Raft storage of a data directory.
    ///
    /// - Parameter initialMembership: the membership of a new cluster (used when there is no checkpoint).
    /// - Returns: the storage, and the state machine bytes of the newest checkpoint (nil when there is none).
    public static func open(path: String, options: LogOptions = LogOptions(), initialMembership: Membership,
                            fileSystem: any FileSystem = POSIXFileSystem(),
                            allowUnsyncedLog: Bool = false) throws(StorageError) -> (DurableRaftStorage, [UInt8]?) {
        // Votes and entries are acknowledged to peers; only a synced log may back them (unless the
        // owner knowingly gives that up, as `keel serve --fsync never` does).
        guard options.fsyncPolicy == .always || allowUnsyncedLog else {
            throw .invalidConfiguration("Raft's log needs fsync `always` (a vote or an acknowledged entry must survive a crash)")
        }
        let directory = try DataDirectory(path: path, fileSystem: fileSystem)
        let log: WriteAheadLog
        let report: RecoveryReport
        do { (log, report) = try WriteAheadLog.open(in: directory, options: options) } catch {
            directory.unlock()
            throw error
        }
        do throws(StorageError) {
            let checkpoints = CheckpointStore(directory: directory.checkpointsPath, fileSystem: fileSystem, limits: options.limits)
            var snapshot = SnapshotMetadata(index: .zero, term: .zero, membership: initialMembership)
            var state: [UInt8]?
            var checkpointBytes = 0
            if let loaded = report.checkpoint, let file = try checkpoints.list().first(where: { $0.index == loaded.index && $0.term == loaded.term }) {
                guard case .success(let (metadata, body)) = try checkpoints.load(file) else {
                    throw StorageError.corruption(file: file.name, offset: 0, reason: "the checkpoint recovery used no longer verifies",
                                                  remedy: "Run `keel verify \(path)`.")
                }
                let (membership, rest) = try decodeSnapshotBody(body, file: file.name)
                snapshot = SnapshotMetadata(index: metadata.index, term: metadata.term, membership: membership)
                state = rest
                // Only the growth trigger reads the size (the body just read is nearly all of it).
                checkpointBytes = (try? checkpoints.size(of: file)) ?? body.count
            }
            var hardState = try decodeHardState(log.hardState) ?? HardState(term: snapshot.term, votedFor: nil, commit: snapshot.index)
            // A commit index is never ahead of what this node holds (Raft re-learns it from the leader).
            hardState.commit = min(hardState.commit, max(log.lastIndex, snapshot.index))
            let storage = DurableRaftStorage(directory: directory, log: log, checkpoints: checkpoints, fileSystem: fileSystem,
                                             hardState: hardState, snapshot: snapshot, checkpointBytes: checkpointBytes)
            return (storage, state)
        } catch {
            log.close()
            directory.unlock()
            throw error
        }
    }

    init(directory: DataDirectory, log: WriteAheadLog, checkpoints: CheckpointStore, fileSystem: any FileSystem,
         hardState: HardState, snapshot: SnapshotMetadata, checkpointBytes: Int = 0) {
        self.directory = directory
        self.log = log
        self.checkpoints = checkpoints
        self.fileSystem = fileSystem
        guarded = NIOLockedValueBox((hardState, snapshot, nil))
        self.checkpointBytes = NIOLockedValueBox(checkpointBytes)
    }

    /// The size in bytes of the newest checkpoint's file, written here or received from a leader
    /// (0 when there is none).
    public var newestCheckpointBytes: Int { checkpointBytes.withLockedValue { $0 } }

    /// Closes the log and releases the directory.
    public func close() {
        log.close()
        directory.unlock()
    }

    // MARK: - Encodings (part of the storage format: never change, add a version)

    static func encode(_ state: HardState) -> [UInt8] {
        var writer = ByteWriter(capacity: 25)
        writer.write(UInt8(1)) // version
        writer.write(state.term.rawValue)
        writer.write(state.votedFor?.rawValue ?? 0)
        writer.write(state.commit.rawValue)
        return writer.bytes
    }

    static func decodeHardState(_ bytes: [UInt8]?) throws(StorageError) -> HardState? {
        guard let bytes else { return nil }
        var reader = ByteReader(bytes)
        do {
            guard try reader.readUInt8() == 1 else { throw DecodingError("hard state version", offset: 0) }
            let term = Term(try reader.readUInt64())
            let vote = try reader.readUInt64()
            let commit = LogIndex(try reader.readUInt64())
            return HardState(term: term, votedFor: vote == 0 ? nil : NodeID(vote), commit: commit)
        } catch {
            throw .corruption(file: "log", offset: 0, reason: "the hard state record does not decode: \(error)", remedy: "Run `keel verify`.")
        }
    }

    static func encodeEntry(_ entry: Entry) -> LogEntry {
        // In one allocation (`[kind] + data` made two: the one-byte array, then the sum).
        var payload: [UInt8] = []
        payload.reserveCapacity(1 + entry.data.count)
        payload.append(entry.kind.rawValue)
        payload.append(contentsOf: entry.data)
        return LogEntry(index: entry.index, term: entry.term, payload: payload)
    }

    static func decodeEntry(_ entry: LogEntry) throws(StorageError) -> Entry {
        guard let first = entry.payload.first, let kind = EntryKind(rawValue: first) else {
            throw .corruption(file: "log", offset: 0, reason: "entry \(entry.index) has no valid kind", remedy: "Run `keel verify`.")
        }
        return Entry(index: entry.index, term: entry.term, kind: kind, data: Array(entry.payload.dropFirst()))
    }

    static func encodeMembership(_ membership: Membership) -> [UInt8] {
        var writer = ByteWriter()
        writer.write(UInt32(membership.voters.count))
        for voter in membership.voters { writer.write(voter.rawValue) }
        writer.write(UInt32(membership.learners.count))
        for learner in membership.learners { writer.write(learner.rawValue) }
        return writer.bytes
    }

    static func decodeSnapshotBody(_ body: [UInt8], file: String) throws(StorageError) -> (Membership, [UInt8]) {
        var reader = ByteReader(body)
        do {
            var groups: [[NodeID]] = []
            for name in ["voters", "learners"] {
                let count = Int(try reader.readUInt32(name))
                guard count <= 4096, count <= reader.remaining / 8 else { throw DecodingError("\(count) \(name)", offset: reader.position) }
                var members: [NodeID] = []
                for _ in 0..<count { members.append(NodeID(try reader.readUInt64(name))) }
                groups.append(members)
            }
            return (Membership(voters: groups[0], learners: groups[1]), Array(body[reader.position...]))
        } catch {
            throw .corruption(file: file, offset: 0, reason: "the snapshot's membership does not decode: \(error)", remedy: "Run `keel verify`.")
        }
    }

    // MARK: - RaftStorage

    public func initialState() -> (HardState, Membership) { (hardState, snapshot.membership) }

    public var firstIndex: LogIndex { snapshot.index.next }

    public var lastIndex: LogIndex { max(log.lastIndex, snapshot.index) }

    public func term(at index: LogIndex) throws(RaftStorageError) -> Term {
        let snapshot = self.snapshot // one consistent view while a snapshot may be published
        if index == snapshot.index { return snapshot.term }
        if index < snapshot.index { throw .compacted }
        if index > max(log.lastIndex, snapshot.index) { throw .unavailable }
        guard let term = log.term(at: index) else { throw .compacted }
        return term
    }

    public func entries(from: LogIndex, to: LogIndex, maxSize: Int) throws(RaftStorageError) -> [Entry] {
        let snapshot = self.snapshot
        let written = log.lastIndex
        if from <= snapshot.index { throw .compacted }
        if from > to || to > max(written, snapshot.index).next { throw .unavailable }
        var result: [Entry] = []
        var size = 0
        var index = from
        recent.withLockedValue { recent in
            guard let first = recent.entries.first?.index, index >= first else { return }
            let end = min(to, written.next)
            while index < end, let entry = recent.entry(at: index) {
                size += entry.size
                if !result.isEmpty && size > maxSize { return }
                result.append(entry)
                index = index.next
            }
        }
        if !result.isEmpty && size > maxSize { return result }
        while index < to {
            let entry: Entry
            do { entry = try Self.decodeEntry(try log.entry(at: index)) } catch {
                // Compacted meanwhile, or unreadable: Raft falls back to sending the snapshot.
                throw .compacted
            }
            size += entry.size
            if !result.isEmpty && size > maxSize { break }
            result.append(entry)
            index = index.next
        }
        return result
    }

    public func snapshotChunk(of snapshot: SnapshotMetadata, offset: Int, maxSize: Int) throws(RaftStorageError) -> SnapshotChunk {
        let path = directory.checkpointsPath + "/" + CheckpointFormat.fileName(index: snapshot.index, term: snapshot.term)
        if offset == 0, verifiedSnapshot.withLockedValue({ $0 }) != snapshot {
            // Before a transfer starts, check the whole file once (bit rot since it was written
            // would otherwise be sent, and refused by every follower forever). A damaged one is
            // reported through `damagedSnapshot`, so the node writes a fresh checkpoint.
            let bytes: [UInt8]
            do { bytes = try fileSystem.readFile(path) } catch { throw .snapshotOutOfDate }
            guard case .success(let (header, _)) = CheckpointFormat.verify(bytes, limits: log.options.limits),
                  header.index == snapshot.index, header.term == snapshot.term else {
                guarded.withLockedValue { $0.damaged = snapshot }
                throw .snapshotOutOfDate
            }
            verifiedSnapshot.withLockedValue { $0 = snapshot }
        }
        do {
            let handle = try fileSystem.open(path, options: [.readOnly])
            defer { fileSystem.close(handle) }
            let size = try fileSystem.size(of: handle)
            let start = min(max(offset, 0), size)
            let data = try fileSystem.readRange(handle, offset: start, count: min(max(maxSize, 1), size - start), path: path)
            return SnapshotChunk(data: data, isLast: start + data.count >= size)
        } catch {
            throw .snapshotOutOfDate
        }
    }

    // MARK: - Writes by the node's loop

    /// Persists a Ready's entries and hard state in one durable step; `completion` runs on the
    /// log's writer thread, or, `inline`, on the calling thread before this returns (the write
    /// and its sync made there: `WriteAheadLog.write(entries:hardState:inline:completion:)`).
    /// Call from the node's owner only, one at a time.
    public func persist(entries: [Entry], hardState newState: HardState?, inline: Bool = false,
                        completion: @escaping @Sendable (Result<Void, StorageError>) -> Void) {
        guard !entries.isEmpty || (newState != nil && newState != hardState) else {
            completion(.success(()))
            return
        }
        remember(entries)
        do throws(StorageError) {
            try log.write(entries: entries.map(Self.encodeEntry), hardState: newState.map(Self.encode), inline: inline) { [self] result in
                if case .success = result, let newState { hardState = newState }
                completion(result.map { _ in () })
            }
        } catch {
            completion(.failure(error))
        }
    }

    /// Persists a Ready's entries and hard state in one durable step.
    public func persist(entries: [Entry], hardState newState: HardState?) async throws(StorageError) {
        guard !entries.isEmpty || (newState != nil && newState != hardState) else { return }
        remember(entries)
        let encoded = newState.map(Self.encode)
        let result: Result<LogIndex, StorageError> = await withCheckedContinuation { continuation in
            do throws(StorageError) {
                try log.write(entries: entries.map(Self.encodeEntry), hardState: encoded) { continuation.resume(returning: $0) }
            } catch {
                continuation.resume(returning: .failure(error))
            }
        }
        _ = try result.get()
        if let newState { hardState = newState }
    }

    /// Keeps entries about to be written in `recent` (replacing any cached suffix they replace).
    private func remember(_ entries: [Entry]) {
        guard !entries.isEmpty else { return }
        recent.withLockedValue { $0.append(entries) }
    }

    /// Writes a chunk of an incoming snapshot (the leader's checkpoint file) at its offset.
    public func receive(_ chunk: IncomingSnapshotChunk) throws(StorageError) {
        let path = directory.checkpointsPath + "/" + Self.incomingName
        do {
            let handle = try fileSystem.open(path, options: chunk.offset == 0 ? [.create, .truncate] : [.create])
            defer { fileSystem.close(handle) }
            try fileSystem.write(handle, chunk.data, at: chunk.offset)
        } catch {
            throw error.kind == .noSpace ? .noSpace(error) : .fileSystem(error)
        }
    }

    /// `install(_:)` for a caller on a thread that may block (the node's storage queue).
    public func installBlocking(_ metadata: SnapshotMetadata) throws(StorageError) -> [UInt8] {
        let state = try publishIncoming(metadata)
        let done = DispatchSemaphore(value: 0)
        let outcome = NIOLockedValueBox<Result<LogIndex, StorageError>?>(nil)
        do throws(StorageError) {
            try log.restart(after: metadata.index) { result in
                outcome.withLockedValue { $0 = result }
                done.signal()
            }
        } catch {
            throw error
        }
        done.wait()
        recent.withLockedValue { $0 = RecentEntries() }
        _ = try outcome.withLockedValue { $0 }!.get()
        snapshot = SnapshotMetadata(index: metadata.index, term: metadata.term, membership: state.membership)
        checkpointBytes.withLockedValue { $0 = state.fileSize }
        _ = try checkpoints.prune(keep: 2)
        return state.bytes
    }

    /// Verifies the received file and publishes it as a checkpoint.
    private func publishIncoming(_ metadata: SnapshotMetadata) throws(StorageError) -> (membership: Membership, bytes: [UInt8], fileSize: Int) {
        let temporary = directory.checkpointsPath + "/" + Self.incomingName
        let final = directory.checkpointsPath + "/" + CheckpointFormat.fileName(index: metadata.index, term: metadata.term)
        let bytes: [UInt8]
        do { bytes = try fileSystem.readFile(temporary) } catch { throw .fileSystem(error) }
        guard case .success(let (header, body)) = CheckpointFormat.verify(bytes, limits: log.options.limits),
              header.index == metadata.index, header.term == metadata.term else {
            throw .corruption(file: temporary, offset: 0, reason: "the received snapshot does not verify", remedy: "The leader sends it again.")
        }
        let (membership, state) = try Self.decodeSnapshotBody(Array(bytes[body]), file: temporary)
        do {
            let handle = try fileSystem.open(temporary, options: [])
            defer { fileSystem.close(handle) }
            try fileSystem.synchronize(handle)
            try fileSystem.rename(temporary, to: final)
            try fileSystem.synchronizeDirectory(directory.checkpointsPath)
        } catch { throw .fileSystem(error) }
        return (membership, state, bytes.count)
    }

    /// Installs a snapshot whose chunks were all received: verifies the file, publishes it as a
    /// checkpoint, and restarts the log after its index.
    ///
    /// - Returns: the state machine bytes to restore.
    public func install(_ metadata: SnapshotMetadata) async throws(StorageError) -> [UInt8] {
        let state = try publishIncoming(metadata)
        let result: Result<LogIndex, StorageError> = await withCheckedContinuation { continuation in
            do throws(StorageError) {
                try log.restart(after: metadata.index) { continuation.resume(returning: $0) }
            } catch {
                continuation.resume(returning: .failure(error))
            }
        }
        recent.withLockedValue { $0 = RecentEntries() }
        _ = try result.get()
        snapshot = SnapshotMetadata(index: metadata.index, term: metadata.term, membership: state.membership)
        checkpointBytes.withLockedValue { $0 = state.fileSize }
        _ = try checkpoints.prune(keep: 2)
        return state.bytes
    }

    /// Takes a snapshot of applied state at `index`: writes the checkpoint (membership, then the
    /// state's bytes), keeps the newest two, and removes log segments the older one covers.
    public func createSnapshot(at index: LogIndex, term: Term, membership: Membership, state: some CheckpointSource,
                               wallTimeMilliseconds: Int64) throws(StorageError) {
        // A snapshot installed from the leader meanwhile may be newer: never go back.
        guard index >= snapshot.index else { return }
        let body = SnapshotBody(membership: Self.encodeMembership(membership), state: state)
        let file = try checkpoints.write(body, metadata: CheckpointMetadata(index: index, term: term, wallTimeMilliseconds: wallTimeMilliseconds))
        // Only the growth trigger reads the size: a failure to read it leaves the old one.
        if let size = try? checkpoints.size(of: file) { checkpointBytes.withLockedValue { $0 = size } }
        guarded.withLockedValue {
            $0.snapshot = SnapshotMetadata(index: index, term: term, membership: membership)
            $0.damaged = nil
        }
        verifiedSnapshot.withLockedValue { $0 = nil }
        let kept = try checkpoints.prune(keep: 2)
        if kept.count == 2 { try log.removeSegments(through: kept[1].index) }
    }
}

/// The newest entries given to `persist`, consecutive, bounded by count and bytes.
struct RecentEntries {
    var entries = Deque<Entry>()
    var bytes = 0

    func entry(at index: LogIndex) -> Entry? {
        guard let first = entries.first?.index, index >= first else { return nil }
        let position = Int(index.rawValue - first.rawValue)
        return position < entries.count ? entries[position] : nil
    }

    /// Appends entries that follow (or replace a suffix of) what is held; anything else starts over.
    mutating func append(_ new: [Entry]) {
        let start = new[0].index
        if let first = entries.first?.index, start >= first, start.rawValue <= first.rawValue + UInt64(entries.count) {
            while entries.count > Int(start.rawValue - first.rawValue) { bytes -= entries.removeLast().size }
        } else {
            self = RecentEntries()
        }
        for entry in new {
            entries.append(entry)
            bytes += entry.size
        }
        while entries.count > 1, bytes > DurableRaftStorage.recentBytesMax || entries.count > DurableRaftStorage.recentCountMax {
            bytes -= entries.removeFirst().size
        }
    }
}

/// A snapshot body: the membership, then the state machine's bytes.
struct SnapshotBody<State: CheckpointSource>: CheckpointSource {
    let membership: [UInt8]
    let state: State

    func writeCheckpoint(to sink: inout CheckpointSink) throws(StorageError) {
        try sink.write(membership)
        try state.writeCheckpoint(to: &sink)
    }
}
