// Refcounts, held entirely in memory for a writable image, with the allocator on top.
//
// Why in memory: refcount metadata is tiny next to the data it describes (one 64 KiB block of 16-bit
// counts covers 2 GiB of host file), so loading it all when the image is opened costs little and makes
// every allocation and every free a synchronous step of a request's state machine instead of another
// place to wait. Opening refuses images whose refcount metadata would not fit the budget.
//
// Allocation appends at the end of the file unless a cluster freed earlier can be reused. A freed
// cluster is reusable only when (O4) the removal of its last reference is durable — frees are queued
// per epoch and applied by `retire` after the flush that wrote the removal — and no I/O issued before
// the removal can still be touching it (the generation check in the engine).
//
// New refcount blocks are placed at the first free cluster at or after the end of the file; when that
// cluster lies inside the range the block describes, the block counts itself, otherwise its own count
// is kept by the block of its range, created the same way. Growing the refcount table builds the new
// table in memory; the flush pipeline writes it and then switches the header to it (O3).

struct RefcountState {
    let geometry: Geometry
    /// Reftable entries: refblock host offsets (0 = none).
    private(set) var table: [UInt64]
    /// Refcount blocks by reftable index.
    private(set) var blocks: [Int: UnsafeMutableRawBufferPointer] = [:]
    /// Epoch at which each block was last changed and not yet captured by a flush.
    private(set) var dirtyBlocks: [Int: Epoch] = [:]
    /// Reftable entries changed since the last capture (by index), when the table did not move.
    private(set) var dirtyTableEntries: [Int: Epoch] = [:]
    /// Where the table lives on disk now, and where it will live once a flush switches the header.
    private(set) var tableOffset: UInt64
    private(set) var tableClusters: Int
    /// A grown table not yet written and switched to, with the epoch of the growth.
    private(set) var movedTable: (offset: UInt64, clusters: Int, epoch: Epoch)?
    /// First cluster index at or past the end of everything allocated.
    private(set) var endCluster: UInt64
    /// Clusters of the refcount table (the current one and a grown one not yet switched to) and of the
    /// refcount blocks.
    private(set) var metadataClusters = ClusterBitmap()
    /// Clusters whose count reached zero and that may be handed out again (subject to the generation check).
    private(set) var free = FreeClusters()

    init(geometry: Geometry, table: [UInt64], tableOffset: UInt64, tableClusters: Int, endCluster: UInt64) {
        self.geometry = geometry
        self.table = table
        self.tableOffset = tableOffset
        self.tableClusters = tableClusters
        self.endCluster = endCluster
        let first = tableOffset / geometry.clusterSize
        for k in 0..<UInt64(tableClusters) { metadataClusters.insert(first + k) }
        for offset in table where offset != 0 { metadataClusters.insert(offset / geometry.clusterSize) }
    }

    func holdsMetadata(cluster c: UInt64) -> Bool { metadataClusters.contains(c) }

    /// Installs a refcount block read from the file at open.
    mutating func install(index: Int, bytes: UnsafeRawBufferPointer) {
        let block = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(geometry.clusterSize), alignment: 4096)
        block.copyMemory(from: bytes)
        blocks[index] = block
    }

    /// Clusters already free in the image when it was opened (refcount 0 below the end) become
    /// reusable at once: nothing of ours can be touching them.
    mutating func collectFreeClusters() {
        let perBlock = geometry.refblockCoverage
        var c: UInt64 = 0
        while c < endCluster {
            let t = Int(c / perBlock)
            guard let block = blocks[t] else {
                // No block: every cluster of its range is free (but a range without a block is only
                // ever past the metadata we know, so leave it to end-of-file allocation).
                c = UInt64(t + 1) * perBlock
                continue
            }
            let raw = UnsafeRawBufferPointer(block)
            let last = min(endCluster, UInt64(t + 1) * perBlock)
            while c < last {
                if RefcountEntry.get(raw, index: Int(c % perBlock), order: geometry.refcountOrder) == 0 {
                    free.insert(c, freedAt: nil)
                }
                c += 1
            }
        }
    }

    func deallocate() {
        for (_, b) in blocks { b.deallocate() }
    }

    var blockBytes: Int { blocks.count * Int(geometry.clusterSize) }

    // MARK: - Counts

    func refcount(ofCluster c: UInt64) -> UInt64 {
        let (t, i) = geometry.refcountPosition(ofCluster: c)
        guard let block = blocks[t] else { return 0 }
        return RefcountEntry.get(UnsafeRawBufferPointer(block), index: i, order: geometry.refcountOrder)
    }

    /// Sets a count whose refcount block exists (or creates the block). `epoch` marks it dirty.
    mutating func setRefcount(ofCluster c: UInt64, to value: UInt64, epoch: Epoch) {
        let (t, i) = geometry.refcountPosition(ofCluster: c)
        if blocks[t] == nil { createBlock(index: t, epoch: epoch) }
        RefcountEntry.set(blocks[t]!, index: i, order: geometry.refcountOrder, value: value)
        dirtyBlocks[t] = epoch
    }

    // MARK: - Allocation

    /// Allocates `count` contiguous clusters at the end of the file with refcount 1.
    mutating func allocateAtEnd(count: Int, epoch: Epoch) -> UInt64 {
        // Blocks created for these clusters land after them, so reserve first, then count.
        let first = endCluster
        endCluster += UInt64(count)
        for k in 0..<UInt64(count) { setRefcount(ofCluster: first + k, to: 1, epoch: epoch) }
        return first * geometry.clusterSize
    }

    /// One cluster: a reusable one whose last I/O is done if `oldestInFlight` allows, else at the end.
    mutating func allocateOne(epoch: Epoch, oldestInFlight: Generation?) -> UInt64 {
        allocateRun(upTo: 1, epoch: epoch, oldestInFlight: oldestInFlight).host
    }

    /// Up to `maximum` contiguous clusters: the lowest run of reusable clusters (first fit keeps the
    /// file compact, as qemu does), else a run at the end of the file.
    mutating func allocateRun(upTo maximum: Int, epoch: Epoch, oldestInFlight: Generation?) -> (host: UInt64, count: Int) {
        free.release(oldestInFlight: oldestInFlight)
        if let run = free.takeLowestRun(upTo: maximum) {
            for c in 0..<UInt64(run.count) { setRefcount(ofCluster: run.first + c, to: 1, epoch: epoch) }
            return (run.first * geometry.clusterSize, run.count)
        }
        return (allocateAtEnd(count: maximum, epoch: epoch), maximum)
    }

    /// Creates an empty refcount block for reftable index `t`, growing the table if needed.
    private mutating func createBlock(index t: Int, epoch: Epoch) {
        if t >= table.count {
            grow(toCover: t, epoch: epoch)
            // Counting the new table's own clusters may already have created this very block.
            if blocks[t] != nil { return }
        }
        let block = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(geometry.clusterSize), alignment: 4096)
        block.initializeMemory(as: UInt8.self, repeating: 0)
        blocks[t] = block
        let home = endCluster
        endCluster += 1
        metadataClusters.insert(home)
        table[t] = home * geometry.clusterSize
        noteTableChange(t, epoch: epoch)
        dirtyBlocks[t] = epoch
        // The block's own count: in itself when it lies in its range, else in its range's block.
        setRefcount(ofCluster: home, to: 1, epoch: epoch)
    }

    private mutating func noteTableChange(_ t: Int, epoch: Epoch) {
        if movedTable == nil { dirtyTableEntries[t] = epoch }
    }

    /// Builds a larger refcount table in memory (H3); the flush writes it and switches the header.
    private mutating func grow(toCover t: Int, epoch: Epoch) {
        let entriesPerCluster = Int(geometry.clusterSize / 8)
        let oldClusters = movedTable?.clusters ?? tableClusters
        if let unwritten = movedTable {
            // A table grown since the last flush was never written or referenced: give it back now.
            let first = unwritten.offset / geometry.clusterSize
            for k in 0..<UInt64(unwritten.clusters) {
                setRefcount(ofCluster: first + k, to: 0, epoch: epoch)
                free.insert(first + k, freedAt: nil)
                metadataClusters.remove(first + k)
            }
        }
        var clusters = max(oldClusters * 3 / 2, (t + 1 + entriesPerCluster - 1) / entriesPerCluster)
        // Leave room for the blocks that will count the table itself.
        clusters += 1
        let first = endCluster
        endCluster += UInt64(clusters)
        table += [UInt64](repeating: 0, count: clusters * entriesPerCluster - table.count)
        movedTable = (first * geometry.clusterSize, clusters, epoch)
        for k in 0..<UInt64(clusters) { metadataClusters.insert(first + k) }
        dirtyTableEntries.removeAll()
        for k in 0..<UInt64(clusters) { setRefcount(ofCluster: first + k, to: 1, epoch: epoch) }
    }

    // MARK: - Frees

    /// Applies a deferred decrease (after the removal is durable). Returns true when the count hit 0;
    /// the caller then either punches the cluster or makes it reusable.
    mutating func release(cluster c: UInt64, epoch: Epoch) -> Bool {
        let count = refcount(ofCluster: c)
        guard count > 0 else { return false }   // already free: a repeated free is not ours to fix
        setRefcount(ofCluster: c, to: count - 1, epoch: epoch)
        return count == 1
    }

    /// Offers a cluster whose count is zero to the allocator; it is handed out once no request older
    /// than `freedAt` is in flight (nil: at once, see `FreeClusters.insert`).
    mutating func makeReusable(cluster c: UInt64, freedAt generation: Generation?) {
        if refcount(ofCluster: c) == 0 { free.insert(c, freedAt: generation) }
    }

    // MARK: - Flush capture

    struct Capture {
        var blocks: [(offset: UInt64, bytes: UnsafeMutableRawBufferPointer)] = []
        /// Reftable sectors to write in place: (offset, 512-byte copy).
        var tableSectors: [(offset: UInt64, bytes: UnsafeMutableRawBufferPointer)] = []
        /// A whole new table to write, then switch the header to.
        var newTable: (offset: UInt64, clusters: Int, bytes: UnsafeMutableRawBufferPointer)?
        var oldTable: (offset: UInt64, clusters: Int)?
        /// What was captured, by index, so that a flush that fails harmlessly can put it back.
        var blockIndices: [Int] = []
        var tableSectorIndices: [Int] = []
    }

    /// Copies everything dirty at or before `epoch` and marks it clean (Q6: later changes go to the
    /// live copies and belong to the next flush).
    mutating func capture(upTo epoch: Epoch) -> Capture {
        var c = Capture()
        let size = Int(geometry.clusterSize)
        for (t, e) in dirtyBlocks where e <= epoch {
            let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
            copy.copyMemory(from: UnsafeRawBufferPointer(blocks[t]!))
            c.blocks.append((table[t], copy))
            c.blockIndices.append(t)
            dirtyBlocks[t] = nil
        }
        if let moved = movedTable, moved.epoch <= epoch {
            let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: moved.clusters * size, alignment: 4096)
            bytes.initializeMemory(as: UInt8.self, repeating: 0)
            for (i, v) in table.enumerated() where i * 8 < bytes.count { bytes.setBE64(v, at: i * 8) }
            c.newTable = (moved.offset, moved.clusters, bytes)
            c.oldTable = (tableOffset, tableClusters)
            // The old table is freed once the switch is durable (end of this flush).
            for k in 0..<UInt64(tableClusters) { metadataClusters.remove(tableOffset / geometry.clusterSize + k) }
            tableOffset = moved.offset
            tableClusters = moved.clusters
            movedTable = nil
            dirtyTableEntries.removeAll()
        } else if movedTable == nil {
            var sectors: Set<Int> = []
            for (t, e) in dirtyTableEntries where e <= epoch {
                sectors.insert(t / 64)
                dirtyTableEntries[t] = nil
            }
            for s in sectors.sorted() {
                let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: 512, alignment: 512)
                copy.initializeMemory(as: UInt8.self, repeating: 0)
                for k in 0..<64 where s * 64 + k < table.count { copy.setBE64(table[s * 64 + k], at: k * 8) }
                c.tableSectors.append((tableOffset + UInt64(s) * 512, copy))
                c.tableSectorIndices.append(s)
            }
        }
        return c
    }

    /// The flush that took `c` stopped on a write that may succeed later (the disk was full): what it
    /// captured is dirty again, at `epoch`, so the next flush writes it. `tableSwitched`: the header's
    /// switch to a captured new table is durable, so that table is the live one whatever failed after.
    mutating func recapture(_ c: Capture, tableSwitched: Bool, epoch: Epoch) {
        for t in c.blockIndices where dirtyBlocks[t] == nil { dirtyBlocks[t] = epoch }
        if let new = c.newTable, let old = c.oldTable, !tableSwitched {
            if movedTable == nil {
                movedTable = (new.offset, new.clusters, epoch)
            } else {
                // The table grew again meanwhile: the captured one was never referenced, and nothing
                // is writing it any more (the pipeline waits for a stage's writes before stopping).
                let first = new.offset / geometry.clusterSize
                for k in 0..<UInt64(new.clusters) {
                    setRefcount(ofCluster: first + k, to: 0, epoch: epoch)
                    free.insert(first + k, freedAt: nil)
                }
            }
            tableOffset = old.offset
            tableClusters = old.clusters
            dirtyTableEntries.removeAll()
        } else if movedTable == nil {
            // One entry marks its whole sector for rewriting.
            for s in c.tableSectorIndices { dirtyTableEntries[s * 64] = epoch }
        }
    }

    /// Whether anything is dirty at or before `epoch`.
    func isDirty(upTo epoch: Epoch) -> Bool {
        dirtyBlocks.values.contains { $0 <= epoch } || dirtyTableEntries.values.contains { $0 <= epoch }
            || (movedTable.map { $0.epoch <= epoch } ?? false)
    }
}
