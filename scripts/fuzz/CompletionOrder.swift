// The order in which a fuzz harness completes the I/O it holds, chosen by the input: FIFO, LIFO, or a
// pseudo-random pick (a 64-bit LCG) among the held actions. Shared by the qcow2 harnesses.

struct CompletionOrder {
    private var state: UInt64

    init(seed: UInt64) { state = seed }

    /// Which of `count` held actions completes next.
    mutating func nextIndex(count: Int) -> Int {
        switch state & 3 {
        case 0: return 0
        case 1: return count - 1
        default:
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Int((state >> 33) % UInt64(count))
        }
    }
}
