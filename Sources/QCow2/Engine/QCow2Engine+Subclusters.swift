// Writes to images with extended L2 entries, where each cluster is split into 32 subclusters that are
// allocated, zero or unallocated on their own (qcow2.txt, "Extended L2 Entries").
//
// The gain is smaller copy-on-write: a partial write fills in only the subclusters it touches, copying
// just the uncovered parts of the first and last of them; untouched subclusters of a new cluster stay
// unallocated (still read from the backing file). Zeroing whole subclusters is a bitmap change.
// A subcluster fill-in inside a cluster that is already ours writes into that cluster and links only
// the new bitmap; the cluster is still reserved meanwhile, so writers of the same cluster queue (Q3).

import BlockDevice

extension QCow2Engine {
    func writeExtended(_ id: WriteID, slot: L2Slot, index: Int, inCluster: UInt64, segment: UInt64, _ writing: WritableState) throws(QCow2Error) {
        let g = geometry
        let (word, bitmap) = slot.entry(index, extended: true)
        let mapping = try L2Entry.decode(word, geometry: g, index: index)
        let guest = writing.writes[id].offset + writing.writes[id].position
        let unit = g.subclusterSize
        let touched = subclusterMask(from: Int(inCluster / unit), through: Int((inCluster + segment - 1) / unit))
        let wholeCluster = inCluster == 0 && (segment == g.clusterSize || guest + segment == g.virtualSize)
        let wholeSubclusters = inCluster % unit == 0 && ((inCluster + segment) % unit == 0 || guest + segment == g.virtualSize)
        switch writing.writes[id].kind {
        case .data(let buffer):
            let start = Int(writing.writes[id].position)
            try writeSubclusters(id, slot: slot, index: index, word: word, bitmap: bitmap, mapping: mapping,
                                 inCluster: inCluster, source: UnsafeRawBufferPointer(rebasing: buffer[start..<start + Int(segment)]), writing)
        case .zeroes(let keep):
            let compressed: Bool
            if case .compressed = mapping { compressed = true } else { compressed = false }
            guard wholeSubclusters && (!compressed || wholeCluster) else {
                // Part of a subcluster (or of a compressed cluster): write real zeros.
                return try writeSubclusters(id, slot: slot, index: index, word: word, bitmap: bitmap, mapping: mapping,
                                            inCluster: inCluster,
                                            source: UnsafeRawBufferPointer(rebasing: writing.zeroCluster[0..<Int(segment)]), writing)
            }
            var newWord = word
            var newBitmap = (bitmap & ~touched) | (touched << 32)
            if compressed {
                newWord = 0
                newBitmap = L2Entry.allZero
            } else if newBitmap & L2Entry.allAllocated == 0 && !keep {
                newWord = 0   // nothing allocated is left in the cluster: give it back
            }
            setExtendedEntry(slot, index, word: newWord, bitmap: newBitmap, writing)
            writing.writes[id].progress.skip(segment)
        case .trim:
            writing.writes[id].progress.skip(segment)
            guard wholeCluster else { return }
            let backed = backingSize.map { g.clusterStart(guest) < $0 } ?? false
            setExtendedEntry(slot, index, word: 0, bitmap: backed ? L2Entry.allZero : 0, writing)
        }
    }

    private func subclusterMask(from first: Int, through last: Int) -> UInt64 {
        ((1 << UInt64(last - first + 1)) - 1) << UInt64(first)
    }

    private func setExtendedEntry(_ slot: L2Slot, _ index: Int, word: UInt64, bitmap: UInt64, _ writing: WritableState) {
        let (oldWord, oldBitmap) = slot.entry(index, extended: true)
        guard oldWord != word || oldBitmap != bitmap else { return }
        slot.setEntry(index, word: word, extended: true)
        slot.setBitmap(index, bitmap)
        writing.markDirty(slot)
        if oldWord & L2Entry.offsetMask != word & L2Entry.offsetMask || oldWord & L2Entry.compressedFlag != 0 {
            queueFree(word: oldWord, writing)
        }
    }

    /// Writes `source` at `inCluster` of one cluster, filling in subclusters.
    private func writeSubclusters(_ id: WriteID, slot: L2Slot, index: Int, word: UInt64, bitmap: UInt64, mapping: ClusterMapping,
                                  inCluster: UInt64, source: UnsafeRawBufferPointer, _ writing: WritableState) throws(QCow2Error) {
        let g = geometry
        let cluster = g.clusterSize
        let unit = g.subclusterSize
        let length = UInt64(source.count)
        let first = Int(inCluster / unit)
        let last = Int((inCluster + length - 1) / unit)
        let touched = subclusterMask(from: first, through: last)
        let guestCluster = (writing.writes[id].offset + writing.writes[id].position) >> UInt64(g.clusterBits)

        if case .compressed = mapping {
            // H5: inflate, copy the whole cluster, link it with every subcluster allocated.
            return try writeData(id, slot: slot, index: index, mapping: mapping, inCluster: inCluster, source: source,
                                 maxClusters: 1, writing)
        }
        if case .normal(let host, true) = mapping, bitmap & touched == touched {
            // Every touched subcluster already holds data of ours: in place.
            try checkDataTarget(host, count: cluster, entry: index)
            let token = issue(.writeInPlace(request: id))
            outbox.append(.writeFile(token, offset: host + inCluster, from: source, dsync: false))
            writing.writes[id].progress.issue(length)
            return
        }

        let zeroBits = bitmap >> 32
        let host: UInt64
        let newBitmap: UInt64
        var oldHost: UInt64 = 0
        var fillIn = false
        var shared = false
        switch mapping {
        case .normal(let h, true):
            fillIn = true
            host = h
            oldHost = h
            newBitmap = (bitmap | touched) & ~(touched << 32)
        case .normal(let h, false):
            // Shared with a snapshot: a private copy of the whole cluster.
            shared = true
            oldHost = h
            host = writing.refcounts.allocateOne(epoch: writing.epoch, oldestInFlight: writing.oldestInFlight)
            newBitmap = ((bitmap & L2Entry.allAllocated) | touched) | ((zeroBits & ~touched) << 32)
        case .unallocated:
            host = writing.refcounts.allocateOne(epoch: writing.epoch, oldestInFlight: writing.oldestInFlight)
            newBitmap = touched | ((zeroBits & ~touched) << 32)
        case .zero, .zeroAllocated, .compressed:
            preconditionFailure("not an extended L2 mapping")
        }
        if oldHost != 0 && oldHost + cluster > hostLimit {
            throw QCow2Error("L2 entry \(index)", "data cluster at \(hex(oldHost)) lies outside the image file")
        }
        if fillIn { try checkDataTarget(host, count: cluster, entry: index) }
        // The buffer covers the touched subclusters (the whole cluster for a private copy).
        let origin = shared ? 0 : first * Int(unit)
        let end = shared ? Int(cluster) : (last + 1) * Int(unit)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: end - origin, alignment: 4096)
        (buffer.baseAddress! + Int(inCluster) - origin).copyMemory(from: source.baseAddress!, byteCount: Int(length))
        let a = reserve(Allocation(request: id, l1Index: slot.l1Index, firstIndex: index, count: 1, host: host,
                                   oldWords: [word], buffer: buffer, writeOffset: host + UInt64(origin),
                                   source: UnsafeRawBufferPointer(buffer), bitmap: newBitmap, freesOld: !fillIn),
                        slot: slot, guestCluster: guestCluster, writing)
        writing.writes[id].progress.issue(length)
        // Fill what the write does not cover, subcluster by subcluster, from the guest view.
        do {
            try fillGaps(a, mapping: mapping, bitmap: bitmap, index: index, oldHost: oldHost, guestCluster: guestCluster,
                         gaps: [origin..<Int(inCluster), Int(inCluster + length)..<end], origin: origin, writing)
        } catch {
            abandon(a, writing)
            throw error
        }
        allocationReady(a, writing)
    }

    private func fillGaps(_ a: AllocationID, mapping: ClusterMapping, bitmap: UInt64, index: Int, oldHost: UInt64,
                          guestCluster: UInt64, gaps: [Range<Int>], origin: Int, _ writing: WritableState) throws(QCow2Error) {
        let unit = geometry.subclusterSize
        for gap in gaps where !gap.isEmpty {
            var lo = gap.lowerBound
            while lo < gap.upperBound {
                let sub = lo / Int(unit)
                let state = try L2Entry.subclusterState(mapping: mapping, bitmap: bitmap, sub: sub, index: index)
                var hi = min((sub + 1) * Int(unit), gap.upperBound)
                while hi < gap.upperBound,
                      try L2Entry.subclusterState(mapping: mapping, bitmap: bitmap, sub: hi / Int(unit), index: index) == state {
                    hi = min(hi + Int(unit), gap.upperBound)
                }
                let view: ClusterMapping
                switch state {
                case .data: view = .normal(host: oldHost, copied: true)
                case .zero: view = .zero
                case .unallocated, .compressed: view = .unallocated
                }
                try copyOnWrite(a, mapping: view, guestCluster: guestCluster, gaps: [(lo - origin)..<(hi - origin)],
                                origin: origin, writing)
                lo = hi
            }
        }
    }
}
