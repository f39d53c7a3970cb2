// The engine's side of an allocation: reserving the guest clusters, issuing the copy-on-write reads
// and the write that Allocation's state machine asks for, and linking the new clusters (or giving them
// back) when it ends.

import BlockDevice

extension QCow2Engine {
    func reserve(_ allocation: Allocation, slot: L2Slot, guestCluster: UInt64, _ writing: WritableState) -> AllocationID {
        let a = writing.allocations.insert(allocation)
        for k in 0..<UInt64(allocation.count) { writing.reservations[guestCluster + k] = a }
        slot.pins += 1
        return a
    }

    /// Fills `gaps` of the allocation's buffer with the guest view of the old cluster (H4, H5).
    /// `origin` is the offset in the cluster that the buffer's first byte stands for (non-zero when only
    /// some subclusters are assembled); `gaps` are in buffer coordinates.
    func copyOnWrite(_ a: AllocationID, mapping: ClusterMapping, guestCluster: UInt64, gaps: [Range<Int>],
                     origin: Int = 0, _ writing: WritableState) throws(QCow2Error) {
        guard let buffer = writing.allocations[a].buffer else { preconditionFailure("copy-on-write without an assembly buffer") }
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
                    writing.allocations[a].copyIssued()
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
                writing.allocations[a].copyIssued()
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
            writing.allocations[a].compressedReadIssued()
            writing.allocations[a].cowGaps = gaps
            writing.allocations[a].cowOrigin = origin
            outbox.append(.readFile(token, offset: host, into: source))
        }
    }

    /// An allocation whose old contents turned out to be unreadable (corrupt metadata): undone as if
    /// its write had failed, once any copy-on-write reads already issued are back, so that its request
    /// is answered and its reservation released instead of hanging everyone behind it.
    func abandon(_ a: AllocationID, _ writing: WritableState) {
        proceed(a, writing.allocations[a].abandon(), writing)
    }

    /// Every copy the allocation needs is issued (possibly none).
    func allocationReady(_ a: AllocationID, _ writing: WritableState) {
        proceed(a, writing.allocations[a].copiesIssued(), writing)
    }

    /// The completion of an allocation's action, by what the action was and where the allocation stands.
    func allocationCompleted(_ purpose: TokenPurpose, _ a: AllocationID, errno: Int32?, _ writing: WritableState) {
        let state = writing.allocations[a].state
        switch (purpose, state) {
        case (.cowRead, .copying):
            proceed(a, writing.allocations[a].copyCompleted(errno: errno), writing)
        case (.cowCompressed(_, let source, let scratch), .readingCompressed):
            let next = writing.allocations[a].compressedReadCompleted(errno: errno)
            guard next == .inflate else {
                source.deallocate()
                scratch.deallocate()
                return proceed(a, next, writing)
            }
            let token = issue(.cowDecompress(allocation: a, source: source, scratch: scratch))
            outbox.append(.decompress(token, compression, source: UnsafeRawBufferPointer(source), into: scratch))
        case (.cowDecompress(_, let source, let scratch), .inflating):
            source.deallocate()
            if errno == nil, let buffer = writing.allocations[a].buffer {
                let origin = writing.allocations[a].cowOrigin
                for gap in writing.allocations[a].cowGaps {
                    (buffer.baseAddress! + gap.lowerBound).copyMemory(from: scratch.baseAddress! + origin + gap.lowerBound,
                                                                      byteCount: gap.count)
                }
            }
            scratch.deallocate()
            proceed(a, writing.allocations[a].inflated(ok: errno == nil), writing)
        case (.allocationWrite, .writing):
            proceed(a, writing.allocations[a].written(errno: errno), writing)
        default:
            preconditionFailure("completion of \(purpose) for an allocation that is \(state)")
        }
    }

    /// Does what the allocation's machine asks for.
    private func proceed(_ a: AllocationID, _ next: Allocation.Next, _ writing: WritableState) {
        switch next {
        case .wait, .inflate:
            return
        case .write:
            let token = issue(.allocationWrite(allocation: a))
            outbox.append(.writeFile(token, offset: writing.allocations[a].writeOffset, from: writing.allocations[a].source,
                                     dsync: false))
        case .link:
            finishAllocation(a, errno: nil, writing)
        case .undo(let errno):
            finishAllocation(a, errno: errno, writing)
        }
    }

    /// The allocation's data is in the file: link it (or give the clusters back on error).
    private func finishAllocation(_ a: AllocationID, errno: Int32?, _ writing: WritableState) {
        let allocation = writing.allocations.remove(a)
        let g = geometry
        let guestCluster = UInt64(allocation.l1Index) << UInt64(g.l2Bits) + UInt64(allocation.firstIndex)
        for k in 0..<UInt64(allocation.count) { writing.reservations[guestCluster + k] = nil }
        allocation.buffer?.deallocate()
        let slot = cache[allocation.l1Index]
        slot?.pins -= 1
        let id = allocation.request
        if errno != nil {
            // Never linked: the new clusters go back to the allocator once nothing can be writing them
            // (a fill-in of subclusters wrote into a cluster that stays ours).
            if allocation.freesOld { queueFree(clusters: (0..<UInt64(allocation.count)).map { allocation.host / g.clusterSize + $0 }, writing) }
        } else if let slot {
            writing.unsyncedData = true
            for k in 0..<allocation.count {
                // O2: the data is in the file now; the flush makes it durable (sync #1) before this
                // entry is written (stage C).
                let word = L2Entry.normal(host: allocation.host + UInt64(k) * g.clusterSize)
                slot.setEntry(allocation.firstIndex + k, word: word, extended: g.extendedL2)
                if g.extendedL2 {
                    slot.setBitmap(allocation.firstIndex + k, allocation.bitmap ?? L2Entry.allAllocated)
                }
                if allocation.freesOld { queueFree(word: allocation.oldWords[k], writing) }
            }
            writing.markDirty(slot)
        }
        // Writers parked on these clusters look them up again first. The order does not matter for
        // the allocating write: this I/O is still pending on it, so nothing they do can answer it.
        for w in allocation.waiters { resumeWrite(w, writing) }
        writeIOCompleted(id, errno.map { BlockError(errno: $0) }, writing)
    }
}
