// Named bounds on everything fed from outside the program (STYLE.md, "Limits and invariants").
// Over a limit is a typed error, never a trap and never an unbounded allocation.

/// Bounds on sizes and counts, one place for all of them.
public struct Limits: Sendable, Equatable {
    /// The largest payload of one log entry, in bytes. A record header claiming more is corruption.
    public var entrySizeMax: Int = 64 * 1024 * 1024

    /// The most bytes the log writer takes into one write and one fdatasync.
    public var groupCommitSizeMax: Int = 8 * 1024 * 1024

    /// The most appends that may wait in the writer's queue; past it, appends fail with `.overloaded`.
    public var appendQueueCountMax: Int = 65_536

    /// The smallest segment size accepted in a configuration.
    public var segmentSizeMin: Int = 4096

    /// The largest segment size accepted in a configuration (record offsets are 32-bit, so this
    /// plus `entrySizeMax` must stay below 4 GiB).
    public var segmentSizeMax: Int = 1 << 31

    /// The largest checkpoint body a reader will accept.
    public var checkpointSizeMax: Int = 1 << 40

    /// The largest key or value a checkpoint body may hold (used by state machines' decoders).
    public var checkpointItemSizeMax: Int = 512 * 1024 * 1024

    /// The defaults.
    public init() {}
}
