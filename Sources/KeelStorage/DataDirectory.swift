// The data directory: its layout, its lock and its `meta` file.
//
//   <data-dir>/LOCK                           flock()ed while a process owns the directory
//   <data-dir>/meta                           format version and identity, written once, atomically
//   <data-dir>/log/<first-index>.seg          log segments
//   <data-dir>/checkpoints/<index>-<term>.ckpt

import KeelCore
#if canImport(Glibc)
import Glibc
#endif

/// An opened (and, unless read-only, locked) data directory.
public final class DataDirectory: Sendable {
    /// The data directory.
    public let path: String
    /// `<path>/log`.
    public let logPath: String
    /// `<path>/checkpoints`.
    public let checkpointsPath: String
    let fileSystem: any FileSystem
    private let lockHandle: OpenFile?

    /// The storage format version recorded in `meta`. Part of the format.
    public static let formatVersion = 1

    /// The paths of a data directory, without opening it.
    public static func layout(_ path: String) -> (log: String, checkpoints: String, meta: String, lock: String) {
        (joinPath(path, "log"), joinPath(path, "checkpoints"), joinPath(path, "meta"), joinPath(path, "LOCK"))
    }

    /// Opens a data directory, creating it if needed, and takes its lock.
    ///
    /// - Throws: `.directoryLocked` if another process holds it; `.unrecoverable` if `meta`
    ///   names a format this build does not read.
    public init(path: String, fileSystem: any FileSystem, lock: Bool = true) throws(StorageError) {
        let layout = Self.layout(path)
        self.path = path
        self.logPath = layout.log
        self.checkpointsPath = layout.checkpoints
        self.fileSystem = fileSystem
        do {
            if lock { try fileSystem.createDirectory(path) }
        } catch { throw .fileSystem(error) }
        if lock {
            // A lock held for a moment (a child process this one is starting holds copies of its
            // descriptors until it execs) is waited for, up to a second; a lock held for longer
            // belongs to another owner.
            var handle: OpenFile?
            for attempt in 0..<100 where handle == nil {
                do { handle = try fileSystem.lockExclusively(layout.lock) } catch {
                    guard error.kind == .locked else { throw .fileSystem(error) }
                    if attempt == 99 { throw .directoryLocked(path: path) }
                    var pause = timespec(tv_sec: 0, tv_nsec: 10_000_000)
                    nanosleep(&pause, nil)
                }
            }
            lockHandle = handle
        } else {
            lockHandle = nil
            guard fileSystem.exists(path) else {
                throw .fileSystem(FileSystemError(kind: .notFound, errno: 2, operation: "open data directory", path: path))
            }
        }
        do throws(StorageError) {
            if lock {
                do {
                    try fileSystem.createDirectory(layout.log)
                    try fileSystem.createDirectory(layout.checkpoints)
                    try fileSystem.synchronizeDirectory(path)
                } catch { throw .fileSystem(error) }
            }
            try checkMeta(layout.meta, create: lock)
        } catch {
            if let lockHandle { fileSystem.close(lockHandle) }
            throw error
        }
    }

    private func checkMeta(_ metaPath: String, create: Bool) throws(StorageError) {
        if fileSystem.exists(metaPath) {
            let bytes: [UInt8]
            do {
                let handle = try fileSystem.open(metaPath, options: [.readOnly])
                defer { fileSystem.close(handle) }
                bytes = try fileSystem.readRange(handle, offset: 0, count: 4096, path: metaPath)
            } catch { throw .fileSystem(error) }
            let text = String(decoding: bytes, as: UTF8.self)
            let lines = text.split(separator: "\n").map(String.init)
            guard let versionLine = lines.first(where: { $0.hasPrefix("format-version=") }),
                  let version = Int(versionLine.dropFirst("format-version=".count)) else {
                throw .corruption(file: metaPath, offset: 0, reason: "meta has no readable format-version line",
                                  remedy: "Check that this is a Keel data directory; `keel inspect \(path)` shows what is in it.")
            }
            guard version == Self.formatVersion else {
                throw .unrecoverable(reason: "\(metaPath) says storage format \(version); this build reads format \(Self.formatVersion)",
                                     remedy: "Run a Keel build that reads format \(version).")
            }
            return
        }
        guard create else { return }
        let contents = Array("keel data directory\nformat-version=\(Self.formatVersion)\n".utf8)
        let temporary = metaPath + ".tmp"
        do {
            let handle = try fileSystem.open(temporary, options: [.create, .truncate])
            defer { fileSystem.close(handle) }
            try fileSystem.write(handle, contents, at: 0)
            try fileSystem.synchronize(handle)
            try fileSystem.rename(temporary, to: metaPath)
            try fileSystem.synchronizeDirectory(path)
        } catch { throw .fileSystem(error) }
    }

    /// Releases the lock.
    public func unlock() {
        if let lockHandle { fileSystem.close(lockHandle) }
    }

    /// The segment files in `log/`, by first index.
    public static func segmentNames(logPath: String, fileSystem: any FileSystem) throws(StorageError) -> [String] {
        let names: [String]
        do { names = try fileSystem.contentsOfDirectory(logPath) } catch { throw .fileSystem(error) }
        return names.filter { LogFormat.firstIndex(fromSegmentName: $0) != nil }.sorted()
    }
}
