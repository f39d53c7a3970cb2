// The raw driver's requests waiting on FileIO, in a SlotTable: the slot index is the integer context
// FileIO hands back.

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

    private var slots = SlotTable<Entry>()

    mutating func insert(tag: UInt64, handler: BlockIOHandler, kind: Kind) -> Int {
        slots.insert(Entry(tag: tag, handler: handler, kind: kind))
    }

    mutating func remove(slot: Int) -> Entry {
        slots.remove(slot)
    }
}
