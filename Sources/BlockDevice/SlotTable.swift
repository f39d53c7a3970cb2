// SlotTable: the records of a driver's operations in flight, by slot. The slot index is the integer
// context a driver hands to FileIO and gets back with the completion; freed slots are reused through
// a free list, so steady traffic allocates nothing. Inlinable, so each driver's table is specialized.

public struct SlotTable<Entry> {
    @usableFromInline var entries: [Entry?] = []
    @usableFromInline var free: [Int] = []

    public init() {}

    @inlinable
    public mutating func insert(_ entry: Entry) -> Int {
        if let slot = free.popLast() {
            entries[slot] = entry
            return slot
        }
        entries.append(entry)
        return entries.count - 1
    }

    /// The entry in `slot`, moved out (not copied: no retain and release of what it holds).
    @inlinable
    public mutating func remove(_ slot: Int) -> Entry {
        guard let entry = entries[slot].take() else { preconditionFailure("slot \(slot) is not in use") }
        free.append(slot)
        return entry
    }
}
