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
// commit).
//
// A failed write or sync stops the pipeline: the stages already durable are consistent because of the
// order, and no later stage runs (H10). What happens next depends on the failure:
//   - a write refused for lack of space (ENOSPC, EDQUOT) changed nothing on disk that the durable image
//     depends on, so everything the flush captured is made dirty again and the next flush retries it;
//     the flush fails with that errno and the image stays writable (allocations the failed flush would
//     have made durable are at worst leaks).
//   - any other write error, and every sync error (after a failed fdatasync the kernel may have dropped
//     the dirty pages, so what reached the disk is unknown), turns the image read-only for good, with a
//     reason naming the structure and the errno.

import BlockDevice

struct FlushState {
    enum Member {
        case client(RequestTag)
        case write(WriteID)
    }

    struct Step {
        enum Kind: String {
            case refcountBlocks = "refcount block"
            case newRefcountTable = "new refcount table"
            case refcountTableSwitch = "header's refcount table fields"
            case refcountTableEntries = "refcount table"
            case l2Tables = "L2 table"
            case l1Table = "L1 table"
        }

        var kind: Kind
        var writes: [(offset: UInt64, bytes: UnsafeMutableRawBufferPointer)]
        var sync: Bool
    }

    /// The first failure of the running stage.
    struct Failure {
        let errno: Int32
        /// "writing the L2 table at 0x50000", "syncing after the refcount block writes".
        let what: String
        let isSync: Bool

        /// Only a write refused for space leaves nothing uncertain behind.
        var isRecoverable: Bool { !isSync && (errno == ENOSPC_ || errno == EDQUOT_) }
    }

    /// What the running pipeline took from the dirty state, to give back if it fails recoverably.
    struct Captured {
        var refcounts = RefcountState.Capture()   // its byte buffers belong to the steps; only indices are used
        var l1Sectors: [Int] = []
        var frees: [(generation: UInt64, clusters: [UInt64])] = []
        var oldTableFree: (generation: UInt64, clusters: [UInt64])?
        var data = false
        /// The header's switch to a new refcount table is durable.
        var tableSwitched = false
    }

    var running = false
    var members: [Member] = []
    var queued: [Member] = []
    var steps: [Step] = []
    var step = 0
    var syncing = false
    var pending = 0
    var failure: Failure?
    var captured = Captured()
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
        flush.failure = nil
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
        flush.captured = .init(refcounts: refs, l1Sectors: sectors.sorted(), frees: flush.frees, data: data)

        var steps: [FlushState.Step] = []
        let later = !refs.tableSectors.isEmpty || refs.newTable != nil || !l2.isEmpty || !l1Writes.isEmpty
        steps.append(.init(kind: .refcountBlocks, writes: refs.blocks, sync: data || !refs.blocks.isEmpty || later))
        if let table = refs.newTable {
            steps.append(.init(kind: .newRefcountTable, writes: [(table.offset, table.bytes)], sync: true))
            let fields = UnsafeMutableRawBufferPointer.allocate(byteCount: 12, alignment: 8)
            fields.setBE64(table.offset, at: 0)
            fields.storeBytes(of: UInt32(table.clusters).bigEndian, toByteOffset: 8, as: UInt32.self)
            steps.append(.init(kind: .refcountTableSwitch, writes: [(Header.refcountTableFieldsOffset, fields)], sync: true))
            // The old table is unreferenced once the switch is durable, at the end of this flush.
            if let old = refs.oldTable {
                let first = old.offset / g.clusterSize
                generation += 1
                let free = (generation, (0..<UInt64(old.clusters)).map { first + $0 })
                flush.frees.append(free)
                flush.captured.oldTableFree = free
            }
        } else {
            steps.append(.init(kind: .refcountTableEntries, writes: refs.tableSectors, sync: !refs.tableSectors.isEmpty))
        }
        steps.append(.init(kind: .l2Tables, writes: l2, sync: !l2.isEmpty))
        steps.append(.init(kind: .l1Table, writes: l1Writes, sync: !l1Writes.isEmpty))
        return steps.filter { !$0.writes.isEmpty || $0.sync }
    }

    /// Issues the next stage's writes, or its sync once the writes are done.
    private func advanceFlush() {
        while true {
            if flush.step >= 0 && !flush.syncing && flush.steps[flush.step].sync {
                flush.syncing = true
                flush.pending = 1
                outbox.append(.syncFile(issue(.flushStep(buffer: nil, offset: nil))))
                return
            }
            if flush.step >= 0 && flush.steps[flush.step].kind == .refcountTableSwitch { flush.captured.tableSwitched = true }
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
                outbox.append(.writeFile(issue(.flushStep(buffer: w.bytes, offset: w.offset)), offset: w.offset,
                                         from: UnsafeRawBufferPointer(w.bytes), dsync: false))
            }
            return
        }
    }

    /// `offset`: the write that completed, nil for the stage's sync.
    func flushStepCompleted(offset: UInt64?, errno: Int32?) {
        if let errno {
            let kind = flush.steps[flush.step].kind
            let what = offset.map { "writing the \(kind.rawValue) at \(hex($0))" }
                ?? (kind == .refcountBlocks && flush.captured.refcounts.blockIndices.isEmpty
                    ? "syncing the data written before the flush" : "syncing after the \(kind.rawValue) writes")
            let failure = FlushState.Failure(errno: errno, what: what, isSync: offset == nil)
            // An unrecoverable failure wins over a recoverable one of the same stage.
            if flush.failure.map({ $0.isRecoverable && !failure.isRecoverable }) ?? true { flush.failure = failure }
        }
        flush.pending -= 1
        guard flush.pending == 0 else { return }
        guard let failure = flush.failure else { return advanceFlush() }
        // H10: later stages must not run; what is durable is consistent because of the order.
        for s in flush.steps { for w in s.writes { w.bytes.deallocate() } }
        flush.steps = []
        releaseTables(written: false)
        let reason = "\(failure.what) failed: \(errnoName(failure.errno))"
        if failure.isRecoverable {
            restoreCaptured()
            finishFlush(error: BlockError(errno: failure.errno, message: "qcow2 metadata: \(reason); a later flush retries"))
        } else {
            markFailed("qcow2 metadata: \(reason)")
            finishFlush(error: BlockError(errno: EIO_, message: "qcow2 metadata: \(reason); the image is now read-only"))
        }
    }

    /// Gives what the failed pipeline captured back to the dirty state, at the current epoch, so the
    /// next flush writes it again (L2 tables are handled by `releaseTables`). The frees it would have
    /// applied wait for that flush too (O4: their removals are not durable yet).
    private func restoreCaptured() {
        let c = flush.captured
        refcounts!.recapture(c.refcounts, tableSwitched: c.tableSwitched, epoch: epoch)
        for s in c.l1Sectors where l1Dirty[s * 64] == nil { l1Dirty[s * 64] = epoch }
        var frees = c.frees
        if c.tableSwitched, let old = c.oldTableFree { frees.append(old) }
        pendingFrees += frees.map { (epoch, $0.generation, $0.clusters) }
        if c.data { unsyncedData = true }
        flush.frees = []
        flush.captured = .init()
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
            // Punch only what no older I/O can still touch; the rest is simply reusable.
            let punchable = oldest.map { gen <= $0 } ?? true
            for c in clusters.sorted() {
                // An entry that pointed at metadata was unlinked: the metadata stays where it is.
                if isMetadata(cluster: c) {
                    markCorrupt("a data reference to metadata cluster \(hex(c * geometry.clusterSize)) was removed")
                    continue
                }
                guard refcounts!.release(cluster: c, epoch: epoch) else { continue }
                guard punchable else {
                    refcounts!.makeReusable(cluster: c, generation: gen)
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
