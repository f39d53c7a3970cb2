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
        guard let writing = writableState else {
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
        markBitmaps(offset: offset, length: length)
        let id = writing.writes.insert(WriteRequest(tag: tag, offset: offset, length: length, kind: kind, fua: fua,
                                            generation: writing.pinGeneration()))
        continueWrite(id, writing)
    }

    func resumeWrite(_ id: WriteID, _ writing: WritableState) {
        writing.writes[id].progress.resume()
        continueWrite(id, writing)
    }

    /// Walks the write from its cursor; after a wait, `resumeWrite` goes on from there.
    private func continueWrite(_ id: WriteID, _ writing: WritableState) {
        let g = geometry
        while writing.writes[id].progress.hasRemaining {
            let guest = writing.writes[id].offset + writing.writes[id].position
            let l1Index = g.l1Index(guest)
            guard let slot = l2ForWrite(l1Index, request: id, writing) else { return }
            let guestCluster = guest >> UInt64(g.clusterBits)
            if !writing.reservations.isEmpty, let a = writing.reservations[guestCluster] {
                writing.allocations[a].waiters.append(id)
                writing.writes[id].progress.park(.reservation(a))
                return
            }
            let index = g.l2Index(guest)
            let inCluster = g.offsetInCluster(guest)
            let segment = min(g.clusterSize - inCluster, writing.writes[id].progress.remaining)
            do {
                if g.extendedL2 {
                    try writeExtended(id, slot: slot, index: index, inCluster: inCluster, segment: segment, writing)
                    continue
                }
                let mapping = try L2Entry.decode(slot.entry(index, extended: false).word, geometry: g, index: index)
                switch writing.writes[id].kind {
                case .data(let buffer):
                    let start = Int(writing.writes[id].position)
                    try writeData(id, slot: slot, index: index, mapping: mapping, inCluster: inCluster,
                                  source: UnsafeRawBufferPointer(rebasing: buffer[start...]), maxClusters: Int.max, writing)
                case .zeroes(let keep):
                    try zeroCluster(id, slot: slot, index: index, mapping: mapping, inCluster: inCluster,
                                    segment: segment, keepAllocation: keep, writing)
                case .trim:
                    trimCluster(id, slot: slot, index: index, mapping: mapping, inCluster: inCluster, segment: segment, writing)
                }
            } catch {
                markCorrupt(error.description)
                failWrite(id, BlockError(errno: EIO_, message: error.description), writing)
                return
            }
        }
        if writing.writes[id].progress.reachedEnd() { writeDrained(id, writing) }
    }

    /// Writes `source` (starting at the cursor) into the cluster at `index` and, when it can, the
    /// clusters after it.
    func writeData(_ id: WriteID, slot: L2Slot, index: Int, mapping: ClusterMapping, inCluster: UInt64,
                   source: UnsafeRawBufferPointer, maxClusters: Int, _ writing: WritableState) throws(QCow2Error) {
        let g = geometry
        let cluster = g.clusterSize
        let remaining = UInt64(source.count)
        let guest = writing.writes[id].offset + writing.writes[id].position
        let guestCluster = guest >> UInt64(g.clusterBits)

        if case .normal(let host, true) = mapping {
            // In place. Extend over clusters that are ours too and follow on the host.
            var length = min(cluster - inCluster, remaining)
            var next = index + 1
            var expected = host + cluster
            while length < remaining && next < g.l2Entries && next - index < maxClusters,
                  writing.reservations[guestCluster + UInt64(next - index)] == nil,
                  case .normal(let h, true) = try L2Entry.decode(slot.entry(next, extended: g.extendedL2).word, geometry: g, index: next),
                  h == expected {
                length += min(cluster, remaining - length)
                expected += cluster
                next += 1
            }
            try checkDataTarget(host + inCluster, count: length, entry: index)
            let token = issue(.writeInPlace(request: id))
            outbox.append(.writeFile(token, offset: host + inCluster,
                                     from: UnsafeRawBufferPointer(rebasing: source[0..<Int(length)]), dsync: false))
            writing.writes[id].progress.issue(length)
            return
        }

        if inCluster == 0 && remaining >= cluster {
            // Whole clusters: allocate a contiguous run and write it straight from the caller's buffer.
            var count = 1
            while count < maxClusters && UInt64(count + 1) * cluster <= remaining && index + count < g.l2Entries,
                  writing.reservations[guestCluster + UInt64(count)] == nil {
                let word = slot.entry(index + count, extended: g.extendedL2).word
                if case .normal(_, true) = try L2Entry.decode(word, geometry: g, index: index + count) { break }
                count += 1
            }
            let run = writing.refcounts.allocateRun(upTo: count, epoch: writing.epoch, oldestInFlight: writing.oldestInFlight)
            let host = run.host
            count = run.count
            let old = (0..<count).map { slot.entry(index + $0, extended: g.extendedL2).word }
            let length = Int(UInt64(count) * cluster)
            let a = reserve(Allocation(request: id, l1Index: slot.l1Index, firstIndex: index, count: count, host: host,
                                       oldWords: old, buffer: nil, writeOffset: host,
                                       source: UnsafeRawBufferPointer(rebasing: source[0..<length])),
                            slot: slot, guestCluster: guestCluster, writing)
            writing.writes[id].progress.issue(UInt64(length))
            allocationReady(a, writing)
            return
        }

        // Part of one cluster: the rest comes from the cluster's old contents.
        let length = min(cluster - inCluster, remaining)
        let endBefore = writing.refcounts.endCluster
        let host = writing.refcounts.allocateOne(epoch: writing.epoch, oldestInFlight: writing.oldestInFlight)
        let fresh = host / cluster >= endBefore
        let readsZero: Bool
        switch mapping {
        case .zero, .zeroAllocated: readsZero = true
        case .unallocated: readsZero = backingSize.map { guestCluster * cluster >= $0 } ?? true
        case .normal, .compressed: readsZero = false
        }
        let old = [slot.entry(index, extended: g.extendedL2).word]
        let data = UnsafeRawBufferPointer(rebasing: source[0..<Int(length)])
        writing.writes[id].progress.issue(length)
        if fresh && readsZero {
            // A cluster past the old end of the file reads as zeros already: write only the new bytes.
            let a = reserve(Allocation(request: id, l1Index: slot.l1Index, firstIndex: index, count: 1, host: host,
                                       oldWords: old, buffer: nil, writeOffset: host + inCluster, source: data),
                            slot: slot, guestCluster: guestCluster, writing)
            allocationReady(a, writing)
            return
        }
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(cluster), alignment: 4096)
        (buffer.baseAddress! + Int(inCluster)).copyMemory(from: data.baseAddress!, byteCount: Int(length))
        let a = reserve(Allocation(request: id, l1Index: slot.l1Index, firstIndex: index, count: 1, host: host,
                                   oldWords: old, buffer: buffer, writeOffset: host, source: UnsafeRawBufferPointer(buffer)),
                        slot: slot, guestCluster: guestCluster, writing)
        let gaps = [0..<Int(inCluster), Int(inCluster + length)..<Int(cluster)].filter { !$0.isEmpty }
        do {
            try copyOnWrite(a, mapping: mapping, guestCluster: guestCluster, gaps: gaps, writing)
        } catch {
            abandon(a, writing)
            throw error
        }
        allocationReady(a, writing)
    }

    func inPlaceWriteCompleted(_ id: WriteID, errno: Int32?, _ writing: WritableState) {
        dataWriteReturned(writing)
        writeIOCompleted(id, errno.map { BlockError(errno: $0) }, writing)
    }

    // MARK: - Finishing

    func failWrite(_ id: WriteID, _ error: BlockError, _ writing: WritableState) {
        if writing.writes[id].progress.fail(error) { writeDrained(id, writing) }
    }

    /// One I/O the write issued (an in-place write, or an allocation it created) is back.
    func writeIOCompleted(_ id: WriteID, _ failure: BlockError?, _ writing: WritableState) {
        if writing.writes[id].progress.completed(failure) { writeDrained(id, writing) }
    }

    private func writeDrained(_ id: WriteID, _ writing: WritableState) {
        if writing.writes[id].progress.error == nil && writing.writes[id].fua {
            // FUA: the write is answered once a flush covering it is durable.
            writing.writes[id].progress.hold(.flush)
            requestFlush(.write(id), writing)
            return
        }
        completeWrite(id, error: writing.writes[id].progress.error, writing)
    }

    func completeWrite(_ id: WriteID, error: BlockError?, _ writing: WritableState) {
        let r = writing.writes.remove(id)
        precondition(r.progress.canBeAnswered, "write answered in \(r.progress.state)")
        writing.unpinGeneration(r.generation)
        outbox.append(.complete(r.tag, error.map { .failed($0) } ?? .done))
    }
}
