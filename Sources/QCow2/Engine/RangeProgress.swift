// How far a read or a write has got through its guest range, and what it is waiting for.
//
// Both walk their range cluster by cluster from a cursor that only moves forward: extents behind the
// cursor are issued (or were handled in memory), extents at and after it are still to be looked up. A
// walk can stop at the cursor on something not in memory yet (an L2 table loading, another writer's
// reservation) and resumes exactly there. Once the cursor reaches the end, the request waits for the
// I/O it issued; when the last of it is back the request is answered.
//
// The engine changes a request's progress only through the transitions below, and each traps on a
// state it cannot come from: the sequence lives here, not in counters spread over the call chain.

import BlockDevice

struct RangeProgress<Wait, Hold> {
    enum State {
        /// Walking the range at `position`, issuing I/O per extent.
        case resolving
        /// Stopped at `position` until this is over; `resume()` goes on from there.
        case waiting(Wait)
        /// The cursor is at the end (every extent issued, or the request failed); `pending` completions
        /// are still due.
        case draining
        /// Drained and successful, held for one more thing before it is answered (a write's FUA
        /// flush); whatever it is held for answers it when it is over.
        case holding(Hold)
    }

    let length: UInt64
    private(set) var state: State = .resolving
    /// The cursor: bytes of the range already issued or handled.
    private(set) var position: UInt64 = 0
    /// Issued I/O not yet completed.
    private(set) var pending = 0
    /// The first failure; the request is answered with it once nothing is pending.
    private(set) var error: BlockError?

    init(length: UInt64) {
        self.length = length
    }

    var remaining: UInt64 { length - position }
    var hasRemaining: Bool { position < length }
    /// Drained: nothing left to issue and nothing pending.
    var isDrained: Bool {
        if case .draining = state { return pending == 0 }
        return false
    }

    /// Whether answering the request now is legal: drained, or held (only what it is held for
    /// answers a held request, when that is over).
    var canBeAnswered: Bool {
        switch state {
        case .draining: return pending == 0
        case .holding: return true
        case .resolving, .waiting: return false
        }
    }

    /// Goes on walking after a wait.
    mutating func resume() {
        guard case .waiting = state else { preconditionFailure("resume from \(state)") }
        state = .resolving
    }

    /// Stops at the cursor until `reason` is over.
    mutating func park(_ reason: Wait) {
        guard case .resolving = state, hasRemaining else { preconditionFailure("park from \(state)") }
        state = .waiting(reason)
    }

    /// Moves the cursor over `count` bytes handled without I/O (zeros filled, metadata changed).
    @inline(__always)
    mutating func skip(_ count: UInt64) {
        guard case .resolving = state, count <= remaining else { preconditionFailure("skip from \(state)") }
        position += count
    }

    /// Moves the cursor over `count` bytes whose I/O was just issued; one completion is due for it.
    @inline(__always)
    mutating func issue(_ count: UInt64) {
        guard case .resolving = state, count <= remaining else { preconditionFailure("issue from \(state)") }
        position += count
        pending += 1
    }

    /// The cursor reached the end of the range. Returns whether the request can be answered now.
    mutating func reachedEnd() -> Bool {
        guard case .resolving = state, !hasRemaining else { preconditionFailure("end of walk from \(state)") }
        state = .draining
        return pending == 0
    }

    /// One issued I/O is back. A failure is kept (the first one wins) and the request goes on draining:
    /// it is answered only once none of its I/O can still touch its buffer.
    /// Returns whether the request can be answered now.
    @inline(__always)
    mutating func completed(_ failure: BlockError?) -> Bool {
        guard pending > 0 else { preconditionFailure("completion with nothing pending in \(state)") }
        if case .holding = state { preconditionFailure("completion while holding") }
        if let failure, error == nil { error = failure }
        pending -= 1
        return isDrained
    }

    /// The request fails: nothing more is issued (the cursor jumps to the end). From a walk or a wait.
    /// Returns whether the request can be answered now.
    mutating func fail(_ failure: BlockError) -> Bool {
        switch state {
        case .resolving, .waiting: break
        case .draining, .holding: preconditionFailure("fail from \(state)")
        }
        if error == nil { error = failure }
        position = length
        state = .draining
        return pending == 0
    }

    /// A drained, successful request is held for `reason` before it is answered.
    mutating func hold(_ reason: Hold) {
        guard isDrained, error == nil else { preconditionFailure("hold from \(state)") }
        state = .holding(reason)
    }
}
