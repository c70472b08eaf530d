// swift-tools-version: 6.1
import PackageDescription

let strict: [SwiftSetting] = [
    .enableUpcomingFeature("ExistentialAny"),
]

let package = Package(
    name: "Keel",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "KeelCore", targets: ["KeelCore"]),
        .library(name: "KeelStorage", targets: ["KeelStorage"]),
        .library(name: "KeelRaft", targets: ["KeelRaft"]),
        .library(name: "KeelSimulation", targets: ["KeelSimulation"]),
        .library(name: "Keel", targets: ["Keel"]),
        .library(name: "KeelKV", targets: ["KeelKV"]),
        .executable(name: "keel", targets: ["keel"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/x-sheep/swift-property-based", from: "2.0.1"),
    ],
    targets: [
        // CRC32C (Castagnoli): the SSE4.2 instruction where the CPU has it, a table otherwise.
        .target(name: "CKeelCRC32C"),
        // The few POSIX calls Swift's Glibc module does not show (fallocate, flock constants), and
        // the CPU's prefetch hint.
        .target(name: "CKeelSystemShims"),
        .target(
            name: "KeelCore",
            dependencies: ["CKeelCRC32C"],
            swiftSettings: strict
        ),
        .target(
            name: "KeelRaft",
            dependencies: ["KeelCore"],
            swiftSettings: strict
        ),
        .target(
            name: "KeelSimulation",
            dependencies: ["KeelCore", "KeelRaft"],
            swiftSettings: strict
        ),
        // The node: Raft on the storage engine, the peer transport, the public Swift API.
        .target(
            name: "Keel",
            dependencies: [
                "KeelCore",
                "KeelRaft",
                "KeelStorage",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Collections", package: "swift-collections"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict
        ),
        .target(
            name: "KeelStorage",
            dependencies: [
                "KeelCore",
                "CKeelSystemShims",
                .product(name: "Collections", package: "swift-collections"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict
        ),
        // The key-value state machine of `keel serve`: commands, expiry, transactions, snapshots.
        .target(
            name: "KeelKV",
            dependencies: [
                "KeelCore", "KeelStorage", "CKeelSystemShims",
                .product(name: "Collections", package: "swift-collections"),
            ],
            swiftSettings: strict
        ),
        // `keel serve`: RESP2/RESP3 on SwiftNIO, the command table, AUTH, INFO.
        .target(
            name: "KeelServer",
            dependencies: [
                "Keel", "KeelCore", "KeelKV", "KeelRaft", "KeelStorage",
                .product(name: "Collections", package: "swift-collections"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict
        ),
        // `keel torture`: real processes, faults, a history and its check.
        .target(
            name: "KeelTorture",
            dependencies: [
                "KeelCore", "KeelSimulation",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ],
            swiftSettings: strict
        ),
        .executableTarget(
            name: "keel",
            dependencies: [
                "KeelCore",
                "KeelStorage",
                "KeelRaft",
                "KeelSimulation",
                "Keel",
                "KeelServer",
                "KeelTorture",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Collections", package: "swift-collections"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict
        ),
        // A tiny program for the real-process crash test: appends numbered records with fsync
        // `always`, printing each index once it is acknowledged, until it is SIGKILLed.
        .executableTarget(
            name: "keel-crash-writer",
            dependencies: ["KeelCore", "KeelStorage"],
            swiftSettings: strict
        ),
        // A node process for the multi-process tests and the failover benchmark: a replicated
        // string map driven by tagged lines on stdin (see its file comment).
        .executableTarget(
            name: "keel-node-harness",
            dependencies: [
                "Keel", "KeelCore", "KeelRaft", "KeelStorage",
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "KeelKVTests",
            dependencies: ["KeelKV", "KeelCore", "KeelStorage"],
            swiftSettings: strict
        ),
        // Real `keel serve` processes driven by redis-cli, redis-py and redis-benchmark.
        .testTarget(
            name: "KeelServerTests",
            dependencies: [
                "KeelServer",
                "KeelTorture",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
            ],
            exclude: ["python"],
            swiftSettings: strict
        ),
        // The checker on planted histories, and a short torture run of real processes.
        .testTarget(
            name: "KeelTortureTests",
            dependencies: ["KeelTorture", "KeelSimulation"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "KeelCoreTests",
            dependencies: ["KeelCore"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "KeelRaftTests",
            dependencies: ["KeelCore", "KeelRaft", "KeelSimulation"],
            exclude: ["Scenarios"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "KeelSimulationTests",
            dependencies: ["KeelCore", "KeelRaft", "KeelSimulation"],
            swiftSettings: strict
        ),
        .testTarget(
            name: "KeelTests",
            dependencies: [
                "Keel",
                "KeelCore",
                "KeelRaft",
                "KeelStorage",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
            ],
            swiftSettings: strict
        ),
        .testTarget(
            name: "KeelStorageTests",
            dependencies: [
                "KeelCore",
                "KeelStorage",
                .product(name: "Collections", package: "swift-collections"),
                .product(name: "PropertyBased", package: "swift-property-based"),
            ],
            swiftSettings: strict
        ),
    ]
)
