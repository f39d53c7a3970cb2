// Callers of the in-place fast-path writes in flight (QCow2Engine+InPlace), by slot: the one record
// such a write needs between its pwrite and its completion, in place of the general path's caller
// table entry, engine write request and I/O token.

import BlockDevice
import QCow2

struct InPlaceWriteTable {
    struct Entry {
        let tag: UInt64
        let handler: BlockIOHandler
        let write: InPlaceWrite
    }

    private var entries: [Entry?] = []
    private var free: [Int] = []

    mutating func insert(_ entry: Entry) -> Int {
        if let i = free.popLast() {
            entries[i] = entry
            return i
        }
        entries.append(entry)
        return entries.count - 1
    }

    mutating func remove(_ slot: Int) -> Entry {
        // Moved out, not copied: no retain and release of the handler.
        guard let entry = entries[slot].take() else { preconditionFailure("in-place write slot \(slot) is not in use") }
        free.append(slot)
        return entry
    }
}
