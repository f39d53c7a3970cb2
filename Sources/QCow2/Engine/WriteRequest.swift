// A guest write, zero or trim in flight (the allocations it creates are in Allocation.swift).

import BlockDevice

struct WriteRequest {
    enum Kind {
        case data(UnsafeRawBufferPointer)
        /// WRITE_ZEROES; `keepAllocation` is NBD's NO_HOLE.
        case zeroes(keepAllocation: Bool)
        case trim
    }

    enum Wait {
        /// The L2 table of this L1 index is loading.
        case l2(l1Index: Int)
        /// Another allocation of the same guest cluster is in flight (Q3); the write looks the cluster
        /// up again once it is linked.
        case reservation(AllocationID)
    }

    enum Hold {
        /// FUA: done, answered once a flush covering it is durable.
        case flush
    }

    let tag: RequestTag
    let offset: UInt64
    let kind: Kind
    let fua: Bool
    let generation: Generation
    var progress: RangeProgress<Wait, Hold>

    var length: UInt64 { progress.length }
    var position: UInt64 { progress.position }

    init(tag: RequestTag, offset: UInt64, length: UInt64, kind: Kind, fua: Bool, generation: Generation) {
        self.tag = tag
        self.offset = offset
        self.kind = kind
        self.fua = fua
        self.generation = generation
        progress = RangeProgress(length: length)
    }
}
