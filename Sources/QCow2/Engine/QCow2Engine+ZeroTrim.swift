// WRITE_ZEROES and TRIM on normal L2 entries: metadata-only where the format allows (a zero flag, an
// unallocated entry), real zeros otherwise; the clusters the old entry held are freed after the flush.

import BlockDevice

extension QCow2Engine {
    func zeroCluster(_ id: WriteID, slot: L2Slot, index: Int, mapping: ClusterMapping, inCluster: UInt64,
                             segment: UInt64, keepAllocation: Bool, _ writing: WritableState) throws(QCow2Error) {
        let guest = writing.writes[id].offset + writing.writes[id].position
        let whole = inCluster == 0 && (segment == geometry.clusterSize || guest + segment == geometry.virtualSize)
        let backed = backingSize.map { geometry.clusterStart(guest) < $0 } ?? false
        let alreadyZero: Bool
        switch mapping {
        case .zero, .zeroAllocated: alreadyZero = true
        case .unallocated: alreadyZero = !backed
        case .normal, .compressed: alreadyZero = false
        }
        if alreadyZero {
            writing.writes[id].progress.skip(segment)
            return
        }
        if whole && header.version >= 3 {
            var word = L2Entry.zeroFlag
            if keepAllocation, case .normal(let host, true) = mapping {
                word = host | L2Entry.copied | L2Entry.zeroFlag
            }
            setEntry(slot, index, word, writing)
            writing.writes[id].progress.skip(segment)
            return
        }
        if whole && !backed {
            setEntry(slot, index, 0, writing)
            writing.writes[id].progress.skip(segment)
            return
        }
        try writeData(id, slot: slot, index: index, mapping: mapping, inCluster: inCluster,
                      source: UnsafeRawBufferPointer(rebasing: writing.zeroCluster[0..<Int(segment)]), maxClusters: 1, writing)
    }

    func trimCluster(_ id: WriteID, slot: L2Slot, index: Int, mapping: ClusterMapping, inCluster: UInt64, segment: UInt64, _ writing: WritableState) {
        let guest = writing.writes[id].offset + writing.writes[id].position
        writing.writes[id].progress.skip(segment)
        // TRIM is advisory: partial clusters are left alone.
        guard inCluster == 0 && (segment == geometry.clusterSize || guest + segment == geometry.virtualSize) else { return }
        let backed = backingSize.map { geometry.clusterStart(guest) < $0 } ?? false
        if backed {
            // The backing data must stay hidden: a zero cluster (v3), or leave it (v2 cannot say zero).
            guard header.version >= 3 else { return }
            if mapping != .zero { setEntry(slot, index, L2Entry.zeroFlag, writing) }
        } else if mapping != .unallocated {
            setEntry(slot, index, 0, writing)
        }
    }

    /// A metadata-only change of one entry; the old cluster is freed once the change is durable.
    func setEntry(_ slot: L2Slot, _ index: Int, _ word: UInt64, _ writing: WritableState) {
        let old = slot.entry(index, extended: false).word
        guard old != word else { return }
        slot.setEntry(index, word: word, extended: false)
        writing.markDirty(slot)
        if old & L2Entry.offsetMask != word & L2Entry.offsetMask || old & L2Entry.compressedFlag != 0 {
            queueFree(word: old, writing)
        }
    }
}
