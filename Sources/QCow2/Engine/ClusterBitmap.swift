// A set of host cluster numbers as one bit per cluster: the metadata clusters a data write must never
// reach are asked about on every write, and a bit test costs a few instructions where a Set<UInt64>
// lookup hashed (callgrind: ~270 instructions per 4 KiB overwrite for two lookups and the L2 cache's).
//
// Dense from cluster 0 up to the highest cluster inserted, which for a sound image is inside the file
// (a writable image's refcounts, already in memory, take at least as many bits). A cluster number past
// `denseLimit` (only a corrupt table names one) goes to a Set instead, so that a hostile offset cannot
// make the bitmap huge.

struct ClusterBitmap {
    /// 2^27 clusters: 16 MiB of bits, 64 GiB of file at the smallest cluster size.
    static let denseLimit: UInt64 = 1 << 27

    fileprivate var words: [UInt64] = []
    fileprivate var far: Set<UInt64> = []

    @inline(__always)
    func contains(_ cluster: UInt64) -> Bool {
        if cluster >> 6 < UInt64(words.count) { return words[Int(cluster >> 6)] & (1 << (cluster & 63)) != 0 }
        return cluster >= Self.denseLimit && !far.isEmpty && far.contains(cluster)
    }

    mutating func insert(_ cluster: UInt64) {
        guard cluster < Self.denseLimit else {
            far.insert(cluster)
            return
        }
        let w = Int(cluster >> 6)
        if w >= words.count { words += repeatElement(0, count: w + 1 - words.count) }
        words[w] |= 1 << (cluster & 63)
    }

    mutating func remove(_ cluster: UInt64) {
        if cluster >> 6 < UInt64(words.count) {
            words[Int(cluster >> 6)] &= ~(1 << (cluster & 63))
        } else if cluster >= Self.denseLimit {
            far.remove(cluster)
        }
    }

    mutating func formUnion<S: Sequence>(_ clusters: S) where S.Element == UInt64 {
        for c in clusters { insert(c) }
    }
}

/// The members in ascending order (dense part first, then the far ones): for checks and tests, not
/// for the request path.
extension ClusterBitmap: Sequence {
    func makeIterator() -> IndexingIterator<[UInt64]> {
        var members: [UInt64] = []
        for (w, word) in words.enumerated() where word != 0 {
            for bit in 0..<64 where word & (1 << UInt64(bit)) != 0 { members.append(UInt64(w) << 6 | UInt64(bit)) }
        }
        return (members + far.sorted()).makeIterator()
    }
}
