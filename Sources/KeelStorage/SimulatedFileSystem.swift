// An in-memory file system that remembers what is durable, for crash tests.
//
// Each file (an inode) keeps its durable bytes and the operations since its last sync. Each name
// keeps the inode it pointed to when its directory was last synced. A crash freezes the machine:
// every later call fails with `.crashed` until `restart()`, which rebuilds the disk as a power
// cut would leave it:
//
// - names revert to what the last directory sync made durable;
// - each file keeps its durable bytes, plus (with `keepsUnsyncedPrefix`) a random prefix of the
//   writes made since its last sync, the last of which may be torn at a 512-byte boundary.
//
// Faults on demand: the next fsync fails with EIO (and, as on Linux, drops the dirty data);
// writes past a capacity fail with ENOSPC; reads flip a bit at a chosen place or at random.
// Everything random comes from the seed, so a failing case is a seed number.

import KeelCore
import Synchronization

/// A deterministic, crashable, fault-injecting `FileSystem` kept in memory.
public final class SimulatedFileSystem: FileSystem {
    /// What a crash keeps of the writes that were not yet synced.
    public enum CrashMode: Sendable {
        /// Only synced data survives.
        case dropUnsynced
        /// A random prefix of the unsynced writes survives, the last possibly torn at 512 bytes.
        case keepRandomPrefix
    }

    /// Counts of the operations that change the disk, for crashing "after the n-th one".
    public struct Counters: Sendable {
        public var writes = 0
        public var syncs = 0
        public var renames = 0
        public var mutations = 0
    }

    private enum Pending {
        case write(offset: Int, bytes: [UInt8])
        case resize(Int)
    }

    private struct Inode {
        var durable: [UInt8] = []
        var current: [UInt8] = []
        var pending: [Pending] = []
    }

    private struct State {
        var random: SeededRandom
        var inodes: [Int: Inode] = [:]
        var nextInode = 1
        var names: [String: Int] = [:]
        var durableNames: [String: Int] = [:]
        var directories: Set<String> = ["/"]
        var handles: [Int32: (inode: Int, path: String)] = [:]
        var nextHandle: Int32 = 3
        var locks: [String: Int32] = [:]
        var crashed = false
        var counters = Counters()
        var crashAfterMutation: Int?
        var failNextAllocations = 0
        var failNextSyncs = 0
        var syncFailureKind = FileSystemError.Kind.inputOutput
        var capacity: Int?
        var flipBitsOnRead: [(path: String, offset: Int)] = []
        var randomReadFlipProbability = 0.0
    }

    private let state: Mutex<State>

    /// Creates an empty file system whose random choices all come from `seed`.
    public init(seed: UInt64) {
        state = Mutex(State(random: SeededRandom(seed: seed)))
    }

    // MARK: - Fault controls

    /// Crashes right after the `count`-th mutating call from now (write, sync, rename, truncate,
    /// allocate, remove, directory sync). The call itself takes effect; the next one fails.
    public func crash(afterMutations count: Int) {
        state.withLock { $0.crashAfterMutation = $0.counters.mutations + count }
    }

    /// Crashes now.
    public func crash() {
        state.withLock { $0.crashed = true }
    }

    /// Whether the machine is down.
    public var isCrashed: Bool { state.withLock { $0.crashed } }

    /// The counters so far.
    public var counters: Counters { state.withLock { $0.counters } }

    /// Makes the next `count` calls to `synchronize` fail (with EIO, or ENOSPC as thin-provisioned
    /// and network file systems can). As on Linux, the data written since the last sync stays
    /// readable but is no longer on its way to the disk: a crash loses it.
    public func failNextSyncs(_ count: Int = 1, kind: FileSystemError.Kind = .inputOutput) {
        state.withLock {
            $0.failNextSyncs = count
            $0.syncFailureKind = kind
        }
    }

    /// Makes the next `count` preallocations (fallocate) fail with ENOSPC, whatever the capacity:
    /// a full disk met at one exact step (another writer took the space just freed).
    public func failNextAllocations(_ count: Int = 1) {
        state.withLock { $0.failNextAllocations = count }
    }

    /// Limits the total bytes of all files; growing past it fails with ENOSPC. `nil` removes the limit.
    public func setCapacity(_ bytes: Int?) {
        state.withLock { $0.capacity = bytes }
    }

    /// Flips the lowest bit of the byte at `offset` of `path` whenever it is read (the disk keeps it right).
    public func flipBitOnRead(path: String, offset: Int) {
        state.withLock { $0.flipBitsOnRead.append((path, offset)) }
    }

    /// The bytes the files take now (what `setCapacity` limits).
    public var usedBytes: Int { state.withLock { Self.usedBytes($0) } }

    /// Stops the flips `flipBitOnRead` asked for.
    public func clearReadFlips() {
        state.withLock { $0.flipBitsOnRead = [] }
    }

    /// Flips a random bit in each read with this probability.
    public func setRandomReadFlipProbability(_ probability: Double) {
        state.withLock { $0.randomReadFlipProbability = probability }
    }

    /// Changes a stored byte, durable and current alike (for tests of corruption at rest).
    public func corrupt(path: String, offset: Int, xor mask: UInt8 = 0x01) {
        state.withLock { s in
            guard let inode = s.names[path] else { preconditionFailure("no file \(path)") }
            if offset < s.inodes[inode]!.current.count { s.inodes[inode]!.current[offset] ^= mask }
            if offset < s.inodes[inode]!.durable.count { s.inodes[inode]!.durable[offset] ^= mask }
        }
    }

    /// Overwrites stored bytes durably (for planting damage in tests).
    public func overwrite(path: String, offset: Int, bytes: [UInt8]) {
        state.withLock { s in
            guard let inode = s.names[path] else { preconditionFailure("no file \(path)") }
            for (i, b) in bytes.enumerated() {
                Self.store(&s.inodes[inode]!.current, b, at: offset + i)
                Self.store(&s.inodes[inode]!.durable, b, at: offset + i)
            }
        }
    }

    /// The current bytes of a file (for tests).
    public func contents(of path: String) -> [UInt8]? {
        state.withLock { s in s.names[path].map { s.inodes[$0]!.current } }
    }

    /// Rebuilds the disk as a crash leaves it and brings the machine back up.
    public func restart(mode: CrashMode = .dropUnsynced) {
        state.withLock { s in
            s.names = s.durableNames
            let live = Set(s.names.values)
            var rebuilt: [Int: Inode] = [:]
            for inodeNumber in live.sorted() {
                let old = s.inodes[inodeNumber]!
                var bytes = old.durable
                if mode == .keepRandomPrefix, !old.pending.isEmpty {
                    let kept = Int(s.random.next() % UInt64(old.pending.count + 1))
                    for (position, operation) in old.pending.prefix(kept).enumerated() {
                        switch operation {
                        case .resize(let size):
                            Self.resize(&bytes, to: size)
                        case .write(let offset, let data):
                            var data = data
                            if position == kept - 1, data.count > 512, s.random.chance(0.5) {
                                // A torn write: only whole 512-byte sectors of its start reached the disk.
                                let sectors = Int(s.random.next() % UInt64(data.count / 512 + 1))
                                data = Array(data.prefix(sectors * 512))
                            }
                            for (i, b) in data.enumerated() { Self.store(&bytes, b, at: offset + i) }
                        }
                    }
                }
                rebuilt[inodeNumber] = Inode(durable: bytes, current: bytes, pending: [])
            }
            s.inodes = rebuilt
            s.handles = [:]
            s.locks = [:]
            s.crashed = false
            s.crashAfterMutation = nil
            s.failNextSyncs = 0
        }
    }

    // MARK: - Helpers

    private static func store(_ bytes: inout [UInt8], _ byte: UInt8, at offset: Int) {
        if offset >= bytes.count { bytes.append(contentsOf: repeatElement(0, count: offset - bytes.count + 1)) }
        bytes[offset] = byte
    }

    private static func resize(_ bytes: inout [UInt8], to size: Int) {
        if size < bytes.count { bytes.removeLast(bytes.count - size) } else if size > bytes.count {
            bytes.append(contentsOf: repeatElement(0, count: size - bytes.count))
        }
    }

    private static func crashedError(_ operation: String, _ path: String) -> FileSystemError {
        FileSystemError(kind: .crashed, errno: 0, operation: operation, path: path)
    }

    private static func error(_ kind: FileSystemError.Kind, _ code: Int32, _ operation: String, _ path: String) -> FileSystemError {
        FileSystemError(kind: kind, errno: code, operation: operation, path: path)
    }

    /// Counts a mutation and crashes when its turn comes. Call after the mutation took effect.
    private static func countMutation(_ s: inout State) {
        s.counters.mutations += 1
        if let limit = s.crashAfterMutation, s.counters.mutations >= limit {
            s.crashed = true
            s.crashAfterMutation = nil
        }
    }

    private static func normalize(_ path: String) -> String {
        var p = path
        while p.count > 1 && p.hasSuffix("/") { p.removeLast() }
        return p
    }

    /// Bytes of the files that still have a name or an open handle (removing a file frees its space).
    private static func usedBytes(_ s: State) -> Int {
        var live = Set(s.names.values)
        for handle in s.handles.values { live.insert(handle.inode) }
        return live.reduce(0) { $0 + max(s.inodes[$1]!.current.count, s.inodes[$1]!.durable.count) }
    }

    private static func handleInfo(_ s: State, _ handle: OpenFile, _ operation: String) throws(FileSystemError) -> (inode: Int, path: String) {
        guard let info = s.handles[handle.rawValue] else {
            throw error(.other, 9 /* EBADF */, operation, "fd \(handle.rawValue)")
        }
        return info
    }

    // MARK: - FileSystem

    public func open(_ path: String, options: OpenOptions) throws(FileSystemError) -> OpenFile {
        let path = Self.normalize(path)
        return try state.withLock { s throws(FileSystemError) -> OpenFile in
            if s.crashed { throw Self.crashedError("open", path) }
            var inode = s.names[path]
            if inode != nil, options.contains(.create), options.contains(.exclusive) {
                throw Self.error(.alreadyExists, 17, "open", path)
            }
            if inode == nil {
                guard options.contains(.create) else { throw Self.error(.notFound, 2, "open", path) }
                guard s.directories.contains(parentDirectory(of: path)) else { throw Self.error(.notFound, 2, "open", path) }
                let number = s.nextInode
                s.nextInode += 1
                s.inodes[number] = Inode()
                s.names[path] = number
                inode = number
                Self.countMutation(&s)
            }
            if options.contains(.truncate), !options.contains(.readOnly) {
                s.inodes[inode!]!.current = []
                s.inodes[inode!]!.pending.append(.resize(0))
            }
            let handle = s.nextHandle
            s.nextHandle += 1
            s.handles[handle] = (inode!, path)
            return OpenFile(rawValue: handle)
        }
    }

    public func close(_ handle: OpenFile) {
        state.withLock { s in
            _ = s.handles.removeValue(forKey: handle.rawValue)
            for (path, holder) in s.locks where holder == handle.rawValue { s.locks[path] = nil }
        }
    }

    public func write(_ handle: OpenFile, _ bytes: UnsafeRawBufferPointer, at offset: Int) throws(FileSystemError) {
        try state.withLock { s throws(FileSystemError) in
            if s.crashed { throw Self.crashedError("pwrite", "fd \(handle.rawValue)") }
            let info = try Self.handleInfo(s, handle, "pwrite")
            let end = offset + bytes.count
            let growth = max(0, end - s.inodes[info.inode]!.current.count)
            if let capacity = s.capacity, growth > 0, Self.usedBytes(s) + growth > capacity {
                throw Self.error(.noSpace, 28, "pwrite", info.path)
            }
            let data = Array(bytes)
            for (i, b) in data.enumerated() { Self.store(&s.inodes[info.inode]!.current, b, at: offset + i) }
            s.inodes[info.inode]!.pending.append(.write(offset: offset, bytes: data))
            s.counters.writes += 1
            Self.countMutation(&s)
        }
    }

    public func read(_ handle: OpenFile, into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(FileSystemError) -> Int {
        try state.withLock { s throws(FileSystemError) -> Int in
            if s.crashed { throw Self.crashedError("pread", "fd \(handle.rawValue)") }
            let info = try Self.handleInfo(s, handle, "pread")
            let bytes = s.inodes[info.inode]!.current
            guard offset < bytes.count else { return 0 }
            let n = min(buffer.count, bytes.count - offset)
            for i in 0..<n { buffer[i] = bytes[offset + i] }
            for flip in s.flipBitsOnRead where flip.path == info.path && flip.offset >= offset && flip.offset < offset + n {
                buffer[flip.offset - offset] ^= 0x01
            }
            if s.randomReadFlipProbability > 0, n > 0, s.random.chance(s.randomReadFlipProbability) {
                let position = Int(s.random.next() % UInt64(n))
                buffer[position] ^= UInt8(1 << (s.random.next() % 8))
            }
            return n
        }
    }

    public func size(of handle: OpenFile) throws(FileSystemError) -> Int {
        try state.withLock { s throws(FileSystemError) -> Int in
            if s.crashed { throw Self.crashedError("fstat", "fd \(handle.rawValue)") }
            let info = try Self.handleInfo(s, handle, "fstat")
            return s.inodes[info.inode]!.current.count
        }
    }

    public func synchronize(_ handle: OpenFile) throws(FileSystemError) {
        try state.withLock { s throws(FileSystemError) in
            if s.crashed { throw Self.crashedError("fdatasync", "fd \(handle.rawValue)") }
            let info = try Self.handleInfo(s, handle, "fdatasync")
            if s.failNextSyncs > 0 {
                s.failNextSyncs -= 1
                // As Linux does after a writeback error: the pages are marked clean, so reads still
                // return the new bytes, but they will never be written: a crash loses them.
                s.inodes[info.inode]!.pending = []
                let kind = s.syncFailureKind
                throw Self.error(kind, kind == .noSpace ? 28 : 5, "fdatasync", info.path)
            }
            // Only what is still on its way to the disk becomes durable: bytes whose writeback
            // failed earlier stay readable but are never written (Linux marks them clean).
            var durable = s.inodes[info.inode]!.durable
            for operation in s.inodes[info.inode]!.pending {
                switch operation {
                case .resize(let size): Self.resize(&durable, to: size)
                case .write(let offset, let data): for (i, b) in data.enumerated() { Self.store(&durable, b, at: offset + i) }
                }
            }
            s.inodes[info.inode]!.durable = durable
            s.inodes[info.inode]!.pending = []
            s.counters.syncs += 1
            Self.countMutation(&s)
        }
    }

    public func synchronizeDirectory(_ path: String) throws(FileSystemError) {
        let path = Self.normalize(path)
        try state.withLock { s throws(FileSystemError) in
            if s.crashed { throw Self.crashedError("fsync directory", path) }
            guard s.directories.contains(path) else { throw Self.error(.notFound, 2, "fsync directory", path) }
            for (name, _) in s.durableNames where parentDirectory(of: name) == path && s.names[name] == nil {
                s.durableNames[name] = nil
            }
            for (name, inode) in s.names where parentDirectory(of: name) == path {
                s.durableNames[name] = inode
            }
            s.counters.syncs += 1
            Self.countMutation(&s)
        }
    }

    public func truncate(_ handle: OpenFile, to size: Int) throws(FileSystemError) {
        try state.withLock { s throws(FileSystemError) in
            if s.crashed { throw Self.crashedError("ftruncate", "fd \(handle.rawValue)") }
            let info = try Self.handleInfo(s, handle, "ftruncate")
            let growth = max(0, size - s.inodes[info.inode]!.current.count)
            if let capacity = s.capacity, growth > 0, Self.usedBytes(s) + growth > capacity {
                throw Self.error(.noSpace, 28, "ftruncate", info.path)
            }
            Self.resize(&s.inodes[info.inode]!.current, to: size)
            s.inodes[info.inode]!.pending.append(.resize(size))
            Self.countMutation(&s)
        }
    }

    public func allocate(_ handle: OpenFile, offset: Int, length: Int) throws(FileSystemError) {
        try state.withLock { s throws(FileSystemError) in
            if s.crashed { throw Self.crashedError("fallocate", "fd \(handle.rawValue)") }
            let info = try Self.handleInfo(s, handle, "fallocate")
            if s.failNextAllocations > 0 {
                s.failNextAllocations -= 1
                throw Self.error(.noSpace, 28, "fallocate", info.path)
            }
            let size = offset + length
            let current = s.inodes[info.inode]!.current.count
            guard size > current else { return }
            if let capacity = s.capacity, Self.usedBytes(s) + (size - current) > capacity {
                throw Self.error(.noSpace, 28, "fallocate", info.path)
            }
            Self.resize(&s.inodes[info.inode]!.current, to: size)
            s.inodes[info.inode]!.pending.append(.resize(size))
            Self.countMutation(&s)
        }
    }

    public func rename(_ source: String, to destination: String) throws(FileSystemError) {
        let source = Self.normalize(source)
        let destination = Self.normalize(destination)
        try state.withLock { s throws(FileSystemError) in
            if s.crashed { throw Self.crashedError("rename", source) }
            guard let inode = s.names[source] else { throw Self.error(.notFound, 2, "rename", source) }
            s.names[source] = nil
            s.names[destination] = inode
            s.counters.renames += 1
            Self.countMutation(&s)
        }
    }

    public func remove(_ path: String) throws(FileSystemError) {
        let path = Self.normalize(path)
        try state.withLock { s throws(FileSystemError) in
            if s.crashed { throw Self.crashedError("unlink", path) }
            guard s.names.removeValue(forKey: path) != nil else { throw Self.error(.notFound, 2, "unlink", path) }
            Self.countMutation(&s)
        }
    }

    /// Directories are durable as soon as they exist (the fault model leaves directory creation out;
    /// see docs/simulation.md).
    public func createDirectory(_ path: String) throws(FileSystemError) {
        let path = Self.normalize(path)
        try state.withLock { s throws(FileSystemError) in
            if s.crashed { throw Self.crashedError("mkdir", path) }
            var current = path
            while !s.directories.contains(current) {
                s.directories.insert(current)
                current = parentDirectory(of: current)
            }
        }
    }

    public func contentsOfDirectory(_ path: String) throws(FileSystemError) -> [String] {
        let path = Self.normalize(path)
        return try state.withLock { s throws(FileSystemError) -> [String] in
            if s.crashed { throw Self.crashedError("opendir", path) }
            guard s.directories.contains(path) else { throw Self.error(.notFound, 2, "opendir", path) }
            var names: [String] = []
            for name in s.names.keys where parentDirectory(of: name) == path {
                names.append(String(name.dropFirst(path == "/" ? 1 : path.count + 1)))
            }
            for directory in s.directories where directory != path && parentDirectory(of: directory) == path {
                names.append(String(directory.dropFirst(path == "/" ? 1 : path.count + 1)))
            }
            return names.sorted()
        }
    }

    public func exists(_ path: String) -> Bool {
        let path = Self.normalize(path)
        return state.withLock { s in s.names[path] != nil || s.directories.contains(path) }
    }

    public func lockExclusively(_ path: String) throws(FileSystemError) -> OpenFile {
        let handle = try open(path, options: [.create])
        let path = Self.normalize(path)
        return try state.withLock { s throws(FileSystemError) -> OpenFile in
            if s.locks[path] != nil {
                s.handles[handle.rawValue] = nil
                throw Self.error(.locked, 11, "flock", path)
            }
            s.locks[path] = handle.rawValue
            return handle
        }
    }
}
