// How many requests are in flight per generation (H8), and the oldest generation still in flight.
//
// Requests pin the current generation when they start, and generations only grow, so the pinned
// ones form an ascending run: a list of (generation, count) with the newest at the end makes pinning
// O(1) and the oldest generation the first entry with a count, where a dictionary would hash twice per
// request and scan all its keys for every allocation.

struct InFlightGenerations {
    private var entries: [(generation: UInt64, count: Int)] = []
    private var head = 0

    /// One more request in flight at `generation` (never older than one pinned before).
    mutating func pin(_ generation: UInt64) {
        if head < entries.count, entries[entries.count - 1].generation == generation {
            entries[entries.count - 1].count += 1
        } else {
            precondition(head == entries.count || entries[entries.count - 1].generation < generation,
                         "generations are pinned in ascending order")
            entries.append((generation, 1))
        }
    }

    /// A request pinned at `generation` has finished.
    mutating func unpin(_ generation: UInt64) {
        // Usually the newest entry or close to it: search from the end.
        var i = entries.count - 1
        while entries[i].generation != generation {
            i -= 1
            precondition(i >= head, "unpinning generation \(generation), which has nothing in flight")
        }
        entries[i].count -= 1
        precondition(entries[i].count >= 0)
        while head < entries.count && entries[head].count == 0 { head += 1 }
        if head == entries.count {
            entries.removeAll(keepingCapacity: true)
            head = 0
        } else if head >= 64 && head * 2 >= entries.count {
            entries.removeFirst(head)
            head = 0
        }
    }

    /// The oldest generation with a request in flight; nil when none is.
    var oldest: UInt64? { head < entries.count ? entries[head].generation : nil }
}
