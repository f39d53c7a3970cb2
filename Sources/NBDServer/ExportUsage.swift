// How many connections hold an export, counted across every loop, and whether it still takes new ones.
//
// With several loops each loop has its own Export object for an export (its own device: a RawDriver
// over its own fd, or a proxy to the loop that owns a qcow2 engine), but maxconnections, reload and
// shutdown are about the export, not about one loop's view of it. So the views share one ExportUsage.
// Attaching is a check-and-increment under a lock; the main loop `retire`s an export before it stops
// offering it, so no loop can attach to an image that is about to close (a loop learns that the export
// left its table only when its mailbox delivers the new table).

import Synchronization

final class ExportUsage: Sendable {
    private struct State {
        var count = 0
        var retired = false
    }

    private let state = Mutex(State())

    init() {}

    /// Connections holding the export on every loop.
    var count: Int { state.withLock { $0.count } }

    /// Counts one more connection unless the export is retired or holds `limit` already.
    func tryAttach(limit: Int?) -> Bool {
        state.withLock { s in
            if s.retired { return false }
            if let limit, s.count >= limit { return false }
            s.count += 1
            return true
        }
    }

    /// One connection let go; returns how many remain.
    @discardableResult
    func detach() -> Int {
        state.withLock { s in
            precondition(s.count > 0)
            s.count -= 1
            return s.count
        }
    }

    /// No loop may attach from now on; returns the connections still holding it (they only leave).
    func retire() -> Int {
        state.withLock { s in
            s.retired = true
            return s.count
        }
    }
}
