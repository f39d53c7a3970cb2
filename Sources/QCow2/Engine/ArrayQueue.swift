// ArrayQueue: first in, first out over one array and a moving head index.
//
// The engine keeps three queues whose elements leave from the front far more often than the queue
// empties: the outbox of actions, the quarantine of freed clusters, and the pinned generations.
// `Array.removeFirst()` would shift every element per pop; a Deque would allocate its own storage
// shape. Here a pop only moves the head; the storage is kept across empties (no allocation per
// request once warm). Compaction is explicit and lazy, because emptying the array costs ~70
// instructions (callgrind): `popFirst` compacts only when it finds the queue empty (the outbox is
// drained until nil once per pump, not once per action), and owners that pop by `first` call
// `compact()` when a batch of pops is done. `compact()` empties the array when nothing is left, or
// drops the dead prefix when it is both long and at least half the array, so a queue that never
// empties stays bounded at O(1) amortized cost per pop.

struct ArrayQueue<Element> {
    private var storage: [Element] = []
    /// Elements before this index have left the queue.
    private var head = 0

    init(reservingCapacity capacity: Int = 0) {
        storage.reserveCapacity(capacity)
    }

    var isEmpty: Bool { head == storage.count }
    var count: Int { storage.count - head }
    /// The oldest element, or nil.
    var first: Element? { head < storage.count ? storage[head] : nil }
    /// The newest element, or nil.
    var last: Element? { head < storage.count ? storage[storage.count - 1] : nil }

    @inline(__always)
    mutating func append(_ element: Element) {
        storage.append(element)
    }

    /// Removes and returns the oldest element; nil when empty, and then the storage is compacted.
    @inline(__always)
    mutating func popFirst() -> Element? {
        guard head < storage.count else {
            if head > 0 { compact() }
            return nil
        }
        let element = storage[head]
        head += 1
        return element
    }

    /// Removes the oldest elements while `condition` holds for them, then compacts.
    @inline(__always)
    mutating func removeFirst(while condition: (Element) -> Bool) {
        while head < storage.count && condition(storage[head]) { head += 1 }
        compact()
    }

    /// Removes every element and returns them, oldest first.
    mutating func removeAll() -> [Element] {
        defer {
            storage.removeAll(keepingCapacity: true)
            head = 0
        }
        return Array(storage[head...])
    }

    /// Changes the element `fromNewest` places before the newest (0: the newest itself) in place.
    @inline(__always)
    mutating func modify<Result>(fromNewest distance: Int, _ body: (inout Element) -> Result) -> Result {
        let index = storage.count - 1 - distance
        precondition(distance >= 0 && index >= head, "ArrayQueue: no element \(distance) before the newest")
        return body(&storage[index])
    }

    /// How many places before the newest the newest element matching `predicate` is (0: the newest
    /// itself); nil when none matches. Searches from the newest end.
    @inline(__always)
    func distanceFromNewest(where predicate: (Element) -> Bool) -> Int? {
        var index = storage.count - 1
        while index >= head {
            if predicate(storage[index]) { return storage.count - 1 - index }
            index -= 1
        }
        return nil
    }

    /// Releases the popped elements' storage slots when that is worth it (see the header).
    @inline(__always)
    mutating func compact() {
        if head == 0 { return }
        if head == storage.count {
            storage.removeAll(keepingCapacity: true)
            head = 0
        } else if head >= 64 && head * 2 >= storage.count {
            storage.removeFirst(head)
            head = 0
        }
    }
}
