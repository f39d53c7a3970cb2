// A guest read in flight: its buffer and its progress over the range (RangeProgress).

import BlockDevice

struct ReadRequest {
    enum Wait {
        /// The L2 table of this L1 index is loading.
        case l2(l1Index: Int)
    }

    let tag: RequestTag
    let offset: UInt64
    let buffer: UnsafeMutableRawBufferPointer
    /// Reads are never held once drained.
    var progress: RangeProgress<Wait, Never>
    /// The in-flight generation this read pinned (writable images only).
    var generation: Generation?
    /// Sub-ranges (relative to `offset`) known to read as zeros, for OFFSET_HOLE replies.
    var zeroRanges: [Range<UInt64>] = []

    var length: UInt64 { progress.length }
    var position: UInt64 { progress.position }

    init(tag: RequestTag, offset: UInt64, buffer: UnsafeMutableRawBufferPointer) {
        self.tag = tag
        self.offset = offset
        self.buffer = buffer
        progress = RangeProgress(length: UInt64(buffer.count))
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
