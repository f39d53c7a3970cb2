// How many requests are in flight per generation (H8), and the oldest generation still in flight.
//
// Requests pin the current generation when they start, and generations only grow, so the pinned
// ones form an ascending run: a list of (generation, count) with the newest at the end makes pinning
// O(1) and the oldest generation the first entry with a count, where a dictionary would hash twice per
// request and scan all its keys for every allocation.

struct InFlightGenerations {
    private var entries = ArrayQueue<(generation: Generation, count: Int)>()

    /// One more request in flight at `generation` (never older than one pinned before).
    mutating func pin(_ generation: Generation) {
        if let newest = entries.last, newest.generation == generation {
            entries.modify(fromNewest: 0) { $0.count += 1 }
        } else {
            precondition(entries.last.map { $0.generation < generation } ?? true,
                         "generations are pinned in ascending order")
            entries.append((generation, 1))
        }
    }

    /// A request pinned at `generation` has finished.
    mutating func unpin(_ generation: Generation) {
        // Usually the newest entry or close to it: search from the end.
        guard let distance = entries.distanceFromNewest(where: { $0.generation == generation }) else {
            preconditionFailure("unpinning \(generation), which has nothing in flight")
        }
        entries.modify(fromNewest: distance) { entry in
            entry.count -= 1
            precondition(entry.count >= 0)
        }
        entries.removeFirst(while: { $0.count == 0 })
    }

    /// The oldest generation with a request in flight; nil when none is.
    var oldest: Generation? { entries.first?.generation }
}
