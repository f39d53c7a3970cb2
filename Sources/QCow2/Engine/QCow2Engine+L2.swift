// L2 tables for requests: a lookup that answers at once from the cache or parks the request on the
// table's one load (Q1), the wake-up of everyone parked when it arrives, and for writes the tables
// created when missing or copied when shared with a snapshot.

import BlockDevice

extension QCow2Engine {
    enum Resolution {
        /// No L2 table: every cluster it would map is unallocated.
        case none
        case table(L2Slot)
        /// The request was parked on a loading slot.
        case parked
    }

    func resolveL2(_ l1Index: Int, waiter: Waiter) -> Resolution {
        guard l1Index < l1.count else { return .none }
        let offset = l1[l1Index] & L1Entry.offsetMask
        if offset == 0 { return .none }
        if let slot = cache[l1Index] {
            switch slot.state {
            case .ready:
                cache.touch(slot)
                return .table(slot)
            case .loading:
                slot.waiters.append(waiter)
                return .parked
            }
        }
        // Q1: the first lookup of an absent table starts its one load; later ones queue behind it.
        let slot = cache.startLoading(l1Index: l1Index, hostOffset: offset)
        slot.waiters.append(waiter)
        let token = issue(.loadL2(l1Index: l1Index))
        outbox.append(.readFile(token, offset: offset, into: slot.table))
        return .parked
    }

    func wake(_ waiters: [Waiter]) {
        for w in waiters {
            switch w {
            case .read(let id): resumeRead(id)
            case .status(let id): continueStatus(id)
            case .write(let id): resumeWrite(id, writeSide("a parked write"))
            }
        }
    }

    /// The L2 table for writing at `l1Index`: created when missing, copied when shared with a snapshot
    /// (COPIED clear in L1), loaded when absent (then nil: the request is parked).
    func l2ForWrite(_ l1Index: Int, request id: WriteID, _ writing: WritableState) -> L2Slot? {
        let entry = l1[l1Index]
        let g = geometry
        if entry & L1Entry.offsetMask == 0 {
            let host = writing.refcounts.allocateOne(epoch: writing.epoch, oldestInFlight: writing.oldestInFlight)
            writing.l2TableClusters.insert(host / g.clusterSize)
            let slot = cache.makeSlot(l1Index: l1Index, hostOffset: host)
            slot.table.initializeMemory(as: UInt8.self, repeating: 0)
            slot.dirtyEpoch = writing.epoch
            cache.insertReady(slot)
            setL1(l1Index, host | L2Entry.copied, writing)
            return slot
        }
        switch resolveL2(l1Index, waiter: .write(id)) {
        case .parked:
            writing.writes[id].progress.park(.l2(l1Index: l1Index))
            return nil
        case .none:
            preconditionFailure("L1 entry vanished")
        case .table(let slot):
            if entry & L2Entry.copied != 0 { return slot }
            // The table is shared (a snapshot refers to it): write a private copy, whose entries keep
            // their COPIED bits, so shared data clusters are still copied on write.
            let host = writing.refcounts.allocateOne(epoch: writing.epoch, oldestInFlight: writing.oldestInFlight)
            writing.l2TableClusters.insert(host / g.clusterSize)
            writing.l2TableClusters.remove(slot.hostOffset / g.clusterSize)
            let copy = cache.makeSlot(l1Index: l1Index, hostOffset: host)
            copy.table.copyMemory(from: UnsafeRawBufferPointer(slot.table))
            copy.dirtyEpoch = writing.epoch
            cache.remove(l1Index)
            cache.insertReady(copy)
            queueFree(clusters: [slot.hostOffset / g.clusterSize], writing)
            setL1(l1Index, host | L2Entry.copied, writing)
            return copy
        }
    }

    func setL1(_ index: Int, _ value: UInt64, _ writing: WritableState) {
        l1[index] = value
        if writing.l1Dirty[index] == nil { writing.l1Dirty[index] = writing.epoch }
    }
}
