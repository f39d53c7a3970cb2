// Reads walk their range cluster by cluster. A cluster whose L2 table is not in memory parks the
// request on that table's slot (see L2Cache); the request resumes exactly where it stopped once the
// table is in. Runs of clusters that are contiguous on the host become one file read; zero and
// unallocated runs are filled in memory and reported as zero ranges so the protocol can send holes;
// unallocated runs of a backed image read from the backing image; compressed clusters are read and
// then inflated on the thread pool.

import BlockDevice

extension QCow2Engine {
    public func read(tag: RequestTag, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) {
        var request = ReadRequest(tag: tag, offset: offset, buffer: buffer)
        if let writableState { request.generation = writableState.pinGeneration() }
        let id = reads.insert(request)
        continueRead(id)
    }

    func resumeRead(_ id: ReadID) {
        reads[id].progress.resume()
        continueRead(id)
    }

    /// Walks the read from its cursor; after a wait, `resumeRead` goes on from there.
    private func continueRead(_ id: ReadID) {
        while reads[id].progress.hasRemaining {
            let guest = reads[id].offset + reads[id].position
            let l1Index = geometry.l1Index(guest)
            let tableEnd = (UInt64(l1Index) + 1) * geometry.l2Coverage
            let remaining = reads[id].progress.remaining
            switch resolveL2(l1Index, waiter: .read(id)) {
            case .parked:
                reads[id].progress.park(.l2(l1Index: l1Index))
                return
            case .none:
                readUnallocated(id, length: min(remaining, tableEnd - guest))
            case .table(let slot):
                do {
                    try readMapped(id, slot: slot, limit: min(remaining, tableEnd - guest))
                } catch {
                    markCorrupt(error.description)
                    failRead(id, BlockError(errno: EIO_, message: error.description))
                    return
                }
            }
        }
        if reads[id].progress.reachedEnd() { answerRead(id) }
    }

    /// Fills or fetches `length` unallocated bytes at the cursor.
    private func readUnallocated(_ id: ReadID, length: UInt64) {
        let guest = reads[id].offset + reads[id].position
        var fromBacking: UInt64 = 0
        if let backingSize, guest < backingSize {
            fromBacking = min(length, backingSize - guest)
            let start = Int(reads[id].position)
            let token = issue(.readData(request: id))
            outbox.append(.readBacking(token, offset: guest,
                                       into: UnsafeMutableRawBufferPointer(rebasing: reads[id].buffer[start..<start + Int(fromBacking)])))
            reads[id].progress.issue(fromBacking)
        }
        if length > fromBacking {
            fillZero(id, length: length - fromBacking)
        }
    }

    private func fillZero(_ id: ReadID, length: UInt64) {
        let start = reads[id].position
        let slice = UnsafeMutableRawBufferPointer(rebasing: reads[id].buffer[Int(start)..<Int(start + length)])
        slice.initializeMemory(as: UInt8.self, repeating: 0)
        reads[id].noteZero(start..<start + length)
        reads[id].progress.skip(length)
    }

    /// Handles the run of clusters at the cursor that one L2 table maps, up to `limit` bytes.
    private func readMapped(_ id: ReadID, slot: L2Slot, limit: UInt64) throws(QCow2Error) {
        let g = geometry
        let guest = reads[id].offset + reads[id].position
        let index = g.l2Index(guest)
        let (word, bitmap) = slot.entry(index, extended: g.extendedL2)
        let mapping = try L2Entry.decode(word, geometry: g, index: index)
        let inCluster = g.offsetInCluster(guest)
        let clusterLeft = min(g.clusterSize - inCluster, limit)

        if g.extendedL2, case .compressed = mapping {} else if g.extendedL2 {
            // Subclusters: take the run of equal state within this cluster.
            let sub = Int(inCluster / g.subclusterSize)
            let state = try L2Entry.subclusterState(mapping: mapping, bitmap: bitmap, sub: sub, index: index)
            var end = (UInt64(sub) + 1) * g.subclusterSize
            var next = sub + 1
            while end < inCluster + clusterLeft && next < g.subclusters,
                  try L2Entry.subclusterState(mapping: mapping, bitmap: bitmap, sub: next, index: index) == state {
                end += g.subclusterSize
                next += 1
            }
            let length = min(end, inCluster + clusterLeft) - inCluster
            switch state {
            case .unallocated: readUnallocated(id, length: length)
            case .zero: fillZero(id, length: length)
            case .data:
                guard case .normal(let host, _) = mapping else { preconditionFailure("data subcluster without host") }
                try readHost(id, host: host + inCluster, length: length)
            case .compressed: preconditionFailure("compressed handled below")
            }
            return
        }

        switch mapping {
        case .unallocated, .zero, .zeroAllocated:
            // Extend over following clusters of the same kind: one fill or one backing read.
            let unallocated = mapping == .unallocated
            var length = clusterLeft
            var next = index + 1
            while length < limit && next < g.l2Entries {
                let m = try L2Entry.decode(slot.entry(next, extended: false).word, geometry: g, index: next)
                let same: Bool
                switch m {
                case .unallocated: same = unallocated
                case .zero, .zeroAllocated: same = !unallocated
                default: same = false
                }
                guard same else { break }
                length += min(g.clusterSize, limit - length)
                next += 1
            }
            if unallocated { readUnallocated(id, length: length) } else { fillZero(id, length: length) }
        case .normal(let host, _):
            // Extend over clusters that follow on the host too: one file read.
            var length = clusterLeft
            var next = index + 1
            var expected = host + g.clusterSize
            while length < limit && next < g.l2Entries {
                guard case .normal(let h, _) = try L2Entry.decode(slot.entry(next, extended: false).word, geometry: g, index: next),
                      h == expected else { break }
                length += min(g.clusterSize, limit - length)
                expected += g.clusterSize
                next += 1
            }
            try readHost(id, host: host + inCluster, length: length)
        case .compressed(let host, let byteCount):
            try readCompressed(id, host: host, byteCount: byteCount, inCluster: inCluster, length: clusterLeft)
        }
    }

    private func readHost(_ id: ReadID, host: UInt64, length: UInt64) throws(QCow2Error) {
        guard host >= geometry.clusterSize, host + length <= hostLimit else {
            throw QCow2Error("L2 table", "data cluster at \(hex(host)) lies outside the image file")
        }
        let start = Int(reads[id].position)
        let token = issue(.readData(request: id))
        outbox.append(.readFile(token, offset: host,
                                into: UnsafeMutableRawBufferPointer(rebasing: reads[id].buffer[start..<start + Int(length)])))
        reads[id].progress.issue(length)
    }

    /// The highest host offset metadata may point to: the file's end (rounded up to a cluster), or the
    /// allocator's end once this engine has grown the file.
    var hostLimit: UInt64 {
        let fileEnd = (fileSize + geometry.clusterSize - 1) / geometry.clusterSize * geometry.clusterSize
        guard let writableState else { return fileEnd }
        return max(fileEnd, writableState.refcounts.endCluster * geometry.clusterSize)
    }

    private func readCompressed(_ id: ReadID, host: UInt64, byteCount: Int, inCluster: UInt64, length: UInt64) throws(QCow2Error) {
        let cluster = Int(geometry.clusterSize)
        guard byteCount <= 2 * cluster + 512, host < hostLimit else {
            throw QCow2Error("L2 table", "compressed cluster at \(hex(host)) (\(byteCount) bytes) is invalid")
        }
        // The descriptor may claim bytes past the end of the file (its last sector); read what exists.
        let available = Int(min(UInt64(byteCount), hostLimit - host))
        let source = UnsafeMutableRawBufferPointer.allocate(byteCount: available, alignment: 16)
        let start = Int(reads[id].position)
        let whole = inCluster == 0 && length == geometry.clusterSize
        // A whole-cluster read inflates straight into the caller's buffer; a partial one needs scratch.
        let destination = whole
            ? UnsafeMutableRawBufferPointer(rebasing: reads[id].buffer[start..<start + cluster])
            : UnsafeMutableRawBufferPointer.allocate(byteCount: cluster, alignment: 16)
        let token = issue(.readCompressed(request: id, source: source, destination: destination,
                                          copyFrom: whole ? -1 : Int(inCluster), copyTo: start, count: Int(length)))
        outbox.append(.readFile(token, offset: host, into: source))
        reads[id].progress.issue(length)
    }

    func failRead(_ id: ReadID, _ error: BlockError) {
        if reads[id].progress.fail(error) { answerRead(id) }
    }

    private func readIOCompleted(_ id: ReadID, _ failure: BlockError?) {
        if reads[id].progress.completed(failure) { answerRead(id) }
    }

    private func answerRead(_ id: ReadID) {
        let r = reads.remove(id)
        precondition(r.progress.canBeAnswered, "read answered in \(r.progress.state)")
        if let g = r.generation { writableState?.unpinGeneration(g) }
        if let error = r.progress.error {
            outbox.append(.complete(r.tag, .failed(error)))
        } else {
            outbox.append(.complete(r.tag, .read(zeroRanges: r.zeroRanges)))
        }
    }

    func readDataCompleted(_ id: ReadID, errno: Int32?) {
        readIOCompleted(id, errno.map { BlockError(errno: $0) })
    }

    func compressedReadCompleted(_ id: ReadID, source: UnsafeMutableRawBufferPointer, destination: UnsafeMutableRawBufferPointer,
                                 copyFrom: Int, copyTo: Int, count: Int, errno: Int32?) {
        if let errno {
            source.deallocate()
            if copyFrom >= 0 { destination.deallocate() }
            readIOCompleted(id, BlockError(errno: errno))
            return
        }
        let token = issue(.decompress(request: id, source: source, destination: destination,
                                      copyFrom: copyFrom, copyTo: copyTo, count: count))
        outbox.append(.decompress(token, compression, source: UnsafeRawBufferPointer(source), into: destination))
    }

    func decompressCompleted(_ id: ReadID, source: UnsafeMutableRawBufferPointer, destination: UnsafeMutableRawBufferPointer,
                             copyFrom: Int, copyTo: Int, count: Int, errno: Int32?) {
        source.deallocate()
        var failure: BlockError?
        if errno != nil {
            failure = BlockError(errno: EIO_, message: "qcow2 compressed cluster: cannot decompress")
        } else if copyFrom >= 0 {
            (reads[id].buffer.baseAddress! + copyTo).copyMemory(from: destination.baseAddress! + copyFrom, byteCount: count)
        }
        if copyFrom >= 0 { destination.deallocate() }
        readIOCompleted(id, failure)
    }
}
