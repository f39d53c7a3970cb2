// UnsafeList: a growable list of plain values in manually managed memory.
//
// For per-request scratch lists on the loop (gathered uv_buf_t, write contexts): Array's
// uniqueness checks, generic range replacement on removeAll and retain of its storage cost
// more than the work itself there. The owner calls `deallocate()` exactly once (deinit);
// copies of the struct share the memory, so keep exactly one, in a stored property.

struct UnsafeList<Element: BitwiseCopyable> {
    private(set) var base: UnsafeMutablePointer<Element>
    private(set) var count = 0
    private var capacity: Int

    init(capacity: Int) {
        self.capacity = max(capacity, 1)
        base = .allocate(capacity: self.capacity)
    }

    var isEmpty: Bool { count == 0 }

    subscript(i: Int) -> Element {
        get {
            precondition(i >= 0 && i < count, "UnsafeList index out of range")
            return base[i]
        }
    }

    mutating func append(_ element: Element) {
        if count == capacity { grow(to: capacity * 2) }
        (base + count).initialize(to: element)
        count += 1
    }

    mutating func append(contentsOf other: UnsafeList<Element>) {
        if count + other.count > capacity { grow(to: max(capacity * 2, count + other.count)) }
        (base + count).initialize(from: other.base, count: other.count)
        count += other.count
    }

    /// Forgets the elements, keeps the memory.
    mutating func removeAll() { count = 0 }

    /// The elements as a mutable buffer, valid until the next append.
    var buffer: UnsafeMutableBufferPointer<Element> { UnsafeMutableBufferPointer(start: base, count: count) }

    func deallocate() { base.deallocate() }

    private mutating func grow(to newCapacity: Int) {
        let bigger = UnsafeMutablePointer<Element>.allocate(capacity: newCapacity)
        bigger.initialize(from: base, count: count)
        base.deallocate()
        base = bigger
        capacity = newCapacity
    }
}
