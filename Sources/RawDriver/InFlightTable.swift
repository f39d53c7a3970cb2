// A slab of requests waiting on FileIO. Slots are reused through a free list, so steady-state traffic
// does not allocate; the slot index is the integer context FileIO hands back.

import BlockDevice

struct InFlightTable {
    enum Kind {
        case read
        case other
        case blockStatus(ExtentScan)
    }

    struct Entry {
        var tag: UInt64
        var handler: BlockIOHandler
        var kind: Kind
    }

    private var entries: [Entry?] = []
    private var free: [Int] = []

    mutating func insert(tag: UInt64, handler: BlockIOHandler, kind: Kind) -> Int {
        let entry = Entry(tag: tag, handler: handler, kind: kind)
        if let slot = free.popLast() {
            entries[slot] = entry
            return slot
        }
        entries.append(entry)
        return entries.count - 1
    }

    mutating func remove(slot: Int) -> Entry {
        guard let entry = entries[slot] else { preconditionFailure("completion for empty slot \(slot)") }
        entries[slot] = nil
        free.append(slot)
        return entry
    }
}
