import KeelCore
import PropertyBased
import Testing
@testable import KeelStorage

/// Random operation sequences against a plain `Dictionary`, with checkpoints, clean restarts and
/// crashes in between. With fsync `always`, every acknowledged command survives every restart.
@Suite("Property: the store behaves like a Dictionary across restarts")
struct PropertyTests {
    enum Step {
        case command(Command)
        case checkpoint
        case restart
        case crash
    }

    static func step(_ code: Int) -> Step {
        let key = (code / 16) % 6
        switch code % 16 {
        case 0...5: return .command(.set("s\(key)", "v\(code)"))
        case 6, 7: return .command(.delete("s\(key)"))
        case 8, 9, 10: return .command(.add("n\(key % 3)", Int64(code % 100) - 50))
        case 11: return .command(.delete("n\(key % 3)"))
        case 12: return .checkpoint
        case 13: return .restart
        case 14: return .crash
        default: return .command(.set("s\(key)", ""))
        }
    }

    @Test("random sequences of set, delete, add, checkpoint, restart and crash match the model")
    func matchesModel() async {
        await propertyCheck(count: 60, input: Gen.int(in: 0...100_000).array(of: 1...120)) { codes in
            let fs = SimulatedFileSystem(seed: UInt64(codes.count))
            var expected: [String: String] = [:]
            var store = try openStore(fs, options: smallOptions(segmentSize: 4096))
            for code in codes {
                switch Self.step(code) {
                case .command(let command):
                    _ = try await store.execute(command.encoded)
                    command.apply(to: &expected)
                case .checkpoint:
                    _ = try await store.checkpoint()
                case .restart:
                    store.close()
                    store = try openStore(fs, options: smallOptions(segmentSize: 4096))
                case .crash:
                    fs.crash()
                    store.close()
                    fs.restart(mode: .keepRandomPrefix)
                    store = try openStore(fs, options: smallOptions(segmentSize: 4096))
                }
                #expect(contents(store) == expected)
            }
            store.close()
        }
    }
}
