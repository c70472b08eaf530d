// The errors KeelStorage throws across its boundary. Each case carries what an operator needs to
// find the problem; startup errors also say which command inspects or repairs it.

import KeelCore

/// A failure of the storage engine.
public enum StorageError: Error, Sendable, Equatable, CustomStringConvertible {
    /// The disk is full. The write was not made; earlier data is intact and reads keep working.
    case noSpace(FileSystemError)
    /// The log stopped after a fatal error (a failed fsync, or a write error other than ENOSPC).
    /// Nothing after it was acknowledged and every later write is refused. Restart the process.
    case stopped(reason: String)
    /// Damage in a file, where it is, and what to do about it.
    case corruption(file: String, offset: Int, reason: String, remedy: String)
    /// Recovery cannot produce the state: the reason, and what to do.
    case unrecoverable(reason: String, remedy: String)
    /// Another process holds the data directory.
    case directoryLocked(path: String)
    /// A file-system call failed outside the write path (opening, listing, reading).
    case fileSystem(FileSystemError)
    /// An entry larger than `Limits.entrySizeMax`.
    case entryTooLarge(size: Int, limit: Int)
    /// More appends are waiting than `Limits.appendQueueCountMax` allows.
    case overloaded(queued: Int)
    /// The entry is not in the log: compacted into a checkpoint, or not yet written.
    case entryUnavailable(LogIndex, firstIndex: LogIndex, lastIndex: LogIndex)
    /// A setting outside its allowed range.
    case invalidConfiguration(String)
    /// The log or store was closed.
    case closed

    public var description: String {
        switch self {
        case .noSpace(let error):
            return "storage: disk full (\(error)); the write was not made, earlier data is intact and reads still work"
        case .stopped(let reason):
            return "storage: the log has stopped after a fatal error and refuses all writes: \(reason). Restart the process to recover from what is on disk."
        case .corruption(let file, let offset, let reason, let remedy):
            return "storage: corruption in \(file) at offset \(offset): \(reason). \(remedy)"
        case .unrecoverable(let reason, let remedy):
            return "storage: cannot recover: \(reason). \(remedy)"
        case .directoryLocked(let path):
            return "storage: the data directory \(path) is in use by another process (its LOCK file is held); stop that process or choose another --data-dir"
        case .fileSystem(let error):
            return "storage: \(error)"
        case .entryTooLarge(let size, let limit):
            return "storage: an entry of \(size) bytes is over the limit of \(limit) bytes"
        case .overloaded(let queued):
            return "storage: \(queued) appends are already waiting for the disk; try again"
        case .entryUnavailable(let index, let first, let last):
            return "storage: entry \(index) is not in the log (it holds \(first)...\(last))"
        case .invalidConfiguration(let message):
            return "storage: invalid configuration: \(message)"
        case .closed:
            return "storage: closed"
        }
    }
}

/// When the log's writes become durable.
public enum FsyncPolicy: String, Sendable, CaseIterable {
    /// fdatasync before every acknowledgement (group commit shares one among concurrent appenders).
    case always
    /// Acknowledge after the write; fdatasync about once a second. A crash loses up to a second.
    case everysec
    /// Acknowledge after the write; leave syncing to the operating system (and to rotation and close).
    case never
}
