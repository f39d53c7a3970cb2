// A guest write, zero or trim in flight (the allocations it creates are in Allocation.swift).

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
