// The L2 table cache: one slot per L1 index, each a whole L2 table.
//
// A slot is `loading` from the moment the first request needs it until its read completes; requests
// that need it meanwhile join its FIFO of waiters instead of issuing reads of their own (QED's rule:
// one load per table). When the load completes every waiter is woken in order and looks its cluster
// up again from the start, because the world may have changed while it slept. A `ready` slot answers
// synchronously. Pinned slots (a request is using entries it read from them) are never evicted; the
// cache may overflow its budget temporarily when every slot is pinned, rather than fail a request.

/// Who is waiting on a slot.
enum Waiter: Equatable {
    case read(ReadID)
    case status(StatusID)
    case write(WriteID)
}

final class L2Slot {
    enum State {
        /// The table's read is in flight.
        case loading
        /// The table is in `table`.
        case ready
    }

    let l1Index: Int
    @exclusivity(unchecked) var hostOffset: UInt64
    @exclusivity(unchecked) var state: State = .loading
    let table: UnsafeMutableRawBufferPointer
    @exclusivity(unchecked) var waiters: [Waiter] = []
    @exclusivity(unchecked) var pins = 0
    @exclusivity(unchecked) var lastUse: UInt64 = 0
    /// Epoch of the oldest link not yet captured by a flush; nil when the table on disk is current.
    @exclusivity(unchecked) var dirtyEpoch: Epoch?
    /// Flush snapshots of this table not yet written: until they are, the file holds an older table,
    /// so the slot must stay even though it is no longer dirty.
    @exclusivity(unchecked) var writebacks = 0

    init(l1Index: Int, hostOffset: UInt64, size: Int) {
        self.l1Index = l1Index
        self.hostOffset = hostOffset
        self.table = .allocate(byteCount: size, alignment: 4096)
    }

    deinit { table.deallocate() }

    @inline(__always)
    func setEntry(_ index: Int, word: UInt64, extended: Bool) {
        table.setBE64(word, at: index * (extended ? 16 : 8))
    }

    @inline(__always)
    func setBitmap(_ index: Int, _ bitmap: UInt64) {
        table.setBE64(bitmap, at: index * 16 + 8)
    }

    /// Raw first word of entry `index` (the mapping), and the subcluster bitmap for extended L2.
    @inline(__always)
    func entry(_ index: Int, extended: Bool) -> (word: UInt64, bitmap: UInt64) {
        if extended {
            return (table.be64(index * 16), table.be64(index * 16 + 8))
        }
        return (table.be64(index * 8), 0)
    }
}

struct L2Cache {
    /// The cached slots, for the walks (flush capture, eviction); lookups use `byIndex`.
    private(set) var slots: [Int: L2Slot] = [:]
    /// The same slots by L1 index (nil where none is cached): every request looks its table up, and an
    /// array index costs a few instructions where the dictionary hashed. One word per L1 entry, as
    /// the L1 table itself.
    private var byIndex: [L2Slot?]
    let tableSize: Int
    let capacity: Int
    private var clock: UInt64 = 0

    init(tableSize: Int, budgetBytes: Int, l1Entries: Int) {
        self.tableSize = tableSize
        self.capacity = max(4, budgetBytes / tableSize)
        self.byIndex = Array(repeating: nil, count: l1Entries)
    }

    subscript(l1Index: Int) -> L2Slot? {
        l1Index >= 0 && l1Index < byIndex.count ? byIndex[l1Index] : nil
    }

    private mutating func set(_ l1Index: Int, _ slot: L2Slot?) {
        slots[l1Index] = slot
        byIndex[l1Index] = slot
    }

    /// Creates a loading slot, evicting the least recently used idle slot when over budget.
    mutating func startLoading(l1Index: Int, hostOffset: UInt64) -> L2Slot {
        makeRoom()
        let slot = L2Slot(l1Index: l1Index, hostOffset: hostOffset, size: tableSize)
        set(l1Index, slot)
        touch(slot)
        return slot
    }

    /// Installs a slot that is ready at once (a new or copied table).
    mutating func insertReady(_ slot: L2Slot) {
        if self[slot.l1Index] == nil { makeRoom() }
        slot.state = .ready
        set(slot.l1Index, slot)
        touch(slot)
    }

    func makeSlot(l1Index: Int, hostOffset: UInt64) -> L2Slot {
        L2Slot(l1Index: l1Index, hostOffset: hostOffset, size: tableSize)
    }

    mutating func touch(_ slot: L2Slot) {
        clock &+= 1
        slot.lastUse = clock
    }

    mutating func remove(_ l1Index: Int) { set(l1Index, nil) }

    /// Evicts idle slots until one more fits the budget (or none is idle): after an overflow the cache
    /// shrinks back instead of staying over budget for good.
    private mutating func makeRoom() {
        while slots.count >= capacity, evictOne() {}
    }

    private mutating func evictOne() -> Bool {
        var victim: L2Slot?
        // Dirty tables stay until a flush writes them (Q5: the cache overflows rather than write early),
        // and so do tables whose snapshot a running flush has not written yet.
        for (_, s) in slots where s.state == .ready && s.pins == 0 && s.waiters.isEmpty && s.dirtyEpoch == nil
            && s.writebacks == 0 {
            if victim == nil || s.lastUse < victim!.lastUse { victim = s }
        }
        guard let victim else { return false }
        set(victim.l1Index, nil)
        return true
    }
}
