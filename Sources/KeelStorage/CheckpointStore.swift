// The `checkpoints` directory: publishing a checkpoint atomically, listing, loading, pruning.
//
// Publication is crash-safe step by step:
//   1. write header, body and trailer to `<index>-<term>.ckpt.tmp` (a crash leaves a stray temp
//      file, removed at the next start);
//   2. fdatasync the temp file (its bytes are durable before any name points at them);
//   3. rename it to `<index>-<term>.ckpt` (atomic: readers see the old set or the new set);
//   4. fsync the directory (the new name is durable; until then a crash may forget the checkpoint,
//      which is safe because the log still holds every entry it covers).
// Only after step 4 may older checkpoints and covered log segments be removed.

import KeelCore

/// A checkpoint file found in the directory.
public struct CheckpointFile: Sendable, Equatable {
    /// Its file name.
    public var name: String
    /// The index in its name.
    public var index: LogIndex
    /// The term in its name.
    public var term: Term
}

/// Reads and writes the checkpoint files of a data directory.
public struct CheckpointStore: Sendable {
    /// The `checkpoints` directory.
    public let directory: String
    let fileSystem: any FileSystem
    let limits: Limits

    public init(directory: String, fileSystem: any FileSystem, limits: Limits = Limits()) {
        self.directory = directory
        self.fileSystem = fileSystem
        self.limits = limits
    }

    /// The checkpoint files, newest (highest index) first. Temporary files are not listed.
    public func list() throws(StorageError) -> [CheckpointFile] {
        let names: [String]
        do { names = try fileSystem.contentsOfDirectory(directory) } catch { throw .fileSystem(error) }
        return names.compactMap { name in
            CheckpointFormat.parseFileName(name).map { CheckpointFile(name: name, index: $0.index, term: $0.term) }
        }.sorted { ($0.index, $0.term) > ($1.index, $1.term) }
    }

    /// Names of temporary files left by a crash during publication.
    public func strayTemporaryFiles() throws(StorageError) -> [String] {
        do { return try fileSystem.contentsOfDirectory(directory).filter { $0.hasSuffix(CheckpointFormat.temporaryExtension) }.sorted() } catch {
            throw .fileSystem(error)
        }
    }

    /// Removes temporary files left by a crash.
    public func removeStrayTemporaryFiles() throws(StorageError) {
        let stray = try strayTemporaryFiles()
        guard !stray.isEmpty else { return }
        do {
            for name in stray { try fileSystem.remove(joinPath(directory, name)) }
            try fileSystem.synchronizeDirectory(directory)
        } catch { throw .fileSystem(error) }
    }

    /// Writes and publishes a checkpoint.
    ///
    /// - Parameters:
    ///   - source: the immutable state copy, which writes the body.
    ///   - metadata: the index and term it covers.
    /// - Returns: the published file.
    /// - Complexity: O(size of the state).
    public func write(_ source: some CheckpointSource, metadata: CheckpointMetadata) throws(StorageError) -> CheckpointFile {
        let name = CheckpointFormat.fileName(index: metadata.index, term: metadata.term)
        let temporary = joinPath(directory, String(name.dropLast(CheckpointFormat.fileExtension.count)) + CheckpointFormat.temporaryExtension)
        let handle: OpenFile
        do { handle = try fileSystem.open(temporary, options: [.create, .truncate]) } catch { throw wrap(error) }
        do throws(StorageError) {
            do { try fileSystem.write(handle, CheckpointFormat.encodeHeader(metadata), at: 0) } catch { throw wrap(error) }
            var sink = CheckpointSink(fileSystem: fileSystem, handle: handle, path: temporary, offset: CheckpointFormat.headerSize)
            try source.writeCheckpoint(to: &sink)
            try sink.flush()
            let trailer = CheckpointFormat.encodeTrailer(bodySize: sink.bodySize, bodyChecksum: sink.checksum)
            do {
                try fileSystem.write(handle, trailer, at: sink.offset)
                try fileSystem.synchronize(handle)
            } catch { throw wrap(error) }
            fileSystem.close(handle)
        } catch {
            fileSystem.close(handle)
            // The temporary file is useless now; it is also removed at the next start if this fails.
            do { try fileSystem.remove(temporary) } catch let removal {
                throw StorageError.fileSystem(FileSystemError(kind: removal.kind, errno: removal.errno, operation: removal.operation,
                                                              path: "\(removal.path) (after: \(error))"))
            }
            throw error
        }
        do {
            try fileSystem.rename(temporary, to: joinPath(directory, name))
            try fileSystem.synchronizeDirectory(directory)
        } catch { throw wrap(error) }
        return CheckpointFile(name: name, index: metadata.index, term: metadata.term)
    }

    /// The size in bytes of a checkpoint file.
    public func size(of file: CheckpointFile) throws(StorageError) -> Int {
        let path = joinPath(directory, file.name)
        do {
            let handle = try fileSystem.open(path, options: [.readOnly])
            defer { fileSystem.close(handle) }
            return try fileSystem.size(of: handle)
        } catch { throw .fileSystem(error) }
    }

    private func wrap(_ error: FileSystemError) -> StorageError {
        error.kind == .noSpace ? .noSpace(error) : .fileSystem(error)
    }

    /// Reads and verifies a checkpoint; returns its metadata and body, or why it is invalid.
    public func load(_ file: CheckpointFile) throws(StorageError) -> Result<(CheckpointMetadata, [UInt8]), FormatProblem> {
        let path = joinPath(directory, file.name)
        let bytes: [UInt8]
        do {
            let handle = try fileSystem.open(path, options: [.readOnly])
            defer { fileSystem.close(handle) }
            let size = try fileSystem.size(of: handle)
            guard size <= limits.checkpointSizeMax + CheckpointFormat.headerSize + CheckpointFormat.trailerSize else {
                return .failure(FormatProblem("the file has \(size) bytes, over the limit of \(limits.checkpointSizeMax)"))
            }
            bytes = try fileSystem.readAll(handle, path: path)
        } catch { throw .fileSystem(error) }
        switch CheckpointFormat.verify(bytes, limits: limits) {
        case .failure(let problem):
            return .failure(problem)
        case .success(let (metadata, body)):
            guard metadata.index == file.index, metadata.term == file.term else {
                return .failure(FormatProblem("the header says index \(metadata.index), term \(metadata.term), but the file name says index \(file.index), term \(file.term)"))
            }
            return .success((metadata, Array(bytes[body])))
        }
    }

    /// Keeps the newest `keep` checkpoints that are not known to be damaged and removes the rest
    /// (damaged ones included).
    ///
    /// - Parameter damaged: names of checkpoints that failed verification.
    /// - Returns: the checkpoints that remain, newest first.
    @discardableResult
    public func prune(keep: Int, damaged: Set<String> = []) throws(StorageError) -> [CheckpointFile] {
        let all = try list()
        let kept = Array(all.filter { !damaged.contains($0.name) }.prefix(keep))
        let keptNames = Set(kept.map(\.name))
        let doomed = all.filter { !keptNames.contains($0.name) }
        guard !doomed.isEmpty else { return kept }
        do {
            for file in doomed { try fileSystem.remove(joinPath(directory, file.name)) }
            try fileSystem.synchronizeDirectory(directory)
        } catch { throw .fileSystem(error) }
        return kept
    }
}
