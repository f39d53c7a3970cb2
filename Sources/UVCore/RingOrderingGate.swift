// RingOrderingGate: which of FileIO's ordered requests may run at once on the ring.
//
// The ring runs what it holds in any order, so the lane's promise (requests that change the file
// take effect in the order they were submitted) is kept by never letting two ordered requests whose
// ranges overlap run at the same time. Overlap is judged per 4 KiB block of the file, and blocks are
// counted in a fixed table indexed by block number modulo its size: two requests that share a slot
// without overlapping only wait for each other (never wrong, rarely slower), and a check costs a
// load per 4 KiB of the request (at most the table's 8192) instead of a scan of every running
// request. A barrier (an ordered job, whose range is unknown) runs alone among ordered requests.

struct RingOrderingGate {
    private static let bucketShift: UInt64 = 12
    private static let slots = 8192
    private let counts: UnsafeMutablePointer<UInt16>
    private var running = 0
    private var barriers = 0

    init() {
        counts = .allocate(capacity: Self.slots)
        counts.initialize(repeating: 0, count: Self.slots)
    }

    /// Call once, from the owner's deinit.
    func deallocate() {
        counts.deallocate()
    }

    /// Whether a request changing [start, end) (or everything, for a barrier) may run now.
    func admits(start: UInt64, end: UInt64, barrier: Bool) -> Bool {
        if barrier { return running == 0 }
        if barriers > 0 { return false }
        var free = true
        forEachSlot(start, end) { if counts[$0] != 0 { free = false } }
        return free
    }

    mutating func enter(start: UInt64, end: UInt64, barrier: Bool) {
        running += 1
        if barrier { barriers += 1; return }
        forEachSlot(start, end) { counts[$0] += 1 }
    }

    mutating func leave(start: UInt64, end: UInt64, barrier: Bool) {
        running -= 1
        if barrier { barriers -= 1; return }
        forEachSlot(start, end) { counts[$0] -= 1 }
    }

    @inline(__always)
    private func forEachSlot(_ start: UInt64, _ end: UInt64, _ body: (Int) -> Void) {
        guard end > start else { return }
        let first = start >> Self.bucketShift
        let buckets = min((end - 1) >> Self.bucketShift - first + 1, UInt64(Self.slots))
        for i in 0..<buckets { body(Int(truncatingIfNeeded: (first &+ i) & UInt64(Self.slots - 1))) }
    }
}
