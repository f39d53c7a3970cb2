// Write-side requests: guest writes (data, zeroes, trims) and the cluster allocations they create.

import BlockDevice

struct WriteRequest {
    enum Kind {
        case data(UnsafeRawBufferPointer)
        /// WRITE_ZEROES; `keepAllocation` is NBD's NO_HOLE.
        case zeroes(keepAllocation: Bool)
        case trim
    }

    enum State {
        /// Walking the range cluster by cluster.
        case resolving
        /// Parked on the L2 slot of this L1 index until it loads.
        case waitingForL2(l1Index: Int)
        /// Parked behind an allocation of the same guest cluster (Q3); re-resolves when it links.
        case waitingForReservation
        /// Everything issued; waiting for `pending` completions.
        case draining
        /// Done, waiting for the flush that FUA asked for.
        case flushing
    }

    let tag: RequestTag
    let offset: UInt64
    let length: UInt64
    let kind: Kind
    let fua: Bool
    let generation: UInt64
    var state: State = .resolving
    var position: UInt64 = 0
    var pending = 0
    var error: BlockError?
}

/// A run of guest clusters being allocated: reserved (no other writer may touch them), given host
/// clusters, filled (with COW for a partial write) and finally linked into the L2 table.
struct Allocation {
    let request: WriteID
    let l1Index: Int
    /// L2 index of the first cluster.
    let firstIndex: Int
    let count: Int
    /// Host offset of the first new cluster; the run is contiguous on the host.
    let host: UInt64
    /// The entries being replaced, for deferred frees after the link.
    let oldWords: [UInt64]
    /// Assembly buffer for a partial write (head COW + data + tail COW); nil when writing straight from
    /// the request.
    var buffer: UnsafeMutableRawBufferPointer?
    /// What to write, and where, once COW reads are done.
    var writeOffset: UInt64
    var source: UnsafeRawBufferPointer
    var pendingCOW = 0
    /// Extended L2: the subcluster bitmap to link with (nil: every subcluster allocated).
    var bitmap: UInt64?
    /// Whether the old entries lose their clusters at the link (false when subclusters are filled in
    /// inside a cluster that is already ours).
    var freesOld = true
    /// The cluster offset that the assembly buffer's first byte stands for.
    var cowOrigin = 0
    /// Ranges of the buffer a compressed old cluster fills once inflated.
    var cowGaps: [Range<Int>] = []
    var error: Int32?
    /// Writers parked on these guest clusters.
    var waiters: [WriteID] = []
}
