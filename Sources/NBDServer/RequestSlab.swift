// Requests in flight on one connection live in a slab addressed by index; the index is the tag the
// driver hands back. Each slot keeps its reply-header scratch memory for life, so a steady stream of
// requests allocates nothing.

import NBDProtocol
import UVCore

struct RequestSlot {
    /// Where the request is in its life.
    enum Stage {
        /// Unused, on the free list.
        case free
        /// A WRITE whose payload is still arriving.
        case receivingPayload
        /// Handed to the driver; waiting for its completion.
        case executing
        /// The reply is queued in the socket; waiting for the write to finish.
        case replying
    }

    var stage: Stage = .free
    var request = Request(flags: [], type: 0, cookie: 0, offset: 0, length: 0)
    var command: NBDCommand = .read
    /// Data buffer for READ and WRITE.
    var buffer: PooledBuffer?
    /// Payload bytes received so far (WRITE).
    var received = 0
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
        slots[i].stage = .free
        slots[i].received = 0
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
