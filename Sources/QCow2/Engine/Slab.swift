// Slab storage for the engine's in-flight records, keyed by typed ids.
//
// Each kind of record (reads, status queries, writes, allocations, outstanding actions) has its own id
// type, so that a write's id cannot be handed to the read table or parked on an allocation by mistake:
// the compiler checks what a bare Int never could. The ids are one word each, like the Int they wrap.

/// A slot index of one slab, typed by what the slab holds.
protocol SlabKey {
    init(slot: Int)
    var slot: Int { get }
}

/// A guest read in flight (`QCow2Engine.reads`).
struct ReadID: SlabKey, Hashable {
    let slot: Int
    init(slot: Int) { self.slot = slot }
}

/// A block-status query in flight (`QCow2Engine.statuses`).
struct StatusID: SlabKey, Hashable {
    let slot: Int
    init(slot: Int) { self.slot = slot }
}

/// A guest write, zero or trim in flight (`QCow2Engine.writes`).
struct WriteID: SlabKey, Hashable {
    let slot: Int
    init(slot: Int) { self.slot = slot }
}

/// A run of clusters being allocated (`QCow2Engine.allocations`).
struct AllocationID: SlabKey, Hashable {
    let slot: Int
    init(slot: Int) { self.slot = slot }
}

/// An action in flight is found by its token (`QCow2Engine.tokens`).
extension IOToken: SlabKey {
    init(slot: Int) { self.init(raw: UInt32(slot)) }
    var slot: Int { Int(raw) }
}

/// Slab storage with a free list; keys are stable while an element is live.
///
/// Elements are read and modified in place (no Optional unwrapping, which would copy the element on
/// every access: request state machines touch their slab entry a dozen times per request). A freed
/// slot keeps its stale value until reused; `live` says which slots hold a request.
struct Slab<Key: SlabKey, Element> {
    private var items: [Element] = []
    private var live: [Bool] = []
    private var free: [Int] = []

    mutating func insert(_ e: Element) -> Key {
        if let i = free.popLast() {
            items[i] = e
            live[i] = true
            return Key(slot: i)
        }
        items.append(e)
        live.append(true)
        return Key(slot: items.count - 1)
    }

    @discardableResult
    mutating func remove(_ key: Key) -> Element {
        let i = key.slot
        precondition(live[i], "slab slot \(i) is not in use")
        live[i] = false
        free.append(i)
        return items[i]
    }

    subscript(key: Key) -> Element {
        _read {
            precondition(live[key.slot], "slab slot \(key.slot) is not in use")
            yield items[key.slot]
        }
        _modify {
            precondition(live[key.slot], "slab slot \(key.slot) is not in use")
            yield &items[key.slot]
        }
    }

    var count: Int { items.count - free.count }
}
