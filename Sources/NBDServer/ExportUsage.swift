// How many connections hold an export, counted across every loop, and whether it still takes new ones.
//
// With several loops each loop has its own Export object for an export (its own device: a RawDriver
// over its own fd, or a proxy to the loop that owns a qcow2 engine), but maxconnections, reload and
// shutdown are about the export, not about one loop's view of it. So the views share one ExportUsage.
// Attaching is a check-and-increment under a lock; the main loop `retire`s an export before it stops
// offering it, so no loop can attach to an image that is about to close (a loop learns that the export
// left its table only when its mailbox delivers the new table).

// One atomic word, not a Mutex: Synchronization.Mutex hands a contended lock over inside the
// uninstrumented runtime, so ThreadSanitizer saw two loops' detach() as a race (scripts/sanitizers/
// tsan.supp explains the same for Mailbox); atomics it sees, and attach/detach are a CAS anyway.

import Synchronization

final class ExportUsage: Sendable {
    /// The connection count, with `retiredBit` set once the export takes no new connections.
    private let word = Atomic<Int>(0)
    private static let retiredBit = 1 << 62
    private static let countMask = retiredBit - 1

    init() {}

    /// Connections holding the export on every loop.
    var count: Int { word.load(ordering: .acquiring) & Self.countMask }

    /// Counts one more connection unless the export is retired or holds `limit` already.
    func tryAttach(limit: Int?) -> Bool {
        var current = word.load(ordering: .acquiring)
        while true {
            if current & Self.retiredBit != 0 { return false }
            if let limit, current & Self.countMask >= limit { return false }
            let (exchanged, original) = word.compareExchange(expected: current, desired: current + 1,
                                                             ordering: .acquiringAndReleasing)
            if exchanged { return true }
            current = original
        }
    }

    /// One connection let go; returns how many remain.
    @discardableResult
    func detach() -> Int {
        let remaining = word.subtract(1, ordering: .acquiringAndReleasing).newValue & Self.countMask
        precondition(remaining != Self.countMask, "an export detached more connections than it attached")
        return remaining
    }

    /// No loop may attach from now on; returns the connections still holding it (they only leave).
    func retire() -> Int {
        word.bitwiseOr(Self.retiredBit, ordering: .acquiringAndReleasing).newValue & Self.countMask
    }
}
