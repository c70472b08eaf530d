// The real file system: thin wrappers over pwrite, pread, fdatasync, fsync of a directory, rename,
// ftruncate and fallocate, each turning errno into a `FileSystemError` that names the call and path.

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import CKeelSystemShims

/// `FileSystem` on the operating system's calls (Linux first).
///
/// Darwin needs `F_FULLFSYNC` where Linux has `fdatasync`; this type uses `fsync` there, which is not
/// enough for durability on Apple hardware and is marked as a known gap in docs/recovery.md.
public struct POSIXFileSystem: FileSystem {
    public init() {}

    private func failure(_ operation: String, _ path: String, _ code: Int32) -> FileSystemError {
        let kind: FileSystemError.Kind
        switch code {
        case ENOSPC, EDQUOT: kind = .noSpace
        case EIO: kind = .inputOutput
        case ENOENT: kind = .notFound
        case EEXIST: kind = .alreadyExists
        case EWOULDBLOCK: kind = .locked
        default: kind = .other
        }
        return FileSystemError(kind: kind, errno: code, operation: operation, path: path)
    }

    private func describe(_ handle: OpenFile) -> String { "fd \(handle.rawValue)" }

    public func open(_ path: String, options: OpenOptions) throws(FileSystemError) -> OpenFile {
        var flags: Int32 = O_CLOEXEC
        flags |= options.contains(.readOnly) ? O_RDONLY : O_RDWR
        if options.contains(.create) { flags |= O_CREAT }
        if options.contains(.exclusive) { flags |= O_EXCL }
        if options.contains(.truncate) { flags |= O_TRUNC }
        while true {
            let fd = Glibc.open(path, flags, 0o644)
            if fd >= 0 { return OpenFile(rawValue: fd) }
            let code = errno
            if code == EINTR { continue }
            throw failure("open", path, code)
        }
    }

    public func close(_ handle: OpenFile) {
        _ = Glibc.close(handle.rawValue)
    }

    public func write(_ handle: OpenFile, _ bytes: UnsafeRawBufferPointer, at offset: Int) throws(FileSystemError) {
        var done = 0
        while done < bytes.count {
            let n = pwrite(handle.rawValue, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
            if n < 0 {
                let code = errno
                if code == EINTR { continue }
                throw failure("pwrite", describe(handle), code)
            }
            if n == 0 { throw failure("pwrite", describe(handle), ENOSPC) }
            done += n
        }
    }

    public func read(_ handle: OpenFile, into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(FileSystemError) -> Int {
        guard buffer.count > 0 else { return 0 }
        while true {
            let n = pread(handle.rawValue, buffer.baseAddress!, buffer.count, off_t(offset))
            if n >= 0 { return n }
            let code = errno
            if code == EINTR { continue }
            throw failure("pread", describe(handle), code)
        }
    }

    public func size(of handle: OpenFile) throws(FileSystemError) -> Int {
        var info = stat()
        if fstat(handle.rawValue, &info) != 0 { throw failure("fstat", describe(handle), errno) }
        return Int(info.st_size)
    }

    public func synchronize(_ handle: OpenFile) throws(FileSystemError) {
        #if canImport(Glibc)
        let result = fdatasync(handle.rawValue)
        #else
        let result = fsync(handle.rawValue)
        #endif
        // Never retried, not even on EINTR: after a failed sync the kernel may have dropped the
        // dirty pages, so a second call could "succeed" without the data (docs/recovery.md).
        if result != 0 { throw failure("fdatasync", describe(handle), errno) }
    }

    public func synchronizeDirectory(_ path: String) throws(FileSystemError) {
        let fd = ckeel_open_directory(path)
        if fd < 0 { throw failure("open directory", path, errno) }
        defer { _ = Glibc.close(fd) }
        if fsync(fd) != 0 { throw failure("fsync directory", path, errno) }
    }

    public func truncate(_ handle: OpenFile, to size: Int) throws(FileSystemError) {
        while ftruncate(handle.rawValue, off_t(size)) != 0 {
            let code = errno
            if code == EINTR { continue }
            throw failure("ftruncate", describe(handle), code)
        }
    }

    public func allocate(_ handle: OpenFile, offset: Int, length: Int) throws(FileSystemError) {
        let code = ckeel_fallocate(handle.rawValue, Int64(offset), Int64(length))
        if code != 0 { throw failure("fallocate", describe(handle), code) }
    }

    public var zeroFillWritesBlocks: Bool { true }

    public func zeroFill(_ handle: OpenFile, offset: Int, length: Int) throws(FileSystemError) {
        try allocate(handle, offset: offset, length: length)
        let zeros = [UInt8](repeating: 0, count: min(length, 1 << 20))
        var at = offset
        while at < offset + length {
            let count = min(zeros.count, offset + length - at)
            try write(handle, count == zeros.count ? zeros : [UInt8](repeating: 0, count: count), at: at)
            at += count
        }
    }

    public func rename(_ source: String, to destination: String) throws(FileSystemError) {
        if Glibc.rename(source, destination) != 0 { throw failure("rename", "\(source) -> \(destination)", errno) }
    }

    public func remove(_ path: String) throws(FileSystemError) {
        if unlink(path) != 0 { throw failure("unlink", path, errno) }
    }

    public func createDirectory(_ path: String) throws(FileSystemError) {
        if exists(path) { return }
        let parent = parentDirectory(of: path)
        if parent != path && parent != "." && parent != "/" && !exists(parent) {
            try createDirectory(parent)
        }
        if mkdir(path, 0o755) != 0 {
            let code = errno
            if code == EEXIST { return }
            throw failure("mkdir", path, code)
        }
    }

    public func contentsOfDirectory(_ path: String) throws(FileSystemError) -> [String] {
        guard let directory = opendir(path) else { throw failure("opendir", path, errno) }
        defer { closedir(directory) }
        var names: [String] = []
        while let entry = readdir(directory) {
            let name = withUnsafePointer(to: entry.pointee.d_name) { pointer in
                pointer.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names
    }

    public func exists(_ path: String) -> Bool {
        var info = stat()
        return stat(path, &info) == 0
    }

    public func lockExclusively(_ path: String) throws(FileSystemError) -> OpenFile {
        let handle = try open(path, options: [.create])
        let code = ckeel_flock_exclusive(handle.rawValue)
        if code != 0 {
            close(handle)
            throw failure("flock", path, code)
        }
        return handle
    }
}
