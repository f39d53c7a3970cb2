// A guest read in flight: a cursor over the requested range plus a count of outstanding I/O.

import BlockDevice

struct ReadRequest {
    /// Where the read is. The cursor `position` only moves forward; extents behind it have their I/O
    /// issued (or were filled inline), extents at and after it are still to be looked up.
    enum State {
        /// Walking the range, issuing I/O per extent.
        case resolving
        /// Parked on the L2 slot of this L1 index until it loads.
        case waitingForL2(l1Index: Int)
        /// Every extent is issued; waiting for `pending` completions.
        case draining
    }

    let tag: RequestTag
    let offset: UInt64
    let buffer: UnsafeMutableRawBufferPointer
    var state: State = .resolving
    var position: UInt64 = 0
    var pending = 0
    var error: BlockError?
    /// The in-flight generation this read pinned (writable images only).
    var generation: UInt64?
    /// Sub-ranges (relative to `offset`) known to read as zeros, for OFFSET_HOLE replies.
    var zeroRanges: [Range<UInt64>] = []

    var length: UInt64 { UInt64(buffer.count) }

    init(tag: RequestTag, offset: UInt64, buffer: UnsafeMutableRawBufferPointer) {
        self.tag = tag
        self.offset = offset
        self.buffer = buffer
    }

    mutating func noteZero(_ range: Range<UInt64>) {
        if let last = zeroRanges.last, last.upperBound == range.lowerBound {
            zeroRanges[zeroRanges.count - 1] = last.lowerBound..<range.upperBound
        } else {
            zeroRanges.append(range)
        }
    }
}

/// A block-status query in flight.
struct StatusRequest {
    enum State {
        case resolving
        case waitingForL2(l1Index: Int)
        /// Asked the backing image about an unallocated run starting at `position`.
        case waitingForBacking
    }

    let tag: RequestTag
    let offset: UInt64
    let length: UInt64
    var state: State = .resolving
    var extents: [Extent] = []
    var covered: UInt64 = 0

    mutating func append(length: UInt64, flags: ExtentFlags, depth: UInt32) {
        guard length > 0 else { return }
        if var last = extents.last, last.flags == flags, last.depth == depth {
            last.length += length
            extents[extents.count - 1] = last
        } else {
            extents.append(Extent(length: length, flags: flags, depth: depth))
        }
        covered += length
    }
}
