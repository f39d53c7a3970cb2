// Writes, zeroes and trims, and the cluster allocations they create.
//
// A write walks its range cluster by cluster, like a read. A cluster that is already ours (a normal
// entry with COPIED set) is written in place. Anything else — unallocated, zero, compressed, shared
// with a snapshot (COPIED clear) — is an allocating write: the guest cluster is reserved so no other
// writer touches it (Q3: writers of other clusters never wait), a host cluster is allocated (refcount
// set in memory at once, so a crash before the link is a leak, never corruption), the parts the write
// does not cover are copied from the cluster's old contents (COW), the cluster is written in one piece
// and only then linked into the L2 table. Waiters on the reservation then look the cluster up again
// and find it allocated.
//
// Nothing here writes metadata: links, new tables and refcount changes dirty in-memory copies at the
// current epoch, and the flush pipeline makes them durable in the order the crash rules need.

import BlockDevice

extension QCow2Engine {
    public func write(tag: RequestTag, offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool) {
        startWrite(tag: tag, offset: offset, length: UInt64(buffer.count), kind: .data(buffer), fua: fua)
    }

    public func writeZeroes(tag: RequestTag, offset: UInt64, length: UInt64, keepAllocation: Bool, fastOnly: Bool, fua: Bool) {
        // FAST_ZERO: only whole clusters of a v3 image are zeroed by metadata alone.
        if fastOnly && !zeroingIsMetadataOnly(offset: offset, length: length) {
            outbox.append(.complete(tag, .failed(BlockError(errno: 95, message: "zeroing would write data"))))
            return
        }
        startWrite(tag: tag, offset: offset, length: length, kind: .zeroes(keepAllocation: keepAllocation), fua: fua)
    }

    public func trim(tag: RequestTag, offset: UInt64, length: UInt64, fua: Bool) {
        startWrite(tag: tag, offset: offset, length: length, kind: .trim, fua: fua)
    }

    private func zeroingIsMetadataOnly(offset: UInt64, length: UInt64) -> Bool {
        guard header.version >= 3 else { return backingSize == nil && isWhole(offset: offset, length: length) }
        return isWhole(offset: offset, length: length)
    }

    func isWhole(offset: UInt64, length: UInt64) -> Bool {
        // With extended L2, whole subclusters are enough: each has its own zero bit.
        let unit = geometry.extendedL2 ? geometry.subclusterSize : geometry.clusterSize
        let end = offset + length
        return offset % unit == 0 && (end % unit == 0 || end == geometry.virtualSize)
    }

    private func startWrite(tag: RequestTag, offset: UInt64, length: UInt64, kind: WriteRequest.Kind, fua: Bool) {
        guard writable else {
            outbox.append(.complete(tag, .failed(BlockError(errno: EROFS_))))
            return
        }
        if let failure {
            outbox.append(.complete(tag, .failed(BlockError(errno: EIO_, message: "image is read-only after an error: \(failure)"))))
            return
        }
        if length == 0 {
            outbox.append(.complete(tag, .done))
            return
        }
        let id = writes.insert(WriteRequest(tag: tag, offset: offset, length: length, kind: kind, fua: fua,
                                            generation: pinGeneration()))
        continueWrite(id)
    }

    func continueWrite(_ id: WriteID) {
        let g = geometry
        writes[id].state = .resolving
        while writes[id].position < writes[id].length {
            let guest = writes[id].offset + writes[id].position
            let l1Index = g.l1Index(guest)
            guard let slot = l2ForWrite(l1Index, request: id) else { return }
            let guestCluster = guest >> UInt64(g.clusterBits)
            if !reservations.isEmpty, let a = reservations[guestCluster] {
                allocations[a].waiters.append(id)
                writes[id].state = .waitingForReservation
                return
            }
            let index = g.l2Index(guest)
            let inCluster = g.offsetInCluster(guest)
            let segment = min(g.clusterSize - inCluster, writes[id].length - writes[id].position)
            do {
                if g.extendedL2 {
                    try writeExtended(id, slot: slot, index: index, inCluster: inCluster, segment: segment)
                    continue
                }
                let mapping = try L2Entry.decode(slot.entry(index, extended: false).word, geometry: g, index: index)
                switch writes[id].kind {
                case .data(let buffer):
                    let start = Int(writes[id].position)
                    try writeData(id, slot: slot, index: index, mapping: mapping, inCluster: inCluster,
                                  source: UnsafeRawBufferPointer(rebasing: buffer[start...]), maxClusters: Int.max)
                case .zeroes(let keep):
                    try zeroCluster(id, slot: slot, index: index, mapping: mapping, inCluster: inCluster,
                                    segment: segment, keepAllocation: keep)
                case .trim:
                    trimCluster(id, slot: slot, index: index, mapping: mapping, inCluster: inCluster, segment: segment)
                }
            } catch {
                markCorrupt(error.description)
                failWrite(id, BlockError(errno: EIO_, message: error.description))
                return
            }
        }
        writes[id].state = .draining
        finishWriteIfDone(id)
    }

    /// The L2 table for writing at `l1Index`: created when missing, copied when shared with a snapshot
    /// (COPIED clear in L1), loaded when absent (then nil: the request is parked).
    private func l2ForWrite(_ l1Index: Int, request id: WriteID) -> L2Slot? {
        let entry = l1[l1Index]
        let g = geometry
        if entry & L1Entry.offsetMask == 0 {
            let host = refcounts!.allocateOne(epoch: epoch, oldestInFlight: oldestInFlight)
            l2TableClusters.insert(host / g.clusterSize)
            let slot = cache.makeSlot(l1Index: l1Index, hostOffset: host)
            slot.table.initializeMemory(as: UInt8.self, repeating: 0)
            slot.dirtyEpoch = epoch
            cache.insertReady(slot)
            setL1(l1Index, host | L2Entry.copied)
            return slot
        }
        switch resolveL2(l1Index, waiter: .write(id)) {
        case .parked:
            writes[id].state = .waitingForL2(l1Index: l1Index)
            return nil
        case .none:
            preconditionFailure("L1 entry vanished")
        case .table(let slot):
            if entry & L2Entry.copied != 0 { return slot }
            // The table is shared (a snapshot refers to it): write a private copy, whose entries keep
            // their COPIED bits, so shared data clusters are still copied on write.
            let host = refcounts!.allocateOne(epoch: epoch, oldestInFlight: oldestInFlight)
            l2TableClusters.insert(host / g.clusterSize)
            l2TableClusters.remove(slot.hostOffset / g.clusterSize)
            let copy = cache.makeSlot(l1Index: l1Index, hostOffset: host)
            copy.table.copyMemory(from: UnsafeRawBufferPointer(slot.table))
            copy.dirtyEpoch = epoch
            cache.remove(l1Index)
            cache.insertReady(copy)
            queueFree(clusters: [slot.hostOffset / g.clusterSize])
            setL1(l1Index, host | L2Entry.copied)
            return copy
        }
    }

    private func setL1(_ index: Int, _ value: UInt64) {
        l1[index] = value
        if l1Dirty[index] == nil { l1Dirty[index] = epoch }
    }

    func markDirty(_ slot: L2Slot) {
        if slot.dirtyEpoch == nil { slot.dirtyEpoch = epoch }
    }

    /// Writes `source` (starting at the cursor) into the cluster at `index` and, when it can, the
    /// clusters after it.
    func writeData(_ id: WriteID, slot: L2Slot, index: Int, mapping: ClusterMapping, inCluster: UInt64,
                           source: UnsafeRawBufferPointer, maxClusters: Int) throws(QCow2Error) {
        let g = geometry
        let cluster = g.clusterSize
        let remaining = UInt64(source.count)
        let guest = writes[id].offset + writes[id].position
        let guestCluster = guest >> UInt64(g.clusterBits)

        if case .normal(let host, true) = mapping {
            // In place. Extend over clusters that are ours too and follow on the host.
            var length = min(cluster - inCluster, remaining)
            var next = index + 1
            var expected = host + cluster
            while length < remaining && next < g.l2Entries && next - index < maxClusters,
                  reservations[guestCluster + UInt64(next - index)] == nil,
                  case .normal(let h, true) = try L2Entry.decode(slot.entry(next, extended: g.extendedL2).word, geometry: g, index: next),
                  h == expected {
                length += min(cluster, remaining - length)
                expected += cluster
                next += 1
            }
            try checkDataTarget(host + inCluster, count: length, entry: index)
            let token = issue(.writeInPlace(request: id))
            writes[id].pending += 1
            outbox.append(.writeFile(token, offset: host + inCluster,
                                     from: UnsafeRawBufferPointer(rebasing: source[0..<Int(length)]), dsync: false))
            writes[id].position += length
            return
        }

        if inCluster == 0 && remaining >= cluster {
            // Whole clusters: allocate a contiguous run and write it straight from the caller's buffer.
            var count = 1
            while count < maxClusters && UInt64(count + 1) * cluster <= remaining && index + count < g.l2Entries,
                  reservations[guestCluster + UInt64(count)] == nil {
                let word = slot.entry(index + count, extended: g.extendedL2).word
                if case .normal(_, true) = try L2Entry.decode(word, geometry: g, index: index + count) { break }
                count += 1
            }
            let run = refcounts!.allocateRun(upTo: count, epoch: epoch, oldestInFlight: oldestInFlight)
            let host = run.host
            count = run.count
            let old = (0..<count).map { slot.entry(index + $0, extended: g.extendedL2).word }
            let length = Int(UInt64(count) * cluster)
            let a = reserve(Allocation(request: id, l1Index: slot.l1Index, firstIndex: index, count: count, host: host,
                                       oldWords: old, buffer: nil, writeOffset: host,
                                       source: UnsafeRawBufferPointer(rebasing: source[0..<length])),
                            slot: slot, guestCluster: guestCluster)
            writes[id].pending += 1
            writes[id].position += UInt64(length)
            issueAllocationWrite(a)
            return
        }

        // Part of one cluster: the rest comes from the cluster's old contents.
        let length = min(cluster - inCluster, remaining)
        let endBefore = refcounts!.endCluster
        let host = refcounts!.allocateOne(epoch: epoch, oldestInFlight: oldestInFlight)
        let fresh = host / cluster >= endBefore
        let readsZero: Bool
        switch mapping {
        case .zero, .zeroAllocated: readsZero = true
        case .unallocated: readsZero = backingSize.map { guestCluster * cluster >= $0 } ?? true
        case .normal, .compressed: readsZero = false
        }
        let old = [slot.entry(index, extended: g.extendedL2).word]
        let data = UnsafeRawBufferPointer(rebasing: source[0..<Int(length)])
        writes[id].pending += 1
        writes[id].position += length
        if fresh && readsZero {
            // A cluster past the old end of the file reads as zeros already: write only the new bytes.
            let a = reserve(Allocation(request: id, l1Index: slot.l1Index, firstIndex: index, count: 1, host: host,
                                       oldWords: old, buffer: nil, writeOffset: host + inCluster, source: data),
                            slot: slot, guestCluster: guestCluster)
            issueAllocationWrite(a)
            return
        }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(cluster), alignment: 4096)
        (buffer.baseAddress! + Int(inCluster)).copyMemory(from: data.baseAddress!, byteCount: Int(length))
        let a = reserve(Allocation(request: id, l1Index: slot.l1Index, firstIndex: index, count: 1, host: host,
                                   oldWords: old, buffer: buffer, writeOffset: host, source: UnsafeRawBufferPointer(buffer)),
                        slot: slot, guestCluster: guestCluster)
        let gaps = [0..<Int(inCluster), Int(inCluster + length)..<Int(cluster)].filter { !$0.isEmpty }
        do {
            try copyOnWrite(a, mapping: mapping, guestCluster: guestCluster, gaps: gaps)
        } catch {
            abandon(a)
            throw error
        }
        if allocations[a].pendingCOW == 0 { issueAllocationWrite(a) }
    }

    func reserve(_ allocation: Allocation, slot: L2Slot, guestCluster: UInt64) -> AllocationID {
        let a = allocations.insert(allocation)
        for k in 0..<UInt64(allocation.count) { reservations[guestCluster + k] = a }
        slot.pins += 1
        return a
    }

    /// Fills `gaps` of the allocation's buffer with the guest view of the old cluster (H4, H5).
    /// `origin` is the offset in the cluster that the buffer's first byte stands for (non-zero when only
    /// some subclusters are assembled); `gaps` are in buffer coordinates.
    func copyOnWrite(_ a: AllocationID, mapping: ClusterMapping, guestCluster: UInt64, gaps: [Range<Int>],
                     origin: Int = 0) throws(QCow2Error) {
        let buffer = allocations[a].buffer!
        let cluster = geometry.clusterSize
        func zero(_ r: Range<Int>) { UnsafeMutableRawBufferPointer(rebasing: buffer[r]).initializeMemory(as: UInt8.self, repeating: 0) }
        switch mapping {
        case .zero, .zeroAllocated:
            gaps.forEach(zero)
        case .unallocated:
            let base = guestCluster * cluster + UInt64(origin)
            for gap in gaps {
                let backed = backingSize.map { $0 > base + UInt64(gap.lowerBound) ? Int(min(UInt64(gap.upperBound), $0 - base)) : gap.lowerBound } ?? gap.lowerBound
                if backed > gap.lowerBound {
                    let token = issue(.cowRead(allocation: a))
                    allocations[a].pendingCOW += 1
                    outbox.append(.readBacking(token, offset: base + UInt64(gap.lowerBound),
                                               into: UnsafeMutableRawBufferPointer(rebasing: buffer[gap.lowerBound..<backed])))
                }
                if backed < gap.upperBound { zero(backed..<gap.upperBound) }
            }
        case .normal(let host, _):
            guard host + cluster <= hostLimit else {
                throw QCow2Error("L2 table", "data cluster at \(hex(host)) lies outside the image file")
            }
            for gap in gaps {
                let token = issue(.cowRead(allocation: a))
                allocations[a].pendingCOW += 1
                outbox.append(.readFile(token, offset: host + UInt64(origin + gap.lowerBound),
                                        into: UnsafeMutableRawBufferPointer(rebasing: buffer[gap])))
            }
        case .compressed(let host, let byteCount):
            guard byteCount <= 2 * Int(cluster) + 512, host < hostLimit else {
                throw QCow2Error("L2 table", "compressed cluster at \(hex(host)) (\(byteCount) bytes) is invalid")
            }
            let source = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(min(UInt64(byteCount), hostLimit - host)), alignment: 16)
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(cluster), alignment: 16)
            let token = issue(.cowCompressed(allocation: a, source: source, scratch: scratch))
            allocations[a].pendingCOW += 1
            allocations[a].cowGaps = gaps
            allocations[a].cowOrigin = origin
            outbox.append(.readFile(token, offset: host, into: source))
        }
    }

    /// An allocation whose old contents turned out to be unreadable (corrupt metadata): undone as if
    /// its write had failed, once any copy-on-write reads already issued are back, so that its request
    /// is answered and its reservation released instead of hanging everyone behind it.
    func abandon(_ a: AllocationID) {
        if allocations[a].pendingCOW == 0 {
            allocationWritten(a, errno: EIO_)
        } else if allocations[a].error == nil {
            allocations[a].error = EIO_
        }
    }

    func issueAllocationWrite(_ a: AllocationID) {
        let token = issue(.allocationWrite(allocation: a))
        outbox.append(.writeFile(token, offset: allocations[a].writeOffset, from: allocations[a].source, dsync: false))
    }

    func cowCompleted(_ a: AllocationID, errno: Int32?) {
        if let errno, allocations[a].error == nil { allocations[a].error = errno }
        allocations[a].pendingCOW -= 1
        guard allocations[a].pendingCOW == 0 else { return }
        if allocations[a].error != nil { return allocationWritten(a, errno: allocations[a].error) }
        issueAllocationWrite(a)
    }

    func cowCompressedRead(_ a: AllocationID, source: UnsafeMutableRawBufferPointer, scratch: UnsafeMutableRawBufferPointer, errno: Int32?) {
        if let errno {
            source.deallocate()
            scratch.deallocate()
            return cowCompleted(a, errno: errno)
        }
        let token = issue(.cowDecompress(allocation: a, source: source, scratch: scratch))
        outbox.append(.decompress(token, compression, source: UnsafeRawBufferPointer(source), into: scratch))
    }

    func cowDecompressed(_ a: AllocationID, source: UnsafeMutableRawBufferPointer, scratch: UnsafeMutableRawBufferPointer, errno: Int32?) {
        source.deallocate()
        if errno == nil, let buffer = allocations[a].buffer {
            for gap in allocations[a].cowGaps {
                (buffer.baseAddress! + gap.lowerBound).copyMemory(from: scratch.baseAddress! + allocations[a].cowOrigin + gap.lowerBound,
                                                                  byteCount: gap.count)
            }
        }
        scratch.deallocate()
        cowCompleted(a, errno: errno == nil ? nil : EIO_)
    }

    /// The allocation's data is in the file: link it (or give the clusters back on error).
    func allocationWritten(_ a: AllocationID, errno: Int32?) {
        let allocation = allocations.remove(a)
        let g = geometry
        let guestCluster = UInt64(allocation.l1Index) << UInt64(g.l2Bits) + UInt64(allocation.firstIndex)
        for k in 0..<UInt64(allocation.count) { reservations[guestCluster + k] = nil }
        allocation.buffer?.deallocate()
        let slot = cache[allocation.l1Index]
        slot?.pins -= 1
        let id = allocation.request
        if let errno {
            // Never linked: the new clusters go back to the allocator once nothing can be writing them
            // (a fill-in of subclusters wrote into a cluster that stays ours).
            if allocation.freesOld { queueFree(clusters: (0..<UInt64(allocation.count)).map { allocation.host / g.clusterSize + $0 }) }
            if writes[id].error == nil { writes[id].error = BlockError(errno: errno) }
        } else if let slot {
            unsyncedData = true
            for k in 0..<allocation.count {
                // O2: the data is in the file now; the flush makes it durable (sync #1) before this
                // entry is written (stage C).
                let word = L2Entry.normal(host: allocation.host + UInt64(k) * g.clusterSize)
                slot.setEntry(allocation.firstIndex + k, word: word, extended: g.extendedL2)
                if g.extendedL2 {
                    slot.setBitmap(allocation.firstIndex + k, allocation.bitmap ?? L2Entry.allAllocated)
                }
                if allocation.freesOld { queueFree(word: allocation.oldWords[k]) }
            }
            markDirty(slot)
        }
        writes[id].pending -= 1
        for w in allocation.waiters { continueWrite(w) }
        finishWriteIfDone(id)
    }

    func inPlaceWriteCompleted(_ id: WriteID, errno: Int32?) {
        if let errno, writes[id].error == nil { writes[id].error = BlockError(errno: errno) }
        unsyncedData = true
        writes[id].pending -= 1
        finishWriteIfDone(id)
    }

    // MARK: - Zeroes and trims

    private func zeroCluster(_ id: WriteID, slot: L2Slot, index: Int, mapping: ClusterMapping, inCluster: UInt64,
                             segment: UInt64, keepAllocation: Bool) throws(QCow2Error) {
        let guest = writes[id].offset + writes[id].position
        let whole = inCluster == 0 && (segment == geometry.clusterSize || guest + segment == geometry.virtualSize)
        let backed = backingSize.map { geometry.clusterStart(guest) < $0 } ?? false
        let alreadyZero: Bool
        switch mapping {
        case .zero, .zeroAllocated: alreadyZero = true
        case .unallocated: alreadyZero = !backed
        case .normal, .compressed: alreadyZero = false
        }
        if alreadyZero {
            writes[id].position += segment
            return
        }
        if whole && header.version >= 3 {
            var word = L2Entry.zeroFlag
            if keepAllocation, case .normal(let host, true) = mapping {
                word = host | L2Entry.copied | L2Entry.zeroFlag
            }
            setEntry(slot, index, word)
            writes[id].position += segment
            return
        }
        if whole && !backed {
            setEntry(slot, index, 0)
            writes[id].position += segment
            return
        }
        try writeData(id, slot: slot, index: index, mapping: mapping, inCluster: inCluster,
                      source: UnsafeRawBufferPointer(rebasing: zeroCluster[0..<Int(segment)]), maxClusters: 1)
    }

    private func trimCluster(_ id: WriteID, slot: L2Slot, index: Int, mapping: ClusterMapping, inCluster: UInt64, segment: UInt64) {
        let guest = writes[id].offset + writes[id].position
        writes[id].position += segment
        // TRIM is advisory: partial clusters are left alone.
        guard inCluster == 0 && (segment == geometry.clusterSize || guest + segment == geometry.virtualSize) else { return }
        let backed = backingSize.map { geometry.clusterStart(guest) < $0 } ?? false
        if backed {
            // The backing data must stay hidden: a zero cluster (v3), or leave it (v2 cannot say zero).
            guard header.version >= 3 else { return }
            if mapping != .zero { setEntry(slot, index, L2Entry.zeroFlag) }
        } else if mapping != .unallocated {
            setEntry(slot, index, 0)
        }
    }

    /// A metadata-only change of one entry; the old cluster is freed once the change is durable.
    func setEntry(_ slot: L2Slot, _ index: Int, _ word: UInt64) {
        let old = slot.entry(index, extended: false).word
        guard old != word else { return }
        slot.setEntry(index, word: word, extended: false)
        markDirty(slot)
        if old & L2Entry.offsetMask != word & L2Entry.offsetMask || old & L2Entry.compressedFlag != 0 {
            queueFree(word: old)
        }
    }

    // MARK: - Frees

    /// Queues the host clusters an entry referenced for a refcount decrease after the next flush (O4).
    func queueFree(word: UInt64) {
        guard let mapping = try? L2Entry.decode(word, geometry: geometry, index: 0) else { return }
        let c = geometry.clusterSize
        switch mapping {
        case .normal(let host, _), .zeroAllocated(let host, _):
            queueFree(clusters: [host / c])
        case .compressed(let host, let n):
            // One reference per compressed cluster on every host cluster its bytes touch (H5).
            queueFree(clusters: Array((host / c)...((host + UInt64(n) - 1) / c)))
        case .unallocated, .zero:
            break
        }
    }

    func queueFree(clusters: [UInt64]) {
        guard !clusters.isEmpty else { return }
        generation += 1
        pendingFrees.append((epoch, generation, clusters))
    }

    // MARK: - Finishing

    func failWrite(_ id: WriteID, _ error: BlockError) {
        if writes[id].error == nil { writes[id].error = error }
        writes[id].position = writes[id].length
        writes[id].state = .draining
        finishWriteIfDone(id)
    }

    private func finishWriteIfDone(_ id: WriteID) {
        guard case .draining = writes[id].state, writes[id].pending == 0 else { return }
        if writes[id].error == nil && writes[id].fua {
            // FUA: the write is answered once a flush covering it is durable.
            writes[id].state = .flushing
            requestFlush(.write(id))
            return
        }
        completeWrite(id, error: writes[id].error)
    }

    func completeWrite(_ id: WriteID, error: BlockError?) {
        let r = writes.remove(id)
        unpinGeneration(r.generation)
        outbox.append(.complete(r.tag, error.map { .failed($0) } ?? .done))
    }
}
