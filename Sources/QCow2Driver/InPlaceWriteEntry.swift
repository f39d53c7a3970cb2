// The record an in-place fast-path write (QCow2Engine+InPlace) needs between its pwrite and its
// completion, in place of the general path's caller table entry, engine write request and I/O token.
// The driver keeps them in a SlotTable.

import BlockDevice
import QCow2

struct InPlaceWriteEntry {
    let tag: UInt64
    let handler: BlockIOHandler
    let write: InPlaceWrite
}
