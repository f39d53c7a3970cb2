// The flush pipeline: makes every change made before it durable, in the order the crash rules need.
//
// A flush captures epoch E = current and moves new changes to E+1, copying everything dirty at or
// before E (Q6: changes after the capture go to the live copies and the next flush). Then, skipping
// empty stages:
//   A  write dirty refcount blocks; sync       — O1 (counts before references) and O2 (data and COW
//                                               before the L2 entries that point at them)
//   B  write changed refcount table entries; sync — O3 (a block before its table entry); a grown
//      table is written and synced before the header is switched to it, and the switch is synced
//   C  write dirty L2 tables; sync             — O3 (a new table before its L1 entry)
//   D  write changed L1 sectors; sync
// and finally applies the refcount decreases of clusters unlinked at or before E (O4: a removal is
// durable before the decrease, and freed clusters are reused or punched only then).
// Flushes that arrive while one runs wait for the next pipeline, which captures them all (group
// commit). A failed write stops the pipeline and turns the image read-only (H10).

import BlockDevice

struct FlushState {
    enum Member {
        case client(RequestTag)
        case write(Int)
    }

    struct Step {
        var writes: [(offset: UInt64, bytes: UnsafeMutableRawBufferPointer)]
        var sync: Bool
    }

    var running = false
    var members: [Member] = []
    var queued: [Member] = []
    var steps: [Step] = []
    var step = 0
    var syncing = false
    var pending = 0
    var error: Int32?
    var frees: [(generation: UInt64, clusters: [UInt64])] = []
    /// Tables whose snapshots this pipeline writes (kept in the cache until then).
    var tables: [L2Slot] = []
}

extension QCow2Engine {
    public func flush(tag: RequestTag) {
        guard writable else {
            outbox.append(.complete(tag, .done))
            return
        }
        requestFlush(.client(tag))
    }

    func requestFlush(_ member: FlushState.Member) {
        flush.queued.append(member)
        startFlushIfIdle()
    }

    private func startFlushIfIdle() {
        guard !flush.running, !flush.queued.isEmpty else { return }
        flush.members = flush.queued
        flush.queued = []
        if let failure {
            finishFlush(error: BlockError(errno: EIO_, message: "image is read-only after an error: \(failure)"))
            return
        }
        flush.running = true
        let captured = epoch
        epoch += 1
        flush.steps = capture(upTo: captured)
        flush.step = -1
        flush.error = nil
        advanceFlush()
    }

    /// Copies everything dirty at or before `e` into the pipeline's stages.
    private func capture(upTo e: UInt64) -> [FlushState.Step] {
        let g = geometry
        let refs = refcounts!.capture(upTo: e)
        var l2: [(UInt64, UnsafeMutableRawBufferPointer)] = []
        for (_, slot) in cache.slots {
            guard let d = slot.dirtyEpoch, d <= e else { continue }
            let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(g.clusterSize), alignment: 4096)
            copy.copyMemory(from: UnsafeRawBufferPointer(slot.table))
            l2.append((slot.hostOffset, copy))
            slot.dirtyEpoch = nil
            slot.writebacks += 1
            flush.tables.append(slot)
        }
        var sectors: Set<Int> = []
        for (i, d) in l1Dirty where d <= e {
            sectors.insert(i / 64)
            l1Dirty[i] = nil
        }
        var l1Writes: [(UInt64, UnsafeMutableRawBufferPointer)] = []
        for s in sectors.sorted() {
            let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 512)
            copy.initializeMemory(as: UInt8.self, repeating: 0)
            for k in 0..<64 where s * 64 + k < l1.count { copy.setBE64(l1[s * 64 + k], at: k * 8) }
            l1Writes.append((header.l1TableOffset + UInt64(s) * 512, copy))
        }
        flush.frees = pendingFrees.filter { $0.epoch <= e }.map { ($0.generation, $0.clusters) }
        pendingFrees.removeAll { $0.epoch <= e }
        let data = unsyncedData
        unsyncedData = false

        var steps: [FlushState.Step] = []
        let later = !refs.tableSectors.isEmpty || refs.newTable != nil || !l2.isEmpty || !l1Writes.isEmpty
        steps.append(.init(writes: refs.blocks, sync: data || !refs.blocks.isEmpty || later))
        if let table = refs.newTable {
            steps.append(.init(writes: [(table.offset, table.bytes)], sync: true))
            let fields = UnsafeMutableRawBufferPointer.allocate(byteCount: 12, alignment: 8)
            fields.setBE64(table.offset, at: 0)
            fields.storeBytes(of: UInt32(table.clusters).bigEndian, toByteOffset: 8, as: UInt32.self)
            steps.append(.init(writes: [(Header.refcountTableFieldsOffset, fields)], sync: true))
            // The old table is unreferenced once the switch is durable, at the end of this flush.
            if let old = refs.oldTable {
                let first = old.offset / g.clusterSize
                generation += 1
                flush.frees.append((generation, (0..<UInt64(old.clusters)).map { first + $0 }))
            }
        } else {
            steps.append(.init(writes: refs.tableSectors, sync: !refs.tableSectors.isEmpty))
        }
        steps.append(.init(writes: l2, sync: !l2.isEmpty))
        steps.append(.init(writes: l1Writes, sync: !l1Writes.isEmpty))
        return steps.filter { !$0.writes.isEmpty || $0.sync }
    }

    /// Issues the next stage's writes, or its sync once the writes are done.
    private func advanceFlush() {
        while true {
            if flush.step >= 0 && !flush.syncing && flush.steps[flush.step].sync {
                flush.syncing = true
                flush.pending = 1
                outbox.append(.syncFile(issue(.flushStep(buffer: nil))))
                return
            }
            flush.syncing = false
            flush.step += 1
            guard flush.step < flush.steps.count else {
                releaseTables(written: true)
                retireFrees()
                finishFlush(error: nil)
                return
            }
            let writes = flush.steps[flush.step].writes
            flush.steps[flush.step].writes = []
            if writes.isEmpty { continue }
            flush.pending = writes.count
            for w in writes {
                outbox.append(.writeFile(issue(.flushStep(buffer: w.bytes)), offset: w.offset,
                                         from: UnsafeRawBufferPointer(w.bytes), dsync: false))
            }
            return
        }
    }

    func flushStepCompleted(errno: Int32?) {
        if let errno, flush.error == nil { flush.error = errno }
        flush.pending -= 1
        guard flush.pending == 0 else { return }
        if let errno = flush.error {
            // H10: later stages must not run; what is durable is consistent because of the order.
            for s in flush.steps { for w in s.writes { w.bytes.deallocate() } }
            flush.steps = []
            releaseTables(written: false)
            markFailed("a metadata write or sync failed (errno \(errno))")
            finishFlush(error: BlockError(errno: EIO_, message: "qcow2 metadata write failed; the image is now read-only"))
            return
        }
        advanceFlush()
    }

    /// The pipeline's table snapshots are written (or failed: then the tables stay dirty, so the cache
    /// keeps the only current copy rather than reload an older one from the file).
    private func releaseTables(written: Bool) {
        for slot in flush.tables {
            slot.writebacks -= 1
            if !written && slot.dirtyEpoch == nil { slot.dirtyEpoch = epoch }
        }
        flush.tables = []
    }

    /// O4: the removals captured by this flush are durable; apply their refcount decreases.
    private func retireFrees() {
        let oldest = oldestInFlight
        var punchStart: UInt64?
        var punchCount: UInt64 = 0
        func punchPending() {
            guard let start = punchStart else { return }
            let token = issue(.punch(cluster: start, count: punchCount))
            outbox.append(.punchFile(token, offset: start * geometry.clusterSize, length: punchCount * geometry.clusterSize))
            punchStart = nil
        }
        for (gen, clusters) in flush.frees {
            for c in clusters.sorted() {
                // An entry that pointed at metadata was unlinked: the metadata stays where it is.
                if isMetadata(cluster: c) {
                    markCorrupt("a data reference to metadata cluster \(hex(c * geometry.clusterSize)) was removed")
                    continue
                }
                guard refcounts!.release(cluster: c, epoch: epoch, generation: gen) else { continue }
                // Punch only what no older I/O can still touch; the rest is simply reusable.
                guard oldest.map({ gen <= $0 }) ?? true, refcounts!.withhold(cluster: c) else { continue }
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
        flush.frees = []
    }

    func punchCompleted(cluster: UInt64, count: UInt64) {
        for k in 0..<count { refcounts!.makeReusable(cluster: cluster + k, generation: 0) }
    }

    private func finishFlush(error: BlockError?) {
        let members = flush.members
        flush.members = []
        flush.running = false
        for m in members {
            switch m {
            case .client(let tag): outbox.append(.complete(tag, error.map { .failed($0) } ?? .done))
            case .write(let id): completeWrite(id, error: error)
            }
        }
        startFlushIfIdle()
    }

    /// Whether anything is waiting to be made durable.
    public var isDirty: Bool {
        unsyncedData || !l1Dirty.isEmpty || !pendingFrees.isEmpty || cache.slots.values.contains { $0.dirtyEpoch != nil }
            || (refcounts?.isDirty(upTo: UInt64.max) ?? false)
    }
}
