// What a BLOCK_STATUS reply is made of, given the meta contexts a client selected: which device calls
// feed it and how each context's chunk is cut from their extents.
//
// base:allocation and qemu:allocation-depth both come from one `blockStatus` call (flags and depth of
// the same extents); each `qemu:dirty-bitmap:NAME` comes from its own `dirtyBitmapStatus` call. Every
// source may cover a different prefix of the range, and each chunk covers what its source returned
// (proto.md lets contexts' chunks differ in length), clipped to the request.

import BlockDevice
import NBDProtocol

/// Where one selected context's extents come from.
enum BlockStatusSource: Equatable {
    /// base:allocation: the flags of the `blockStatus` extents.
    case allocation
    /// qemu:allocation-depth: the depth of the `blockStatus` extents.
    case allocationDepth
    /// qemu:dirty-bitmap:NAME: `dirtyBitmapStatus(name:)`; the index is into `BlockStatusPlan.bitmaps`.
    case dirtyBitmap(index: Int)
}

/// The selected contexts of one connection, fixed when transmission starts.
struct BlockStatusPlan {
    /// Chunks go out in this order: by context id.
    let contexts: [(id: UInt32, source: BlockStatusSource)]
    /// The bitmaps to ask for, each once, in the order their contexts appear.
    let bitmaps: [String]
    /// Whether a `blockStatus` call is needed (an allocation context is selected).
    let needsAllocation: Bool

    init(selected: [(id: UInt32, name: String)]) {
        var contexts: [(id: UInt32, source: BlockStatusSource)] = []
        var bitmaps: [String] = []
        for context in selected.sorted(by: { $0.id < $1.id }) {
            if let name = MetaContextName.bitmapName(of: context.name) {
                let index = bitmaps.firstIndex(of: name) ?? bitmaps.count
                if index == bitmaps.count { bitmaps.append(name) }
                contexts.append((context.id, .dirtyBitmap(index: index)))
            } else if context.name == MetaContextName.allocationDepth {
                contexts.append((context.id, .allocationDepth))
            } else {
                contexts.append((context.id, .allocation))
            }
        }
        self.contexts = contexts
        self.bitmaps = bitmaps
        needsAllocation = contexts.contains { $0.source == .allocation || $0.source == .allocationDepth }
    }

    /// Device calls one request makes: `blockStatus` if needed, then one per bitmap.
    var steps: Int { (needsAllocation ? 1 : 0) + bitmaps.count }

    /// The bitmap a step asks for, or nil for the `blockStatus` step.
    func bitmap(atStep step: Int) -> String? {
        let index = step - (needsAllocation ? 1 : 0)
        return index < 0 ? nil : bitmaps[index]
    }

    /// One context's (length, value) pairs from its source's extents: clipped to `length`, equal
    /// neighbours merged, only the first with REQ_ONE, and no length above `maximumLength` (compact
    /// replies carry 32-bit lengths; a longer run is sent as several, cut at 4 KiB multiples so each
    /// piece stays a multiple of any minimum block size). A source that returned nothing (it may not)
    /// is reported as one clean run, as before.
    static func chunk(_ extents: [Extent], source: BlockStatusSource, length: UInt64, requestOne: Bool,
                      maximumLength: UInt64) -> [(length: UInt64, flags: UInt32)] {
        var list: [(length: UInt64, flags: UInt32)] = []
        var covered: UInt64 = 0
        for e in extents where covered < length {
            let run = min(e.length, length - covered)
            let value = source == .allocationDepth ? e.depth : e.flags.rawValue
            covered += run
            if let last = list.last, last.flags == value {
                list[list.count - 1].length += run
            } else {
                list.append((run, value))
            }
        }
        if list.isEmpty { list = [(length, 0)] }
        if requestOne { list = [list[0]] }
        guard list.contains(where: { $0.length > maximumLength }) else { return list }
        let piece = maximumLength & ~4095
        var split: [(length: UInt64, flags: UInt32)] = []
        for e in list {
            var left = e.length
            while left > maximumLength {
                split.append((piece, e.flags))
                left -= piece
            }
            split.append((left, e.flags))
        }
        return requestOne ? [split[0]] : split
    }
}
