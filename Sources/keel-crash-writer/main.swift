// The real-process crash test's writer: appends with fsync `always` until it is SIGKILLed.
//
//   keel-crash-writer write DIR [APPENDERS]   each appender t continues from what DIR holds and loops: set "t<t>-<n>", then add 1 to
//                                             "count-<t>"; after the add is acknowledged it prints
//                                             "ack <t> <n>" (and flushes)
//   keel-crash-writer check DIR               recovers DIR and prints "task <t> keys <k> count <c>"
//                                             per appender; exits 1 if a task's keys are not the
//                                             prefix 0..<k or its count is not k-1 or k
//
// Small segments and a low checkpoint threshold put rotations, checkpoints and compaction in
// the path of the kill.

import Foundation
import KeelCore
import KeelStorage

/// Writes a line straight to stdout (unbuffered, so nothing acknowledged is lost to a kill).
func emit(_ line: String) {
    var text = line + "\n"
    text.withUTF8 { buffer in _ = write(1, buffer.baseAddress, buffer.count) }
}

func options() -> StoreOptions {
    var options = StoreOptions()
    options.log = LogOptions(fsyncPolicy: .always, segmentSize: 64 * 1024)
    options.checkpointLogBytes = 256 * 1024
    return options
}

func key(_ task: Int, _ n: Int) -> [UInt8] { Array("t\(task)-\(n)".utf8) }
func counter(_ task: Int) -> [UInt8] { Array("count-\(task)".utf8) }

let arguments = CommandLine.arguments
guard arguments.count >= 3 else {
    FileHandle.standardError.write(Data("usage: keel-crash-writer write|check DIR [APPENDERS]\n".utf8))
    exit(2)
}
let directory = arguments[2]
let appenders = arguments.count > 3 ? Int(arguments[3]) ?? 4 : 4

let store: DurableStore<MapStateMachine>
do {
    store = try DurableStore<MapStateMachine>(path: directory, options: options())
} catch {
    FileHandle.standardError.write(Data("open failed: \(error)\n".utf8))
    exit(3)
}

switch arguments[1] {
case "write":
    let payload = [UInt8](repeating: 0x61, count: 100)
    await withTaskGroup(of: Void.self) { group in
        for task in 0..<appenders {
            // Continue where the previous run stopped: after n pairs, keys 0..<n exist and the
            // counter is n, or n-1 if the kill fell between a set and its add.
            let start = store.read { machine in
                var keys = 0
                while machine[key(task, keys)] != nil { keys += 1 }
                return keys
            }
            let counted = store.read { $0.number(counter(task)) } ?? 0
            group.addTask {
                var n = start
                if counted == Int64(n) - 1 {
                    do { _ = try await store.execute(MapStateMachine.add(counter(task), 1)) } catch {
                        FileHandle.standardError.write(Data("append failed: \(error)\n".utf8))
                        exit(4)
                    }
                }
                while true {
                    do {
                        _ = try await store.execute(MapStateMachine.set(key(task, n), payload))
                        _ = try await store.execute(MapStateMachine.add(counter(task), 1))
                        emit("ack \(task) \(n)")
                        n += 1
                    } catch {
                        FileHandle.standardError.write(Data("append failed: \(error)\n".utf8))
                        exit(4)
                    }
                }
            }
        }
    }
case "check":
    var failed = false
    let report = store.read { machine -> [String] in
        var lines: [String] = []
        for task in 0..<appenders {
            var keys = 0
            while machine[key(task, keys)] != nil { keys += 1 }
            let count = machine.number(counter(task)) ?? 0
            let stray = machine.pairs.keys.contains { k in
                let text = String(decoding: k, as: UTF8.self)
                guard text.hasPrefix("t\(task)-"), let n = Int(text.dropFirst("t\(task)-".count)) else { return false }
                return n >= keys
            }
            if stray || !(count == Int64(keys) || count == Int64(keys) - 1) { failed = true }
            lines.append("task \(task) keys \(keys) count \(count)\(stray ? " GAP" : "")")
        }
        return lines
    }
    for line in report { emit(line) }
    emit("\(store.recoveryReport)")
    store.close()
    exit(failed ? 1 : 0)
default:
    FileHandle.standardError.write(Data("unknown mode \(arguments[1])\n".utf8))
    exit(2)
}
