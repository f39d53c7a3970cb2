// Requests in flight on one connection live in a slab addressed by index; the index is the tag the
// driver hands back. Each slot keeps its reply-header scratch memory for life, so a steady stream of
// requests allocates nothing.

import NBDProtocol
import UVCore

// Where a request is in its life is the Transmission machine's business, not the slot's.
struct RequestSlot {
    var request = Request(flags: [], type: 0, cookie: 0, offset: 0, length: 0)
    var command: NBDCommand = .read
    /// Data buffer for READ and WRITE.
    var buffer: PooledBuffer?
    /// Length of the error reply built for a rejected request, sent once its payload is dropped.
    var rejectionLength = 0
    /// Fixed scratch for reply headers; lives as long as the slot.
    let headers: UnsafeMutableRawBufferPointer
    /// Extra reply memory for the rare replies that do not fit `headers` (long block status, messages).
    var overflow: UnsafeMutableRawBufferPointer?

    static let headerBytes = 1024

    init() {
        headers = .allocate(byteCount: Self.headerBytes, alignment: 16)
    }
}

struct RequestSlab {
    private(set) var slots: [RequestSlot] = []
    private var free: [Int] = []
    private(set) var active = 0

    /// The slot the next `allocate` returns.
    var nextSlot: Int { free.last ?? slots.count }

    mutating func allocate() -> Int {
        active += 1
        if let i = free.popLast() { return i }
        slots.append(RequestSlot())
        return slots.count - 1
    }

    mutating func release(_ i: Int, pool: BufferPool) {
        if let b = slots[i].buffer { pool.give(b) }
        slots[i].buffer = nil
        if let o = slots[i].overflow { o.deallocate() }
        slots[i].overflow = nil
        slots[i].rejectionLength = 0
        free.append(i)
        active -= 1
    }

    subscript(i: Int) -> RequestSlot {
        get { slots[i] }
        _modify { yield &slots[i] }
    }

    func deallocateAll() {
        for s in slots {
            s.headers.deallocate()
            s.overflow?.deallocate()
        }
    }
}
