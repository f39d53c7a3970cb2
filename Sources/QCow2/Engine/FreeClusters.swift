// The clusters the allocator may hand out again: refcount zero, below the end of the file.
//
// A freed cluster first waits in quarantine with the generation of its free (H8: a request issued
// before the free may still be reading or writing it); it becomes ready once no request that old is in
// flight. Ready clusters live in a bitmap so that taking the lowest run (first fit, which keeps the
// file compact as qemu's allocator does) and returning clusters are cheap whatever their number: a
// trimmed 1 TiB image holds millions of free clusters, and a list that is sorted or searched per
// allocation or per free turns every write into a scan of all of them.

struct FreeClusters {
    /// Bit c set: cluster c is free and nothing in flight can touch it.
    private var ready: [UInt64] = []
    /// No word below this index has a bit set.
    private var lowestWord = 0
    private(set) var readyCount = 0
    /// Freed clusters waiting for older I/O, in the order of their frees (generations ascending,
    /// which is the order frees are applied in).
    private var quarantine = ArrayQueue<(cluster: UInt64, generation: Generation)>()

    var isEmpty: Bool { readyCount == 0 && quarantine.isEmpty }
    var count: Int { readyCount + quarantine.count }

    /// Adds a free cluster. `freedAt`: the generation of its free, which requests still in flight
    /// from before it may be touching; nil when none can be (free at open, never written, punched),
    /// so it is ready at once.
    mutating func insert(_ cluster: UInt64, freedAt generation: Generation?) {
        if let generation {
            quarantine.append((cluster, generation))
        } else {
            setReady(cluster)
        }
    }

    /// Moves quarantined clusters whose free is older than every request in flight (`oldestInFlight`,
    /// nil when none is) to the ready set. Stops at the first one still too young: later frees are
    /// no older, so nothing eligible is skipped for long, and waiting longer is always safe.
    mutating func release(oldestInFlight: Generation?) {
        while let q = quarantine.first {
            if let oldest = oldestInFlight, q.generation > oldest { break }
            setReady(q.cluster)
            _ = quarantine.popFirst()
        }
        quarantine.compact()
    }

    /// Takes the lowest run of up to `maximum` consecutive ready clusters; nil when none is ready.
    mutating func takeLowestRun(upTo maximum: Int) -> (first: UInt64, count: Int)? {
        guard readyCount > 0, maximum > 0 else { return nil }
        var w = lowestWord
        while ready[w] == 0 { w += 1 }
        lowestWord = w
        let first = UInt64(w * 64 + ready[w].trailingZeroBitCount)
        var count = 0
        var c = first
        while count < maximum && isReady(c) {
            clearReady(c)
            count += 1
            c += 1
        }
        return (first, count)
    }

    /// Whether `cluster` is ready (quarantined clusters are not).
    func isReady(_ cluster: UInt64) -> Bool {
        let w = Int(cluster >> 6)
        return w < ready.count && ready[w] & (1 << (cluster & 63)) != 0
    }

    private mutating func setReady(_ cluster: UInt64) {
        let w = Int(cluster >> 6)
        if w >= ready.count { ready += [UInt64](repeating: 0, count: max(w + 1 - ready.count, ready.count / 2)) }
        let bit: UInt64 = 1 << (cluster & 63)
        guard ready[w] & bit == 0 else { return }
        ready[w] |= bit
        readyCount += 1
        if readyCount == 1 || w < lowestWord { lowestWord = w }
    }

    private mutating func clearReady(_ cluster: UInt64) {
        ready[Int(cluster >> 6)] &= ~(1 << (cluster & 63))
        readyCount -= 1
    }
}
