// Block status: base:allocation flags and allocation depth per extent, reading the in-memory L2
// tables (so answers include writes not yet flushed) and asking the backing image about unallocated
// runs.

import BlockDevice

extension QCow2Engine {
    /// Extents for a prefix of the range: stops at the end of one L2 table's coverage or where the
    /// answer would need the backing image after something else, so one query does bounded work.
    public func blockStatus(tag: RequestTag, offset: UInt64, length: UInt64) {
        let id = statuses.insert(StatusRequest(tag: tag, offset: offset, length: length))
        continueStatus(id)
    }

    func continueStatus(_ id: StatusID) {
        let g = geometry
        statuses[id].state = .resolving
        let start = statuses[id].offset + statuses[id].covered
        let l1Index = g.l1Index(start)
        let tableEnd = min((UInt64(l1Index) + 1) * g.l2Coverage, statuses[id].offset + statuses[id].length)
        switch resolveL2(l1Index, waiter: .status(id)) {
        case .parked:
            statuses[id].state = .waitingForL2(l1Index: l1Index)
            return
        case .none:
            statusUnallocated(id, length: tableEnd - start)
        case .table(let slot):
            do {
                var position = start
                while position < tableEnd {
                    let index = g.l2Index(position)
                    let (word, bitmap) = slot.entry(index, extended: g.extendedL2)
                    let mapping = try L2Entry.decode(word, geometry: g, index: index)
                    let inCluster = g.offsetInCluster(position)
                    var runEnd = min(position - inCluster + g.clusterSize, tableEnd)
                    var flags: ExtentFlags = []
                    var depth: UInt32 = 1
                    var unallocated = false
                    if g.extendedL2, mapping != .unallocated || bitmap != 0 {
                        if case .compressed = mapping {} else {
                            let sub = Int(inCluster / g.subclusterSize)
                            let state = try L2Entry.subclusterState(mapping: mapping, bitmap: bitmap, sub: sub, index: index)
                            runEnd = min(position - inCluster + (UInt64(sub) + 1) * g.subclusterSize, tableEnd)
                            switch state {
                            case .unallocated: unallocated = true
                            case .zero: flags = mapping == .unallocated ? [.hole, .zero] : [.zero]
                            case .data, .compressed: break
                            }
                        }
                    } else {
                        switch mapping {
                        case .unallocated: unallocated = true
                        case .zero: flags = [.hole, .zero]
                        case .zeroAllocated: flags = [.zero]
                        case .normal, .compressed: break
                        }
                    }
                    if unallocated {
                        if backingSize != nil {
                            // Ask the backing image, but only as the first thing this reply says.
                            if statuses[id].covered == 0 {
                                var end = runEnd
                                while end < tableEnd {
                                    let e = slot.entry(g.l2Index(end), extended: g.extendedL2)
                                    guard e.word == 0 && e.bitmap == 0 else { break }
                                    end = min(end + g.clusterSize, tableEnd)
                                }
                                statusUnallocated(id, length: end - position)
                                return
                            }
                            break
                        }
                        flags = [.hole, .zero]
                        depth = 0
                    }
                    statuses[id].append(length: runEnd - position, flags: flags, depth: depth)
                    position = runEnd
                }
            } catch {
                markCorrupt(error.description)
                let r = statuses.remove(id)
                outbox.append(.complete(r.tag, .failed(BlockError(errno: EIO_, message: error.description))))
                return
            }
            finishStatus(id)
        }
    }

    /// An unallocated run at the cursor: zeros without a backing image, the backing image's answer
    /// (one level deeper) with one.
    private func statusUnallocated(_ id: StatusID, length: UInt64) {
        let start = statuses[id].offset + statuses[id].covered
        if let backingSize, start < backingSize {
            let n = min(length, backingSize - start)
            statuses[id].state = .waitingForBacking
            let token = issue(.backingStatus(request: id, length: n))
            outbox.append(.backingStatus(token, offset: start, length: n))
            return
        }
        statuses[id].append(length: length, flags: [.hole, .zero], depth: 0)
        finishStatus(id)
    }

    private func finishStatus(_ id: StatusID) {
        let r = statuses.remove(id)
        outbox.append(.complete(r.tag, .extents(r.extents)))
    }

    func backingStatusCompleted(_ id: StatusID, length: UInt64, result: IOResult) {
        switch result {
        case .extents(let extents):
            var covered: UInt64 = 0
            for e in extents where covered < length {
                let n = min(e.length, length - covered)
                // One level deeper; "nowhere" stays 0.
                statuses[id].append(length: n, flags: e.flags, depth: e.depth == 0 ? 0 : e.depth + 1)
                covered += n
            }
            if covered == 0 { statuses[id].append(length: length, flags: [], depth: 2) }
            finishStatus(id)
        case .failure(let errno):
            let r = statuses.remove(id)
            outbox.append(.complete(r.tag, .failed(BlockError(errno: errno))))
        case .success:
            preconditionFailure("backing status completed without extents")
        }
    }
}
