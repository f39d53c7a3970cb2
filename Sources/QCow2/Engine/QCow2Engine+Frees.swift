// Frees: a cluster whose last reference is removed is queued with the current epoch and the next
// generation; after the flush that makes the removal durable its count is decreased (O4), and it is
// punched, or handed to the allocator's quarantine until no older request is in flight (H8).

import BlockDevice

extension QCow2Engine {
    /// Queues the host clusters an entry referenced for a refcount decrease after the next flush (O4).
    func queueFree(word: UInt64, _ writing: WritableState) {
        guard let mapping = try? L2Entry.decode(word, geometry: geometry, index: 0) else { return }
        let c = geometry.clusterSize
        switch mapping {
        case .normal(let host, _), .zeroAllocated(let host, _):
            queueFree(clusters: [host / c], writing)
        case .compressed(let host, let n):
            // One reference per compressed cluster on every host cluster its bytes touch (H5).
            queueFree(clusters: Array((host / c)...((host + UInt64(n) - 1) / c)), writing)
        case .unallocated, .zero:
            break
        }
    }

    func queueFree(clusters: [UInt64], _ writing: WritableState) {
        guard !clusters.isEmpty else { return }
        writing.generation = writing.generation.next
        writing.pendingFrees.append((writing.epoch, writing.generation, clusters))
    }

    /// O4: the removals captured by this flush are durable; apply their refcount decreases.
    func retireFrees(_ writing: WritableState) {
        let oldest = writing.oldestInFlight
        var punchStart: UInt64?
        var punchCount: UInt64 = 0
        func punchPending() {
            guard let start = punchStart else { return }
            let token = issue(.punch(cluster: start, count: punchCount))
            outbox.append(.punchFile(token, offset: start * geometry.clusterSize, length: punchCount * geometry.clusterSize))
            punchStart = nil
        }
        for (gen, clusters) in writing.flush.frees {
            // Punch only what no older I/O can still touch; the rest is simply reusable.
            let punchable = oldest.map { gen <= $0 } ?? true
            for c in clusters.sorted() {
                // An entry that pointed at metadata was unlinked: the metadata stays where it is.
                if isMetadata(cluster: c) {
                    markCorrupt("a data reference to metadata cluster \(hex(c * geometry.clusterSize)) was removed")
                    continue
                }
                guard writing.refcounts.release(cluster: c, epoch: writing.epoch) else { continue }
                guard punchable else {
                    writing.refcounts.makeReusable(cluster: c, freedAt: gen)
                    continue
                }
                if let start = punchStart, start + punchCount == c {
                    punchCount += 1
                } else {
                    punchPending()
                    punchStart = c
                    punchCount = 1
                }
            }
        }
        punchPending()
        writing.flush.frees = []
    }

    func punchCompleted(cluster: UInt64, count: UInt64, _ writing: WritableState) {
        for k in 0..<count { writing.refcounts.makeReusable(cluster: cluster + k, freedAt: nil) }
    }
}
