import Foundation
import KeelCore
import Logging
@testable import KeelStorage

let quietLogger = Logger(label: "keel.test") { _ in SwiftLogNoOpLogHandler() }

typealias MapStore = DurableStore<MapStateMachine>

/// Options with small segments so tests rotate, and checkpoints only on demand (deterministic).
func smallOptions(segmentSize: Int = 4096, policy: FsyncPolicy = .always) -> StoreOptions {
    var options = StoreOptions()
    options.log = LogOptions(fsyncPolicy: policy, segmentSize: segmentSize)
    options.checkpointLogBytes = 0
    return options
}

func openStore(_ fs: any FileSystem, path: String = "/data", options: StoreOptions = smallOptions()) throws(StorageError) -> MapStore {
    try MapStore(path: path, options: options, fileSystem: fs, logger: quietLogger, wallClock: { 1_700_000_000_000 })
}

func bytes(_ text: String) -> [UInt8] { Array(text.utf8) }

/// A model of the map commands written independently of `MapStateMachine`.
enum Command: Equatable, CustomStringConvertible {
    case set(String, String)
    case delete(String)
    case add(String, Int64)

    var encoded: [UInt8] {
        switch self {
        case .set(let key, let value): MapStateMachine.set(bytes(key), bytes(value))
        case .delete(let key): MapStateMachine.delete(bytes(key))
        case .add(let key, let delta): MapStateMachine.add(bytes(key), delta)
        }
    }

    func apply(to model: inout [String: String]) {
        switch self {
        case .set(let key, let value): model[key] = value
        case .delete(let key): model[key] = nil
        case .add(let key, let delta):
            let current = model[key].flatMap { Int64($0.dropFirst("#".count)) } ?? 0
            model[key] = "#\(current + delta)"
        }
    }

    var description: String {
        switch self {
        case .set(let key, let value): "set \(key)=\(value)"
        case .delete(let key): "delete \(key)"
        case .add(let key, let delta): "add \(key) \(delta)"
        }
    }
}

/// Reads the store's map in the model's terms: keys starting with "n" hold numbers, shown as "#n".
func contents(_ store: MapStore) -> [String: String] {
    store.read { machine in
        var result: [String: String] = [:]
        for (key, value) in machine.pairs {
            let name = String(decoding: key, as: UTF8.self)
            if name.hasPrefix("n"), let number = machine.number(key) {
                result[name] = "#\(number)"
            } else {
                result[name] = String(decoding: value, as: UTF8.self)
            }
        }
        return result
    }
}

func model(of commands: some Sequence<Command>) -> [String: String] {
    var result: [String: String] = [:]
    for command in commands { command.apply(to: &result) }
    return result
}

/// A file system that holds the writer inside a chosen fdatasync until released, to make group
/// commit observable without timing.
final class GatedFileSystem: FileSystem, @unchecked Sendable {
    // @unchecked Sendable: `gateArmed` is read and written under `lock`.
    let inner: SimulatedFileSystem
    private let lock = NSLock()
    private var gateArmed = false
    private var gateTaken = false
    let entered = DispatchSemaphore(value: 0)
    let release = DispatchSemaphore(value: 0)

    init(_ inner: SimulatedFileSystem) { self.inner = inner }

    /// Whether a synchronize is being held at the gate (for async tests, which must not block).
    var hasEntered: Bool { lock.withLock { gateTaken } }

    /// Waits, without blocking a thread of the cooperative pool, until a synchronize is held.
    func waitUntilEntered() async throws {
        while !hasEntered { try await Task.sleep(for: .milliseconds(1)) }
    }

    /// The next synchronize signals `entered` and waits for `release`.
    func armGate() { lock.withLock { gateArmed = true } }

    func synchronize(_ handle: OpenFile) throws(FileSystemError) {
        let gated = lock.withLock { () -> Bool in
            defer { gateArmed = false }
            return gateArmed
        }
        if gated {
            lock.withLock { gateTaken = true }
            entered.signal()
            release.wait()
        }
        try inner.synchronize(handle)
    }

    func open(_ path: String, options: OpenOptions) throws(FileSystemError) -> OpenFile { try inner.open(path, options: options) }
    func close(_ handle: OpenFile) { inner.close(handle) }
    func write(_ handle: OpenFile, _ bytes: UnsafeRawBufferPointer, at offset: Int) throws(FileSystemError) { try inner.write(handle, bytes, at: offset) }
    func read(_ handle: OpenFile, into buffer: UnsafeMutableRawBufferPointer, at offset: Int) throws(FileSystemError) -> Int { try inner.read(handle, into: buffer, at: offset) }
    func size(of handle: OpenFile) throws(FileSystemError) -> Int { try inner.size(of: handle) }
    func synchronizeDirectory(_ path: String) throws(FileSystemError) { try inner.synchronizeDirectory(path) }
    func truncate(_ handle: OpenFile, to size: Int) throws(FileSystemError) { try inner.truncate(handle, to: size) }
    func allocate(_ handle: OpenFile, offset: Int, length: Int) throws(FileSystemError) { try inner.allocate(handle, offset: offset, length: length) }
    func rename(_ source: String, to destination: String) throws(FileSystemError) { try inner.rename(source, to: destination) }
    func remove(_ path: String) throws(FileSystemError) { try inner.remove(path) }
    func createDirectory(_ path: String) throws(FileSystemError) { try inner.createDirectory(path) }
    func contentsOfDirectory(_ path: String) throws(FileSystemError) -> [String] { try inner.contentsOfDirectory(path) }
    func exists(_ path: String) -> Bool { inner.exists(path) }
    func lockExclusively(_ path: String) throws(FileSystemError) -> OpenFile { try inner.lockExclusively(path) }
}

/// A fresh directory under the system's temporary directory, removed by the caller.
func temporaryDirectory(_ name: String) -> String {
    let path = NSTemporaryDirectory() + "keel-test-\(name)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
    try? FileManager.default.removeItem(atPath: path)
    return path
}

/// The directory holding the built products (the test bundle sits beside the executables).
func productsDirectory() -> String {
    if let override = ProcessInfo.processInfo.environment["KEEL_PRODUCTS_DIR"] { return override }
    var url = URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
    while url.path != "/" {
        url.deleteLastPathComponent()
        if FileManager.default.isExecutableFile(atPath: url.appendingPathComponent("keel").path) { return url.path }
    }
    return FileManager.default.currentDirectoryPath + "/.build/debug"
}

/// Runs a built executable to completion and returns its exit status and output.
@discardableResult
func run(_ executable: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: productsDirectory() + "/" + executable)
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    try process.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: data, as: UTF8.self))
}
