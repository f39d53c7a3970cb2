// The flush pipeline: makes every change made before it durable, in the order the crash rules need.
//
// A flush captures epoch E = current and moves new changes to E+1, copying everything dirty at or
// before E (Q6: changes after the capture go to the live copies and the next flush). Then, skipping
// empty stages (FlushStage, in FlushPipeline.swift, gives each one's ordering rule):
//   A  write dirty refcount blocks; sync       — O1, O2
//   B  write changed refcount table entries; sync — O3; or a grown table, synced, then the header
//      switched to it, synced (H3)
//   C  write dirty L2 tables; sync             — O3
//   D  write changed L1 sectors; sync
// FlushPipeline runs that sequence; this file captures the stages and acts on the pipeline's answers,
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

/// A flush's bookkeeping around its pipeline: who waits for it (group commit) and what it took from the
/// dirty state.
struct FlushState {
    enum Member {
        case client(RequestTag)
        case write(WriteID)
    }

    /// What the running pipeline took from the dirty state, to give back if it fails recoverably.
    struct Captured {
        var refcounts = RefcountState.Capture()   // its byte buffers belong to the stages; only indices are used
        var l1Sectors: [Int] = []
        var frees: [(generation: Generation, clusters: [UInt64])] = []
        var oldTableFree: (generation: Generation, clusters: [UInt64])?
        var data = false
    }

    var pipeline = FlushPipeline()
    /// Members of the running pipeline, completed when it finishes.
    var members: [Member] = []
    /// Members that arrived while it runs: the next pipeline's.
    var queued: [Member] = []
    var captured = Captured()
    var frees: [(generation: Generation, clusters: [UInt64])] = []
    /// Tables whose snapshots this pipeline writes (kept in the cache until then).
    var tables: [L2Slot] = []
}

extension QCow2Engine {
    public func flush(tag: RequestTag) {
        guard let writing = writableState else {
            outbox.append(.complete(tag, .done))
            return
        }
        requestFlush(.client(tag), writing)
    }

    func requestFlush(_ member: FlushState.Member, _ writing: WritableState) {
        writing.flush.queued.append(member)
        startFlushIfIdle(writing)
    }

    private func startFlushIfIdle(_ writing: WritableState) {
        guard !writing.flush.pipeline.isRunning, !writing.flush.queued.isEmpty else { return }
        writing.flush.members = writing.flush.queued
        writing.flush.queued = []
        if let failure {
            finishFlush(error: BlockError(errno: EIO_, message: "image is read-only after an error: \(failure)"), writing)
            return
        }
        let captured = writing.epoch
        writing.epoch = captured.next
        let stages = capture(upTo: captured, writing)
        perform(writing.flush.pipeline.start(stages), writing)
    }

    /// Copies everything dirty at or before `e` into the pipeline's stages.
    private func capture(upTo e: Epoch, _ writing: WritableState) -> [FlushPipeline.Plan] {
        let g = geometry
        let refs = writing.refcounts.capture(upTo: e)
        var l2: [(UInt64, UnsafeMutableRawBufferPointer)] = []
        for (_, slot) in cache.slots {
            guard let d = slot.dirtyEpoch, d <= e else { continue }
            let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(g.clusterSize), alignment: 4096)
            copy.copyMemory(from: UnsafeRawBufferPointer(slot.table))
            l2.append((slot.hostOffset, copy))
            slot.dirtyEpoch = nil
            slot.writebacks += 1
            writing.flush.tables.append(slot)
        }
        var sectors: Set<Int> = []
        for (i, d) in writing.l1Dirty where d <= e {
            sectors.insert(i / 64)
            writing.l1Dirty[i] = nil
        }
        var l1Writes: [(UInt64, UnsafeMutableRawBufferPointer)] = []
        for s in sectors.sorted() {
            let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 512)
            copy.initializeMemory(as: UInt8.self, repeating: 0)
            for k in 0..<64 where s * 64 + k < l1.count { copy.setBE64(l1[s * 64 + k], at: k * 8) }
            l1Writes.append((header.l1TableOffset + UInt64(s) * 512, copy))
        }
        writing.flush.frees = writing.pendingFrees.filter { $0.epoch <= e }.map { ($0.generation, $0.clusters) }
        writing.pendingFrees.removeAll { $0.epoch <= e }
        let data = writing.unsyncedData
        writing.unsyncedData = false
        writing.flush.captured = .init(refcounts: refs, l1Sectors: sectors.sorted(), frees: writing.flush.frees, data: data)

        var steps: [FlushPipeline.Plan] = []
        let later = !refs.tableSectors.isEmpty || refs.newTable != nil || !l2.isEmpty || !l1Writes.isEmpty
        steps.append(.init(stage: .refcountBlocks, writes: refs.blocks, sync: data || !refs.blocks.isEmpty || later))
        if let table = refs.newTable {
            steps.append(.init(stage: .newRefcountTable, writes: [(table.offset, table.bytes)], sync: true))
            let fields = UnsafeMutableRawBufferPointer.allocate(byteCount: 12, alignment: 8)
            fields.setBE64(table.offset, at: 0)
            fields.storeBytes(of: UInt32(table.clusters).bigEndian, toByteOffset: 8, as: UInt32.self)
            steps.append(.init(stage: .refcountTableSwitch, writes: [(Header.refcountTableFieldsOffset, fields)], sync: true))
            // The old table is unreferenced once the switch is durable, at the end of this flush.
            if let old = refs.oldTable {
                let first = old.offset / g.clusterSize
                writing.generation = writing.generation.next
                let free = (writing.generation, (0..<UInt64(old.clusters)).map { first + $0 })
                writing.flush.frees.append(free)
                writing.flush.captured.oldTableFree = free
            }
        } else {
            steps.append(.init(stage: .refcountTableEntries, writes: refs.tableSectors, sync: !refs.tableSectors.isEmpty))
        }
        steps.append(.init(stage: .l2Tables, writes: l2, sync: !l2.isEmpty))
        steps.append(.init(stage: .l1Table, writes: l1Writes, sync: !l1Writes.isEmpty))
        return steps.filter { !$0.writes.isEmpty || $0.sync }
    }

    /// Carries out what the pipeline asks for next.
    private func perform(_ next: FlushPipeline.Next, _ writing: WritableState) {
        switch next {
        case .wait:
            return
        case .write(_, let writes):
            for w in writes {
                outbox.append(.writeFile(issue(.flushStep(buffer: w.bytes, offset: w.offset)), offset: w.offset,
                                         from: UnsafeRawBufferPointer(w.bytes), dsync: false))
            }
        case .sync:
            outbox.append(.syncFile(issue(.flushStep(buffer: nil, offset: nil))))
        case .done:
            releaseTables(written: true, writing)
            retireFrees(writing)
            finishFlush(error: nil, writing)
        case .failed(let failure):
            releaseTables(written: false, writing)
            let reason = "\(failure.what) failed: \(errnoName(failure.errno))"
            if failure.isRecoverable {
                restoreCaptured(writing)
                finishFlush(error: BlockError(errno: failure.errno, message: "qcow2 metadata: \(reason); a later flush retries"),
                            writing)
            } else {
                markFailed("qcow2 metadata: \(reason)")
                finishFlush(error: BlockError(errno: EIO_, message: "qcow2 metadata: \(reason); the image is now read-only"),
                            writing)
            }
        }
    }

    /// `offset`: the write that completed, nil for the stage's sync.
    func flushStepCompleted(offset: UInt64?, errno: Int32?, _ writing: WritableState) {
        perform(writing.flush.pipeline.completed(writeAt: offset, errno: errno), writing)
    }

    /// Gives what the failed pipeline captured back to the dirty state, at the current epoch, so the
    /// next flush writes it again (L2 tables are handled by `releaseTables`). The frees it would have
    /// applied wait for that flush too (O4: their removals are not durable yet).
    private func restoreCaptured(_ writing: WritableState) {
        let c = writing.flush.captured
        let switched = writing.flush.pipeline.refcountTableSwitched
        writing.refcounts.recapture(c.refcounts, tableSwitched: switched, epoch: writing.epoch)
        for s in c.l1Sectors where writing.l1Dirty[s * 64] == nil { writing.l1Dirty[s * 64] = writing.epoch }
        var frees = c.frees
        if switched, let old = c.oldTableFree { frees.append(old) }
        writing.pendingFrees += frees.map { (writing.epoch, $0.generation, $0.clusters) }
        if c.data { writing.unsyncedData = true }
        writing.flush.frees = []
        writing.flush.captured = .init()
    }

    /// The pipeline's table snapshots are written (or failed: then the tables stay dirty, so the cache
    /// keeps the only current copy rather than reload an older one from the file).
    private func releaseTables(written: Bool, _ writing: WritableState) {
        for slot in writing.flush.tables {
            slot.writebacks -= 1
            if !written && slot.dirtyEpoch == nil { slot.dirtyEpoch = writing.epoch }
        }
        writing.flush.tables = []
    }

    private func finishFlush(error: BlockError?, _ writing: WritableState) {
        let members = writing.flush.members
        writing.flush.members = []
        for m in members {
            switch m {
            case .client(let tag): outbox.append(.complete(tag, error.map { .failed($0) } ?? .done))
            case .write(let id): completeWrite(id, error: error, writing)
            }
        }
        startFlushIfIdle(writing)
    }

    /// Whether anything is waiting to be made durable.
    public var isDirty: Bool {
        guard let writing = writableState else { return false }
        return writing.unsyncedData || !writing.l1Dirty.isEmpty || !writing.pendingFrees.isEmpty
            || cache.slots.values.contains { $0.dirtyEpoch != nil } || writing.refcounts.isDirty(upTo: .latest)
    }
}
