// The seam between Keel's storage engine and the operating system.
//
// Everything KeelStorage does to a disk goes through `FileSystem`: the POSIX implementation for real
// use, and `SimulatedFileSystem` for tests, which remembers what has been synced and can crash,
// tear writes, fail fsync with EIO, run out of space and flip bits. Durability arguments in the
// engine are written against the semantics documented here, which are Linux's:
//
// - `write` makes data visible to later reads, not durable.
// - `synchronize` (fdatasync) makes a file's data and size durable. It does not make the file's
//   *name* durable: a new, renamed or removed name is durable only after `synchronizeDirectory`
//   of its parent directory.
// - A failed `synchronize` may have dropped the dirty data: it must never be retried as if the
//   data were still there (the fsyncgate lesson).

/// An open file (a descriptor). The number is a descriptor for the POSIX file system and a token for the simulated one.
public struct OpenFile: Hashable, Sendable, CustomStringConvertible {
    public let rawValue: Int32

    public init(rawValue: Int32) { self.rawValue = rawValue }

    public var description: String { "fd \(rawValue)" }
}

/// How to open a file.
public struct OpenOptions: OptionSet, Sendable {
    public let rawValue: Int
    public init(rawValue: Int) { self.rawValue = rawValue }

    /// Create the file if it does not exist.
    public static let create = OpenOptions(rawValue: 1 << 0)
    /// Fail if the file exists (with `create`).
    public static let exclusive = OpenOptions(rawValue: 1 << 1)
    /// Truncate the file to zero bytes.
    public static let truncate = OpenOptions(rawValue: 1 << 2)
    /// Open for reading only.
    public static let readOnly = OpenOptions(rawValue: 1 << 3)
}

/// A failed system call, with the operation and path it concerned.
public struct FileSystemError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The kinds of failure the engine treats differently.
    public enum Kind: Sendable, Equatable {
        /// ENOSPC (or EDQUOT): the disk is full. The engine fails the write and keeps serving reads.
        case noSpace
        /// EIO: the device failed. After a failed fsync the node stops.
        case inputOutput
        /// ENOENT.
        case notFound
        /// EEXIST.
        case alreadyExists
        /// EWOULDBLOCK on a lock: another process holds it.
        case locked
        /// The simulated machine has crashed; nothing more happens until it restarts.
        case crashed
        /// Anything else, by errno.
        case other
    }

    /// What kind of failure this is.
    public var kind: Kind
    /// The errno value (0 for a simulated crash).
    public var errno: Int32
    /// The call that failed, such as `fdatasync`.
    public var operation: String
    /// The file or directory it concerned.
    public var path: String

    public init(kind: Kind, errno: Int32, operation: String, path: String) {
        self.kind = kind
        self.errno = errno
        self.operation = operation
        self.path = path
    }

    public var description: String {
        let reason: String
        switch kind {
        case .noSpace: reason = "no space left on device"
        case .inputOutput: reason = "input/output error"
        case .notFound: reason = "no such file or directory"
        case .alreadyExists: reason = "file exists"
        case .locked: reason = "locked by another process"
        case .crashed: reason = "simulated crash"
        case .other: reason = "errno \(errno)"
        }
        return "\(operation) \(path): \(reason)"
    }
}

/// The file operations the storage engine needs, with Linux's durability semantics.
///
/// Offsets and sizes are in bytes. Every call that touches the disk can throw ``FileSystemError``;
/// none of them traps on a failure of the system.
public protocol FileSystem: Sendable {
    /// Opens (and with `.create`, creates) a file.
    func open(_ path: String, options: OpenOptions) throws(FileSystemError) -> OpenFile

    /// Closes a file. Errors are ignored: by then the data is synced or deliberately abandoned.
    func close(_ handle: OpenFile)

    /// Writes all of `bytes` at `offset` (pwrite, repeated until done).
    func write(_ handle: OpenFile, _ bytes: UnsafeRawBufferPointer, at offset: Int) throws(FileSystemError)

    /// Reads up to `buffer.count` bytes at `offset` (pread); returns how many were read (0 at the end).
    func read(_ handle: OpenFile, into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(FileSystemError) -> Int

    /// The file's size in bytes.
    func size(of handle: OpenFile) throws(FileSystemError) -> Int

    /// Makes the file's data and size durable (fdatasync).
    func synchronize(_ handle: OpenFile) throws(FileSystemError)

    /// Makes the names in a directory durable (fsync of the directory).
    func synchronizeDirectory(_ path: String) throws(FileSystemError)

    /// Sets the file's size (ftruncate).
    func truncate(_ handle: OpenFile, to size: Int) throws(FileSystemError)

    /// Reserves space so later writes below `offset + length` need no allocation (fallocate, mode 0:
    /// the file grows to at least `offset + length`, and the new bytes read as zeros).
    func allocate(_ handle: OpenFile, offset: Int, length: Int) throws(FileSystemError)

    /// Writes zeros over a range (the blocks are then written, not merely reserved: an
    /// fdatasync of later overwrites need not commit extent metadata). By default the same as
    /// `allocate` (a simulated file reads zeros either way).
    func zeroFill(_ handle: OpenFile, offset: Int, length: Int) throws(FileSystemError)

    /// Whether `zeroFill` writes blocks for real (and so is worth doing ahead of time, on another
    /// thread). False by default: the simulated file system stays deterministic, with no thread
    /// of the log's own touching it in the background.
    var zeroFillWritesBlocks: Bool { get }

    /// Renames a file, replacing `destination` if it exists (rename).
    func rename(_ source: String, to destination: String) throws(FileSystemError)

    /// Removes a file (unlink).
    func remove(_ path: String) throws(FileSystemError)

    /// Creates a directory and any missing parents; succeeds if it exists.
    func createDirectory(_ path: String) throws(FileSystemError)

    /// The names in a directory (not paths), in no particular order.
    func contentsOfDirectory(_ path: String) throws(FileSystemError) -> [String]

    /// Whether a file or directory exists at `path`.
    func exists(_ path: String) -> Bool

    /// Takes an exclusive advisory lock (flock) on `path`, creating it if needed. The lock is held
    /// until the returned handle is closed or the process exits. Throws `.locked` if another holds it.
    func lockExclusively(_ path: String) throws(FileSystemError) -> OpenFile
}

extension FileSystem {
    /// Writes an array of bytes at `offset`.
    public func write(_ handle: OpenFile, _ bytes: [UInt8], at offset: Int) throws(FileSystemError) {
        var failure: FileSystemError?
        bytes.withUnsafeBytes { raw in
            do throws(FileSystemError) { try write(handle, raw, at: offset) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// Reads exactly the whole file into memory.
    public func readAll(_ handle: OpenFile, path: String) throws(FileSystemError) -> [UInt8] {
        let total = try size(of: handle)
        return try readRange(handle, offset: 0, count: total, path: path)
    }

    /// Opens, reads whole and closes the file at `path`.
    public func readFile(_ path: String) throws(FileSystemError) -> [UInt8] {
        let handle = try open(path, options: [.readOnly])
        defer { close(handle) }
        return try readAll(handle, path: path)
    }

    /// Reads `count` bytes at `offset`; fewer if the file ends first.
    public func readRange(_ handle: OpenFile, offset: Int, count: Int, path: String) throws(FileSystemError) -> [UInt8] {
        var result = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            var failure: FileSystemError?
            let n = result.withUnsafeMutableBytes { raw -> Int in
                do throws(FileSystemError) { return try read(handle, into: UnsafeMutableRawBufferPointer(rebasing: raw[done...]), at: offset + done) } catch {
                    failure = error
                    return 0
                }
            }
            if let failure { throw failure }
            if n == 0 { break }
            done += n
        }
        if done < count { result.removeLast(count - done) }
        return result
    }
}

/// Joins path components with `/`.
func joinPath(_ directory: String, _ name: String) -> String {
    directory.hasSuffix("/") ? directory + name : directory + "/" + name
}

/// The parent directory of a path.
func parentDirectory(of path: String) -> String {
    guard let slash = path.lastIndex(of: "/") else { return "." }
    if slash == path.startIndex { return "/" }
    return String(path[path.startIndex..<slash])
}

extension FileSystem {
    public func zeroFill(_ handle: OpenFile, offset: Int, length: Int) throws(FileSystemError) {
        try allocate(handle, offset: offset, length: length)
    }

    public var zeroFillWritesBlocks: Bool { false }
}
