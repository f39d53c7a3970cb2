// What only a writable image has: the allocator and refcounts, the dirty metadata waiting for a flush,
// the reservations of clusters under allocation, the deferred frees, the in-flight generations and the
// flush pipeline, with the write requests and allocations themselves.
//
// The engine holds one of these exactly when the image was opened for writing. Write and flush entry
// points take it once (`guard let writing = writableState`) and hand it down, so nothing on the write
// side asks again whether the image is writable; the read side only consults it where a writable image
// needs more care (pinning generations, the metadata clusters a data reference must not reach).
//
// Epochs and generations. A flush captures epoch E and moves new changes to E+1 (Q6). Every request
// that touches host clusters pins the current generation while it runs, and every free takes the next
// one; a freed cluster is reused or punched only once no request older than its free is running (H8).

final class WritableState {
    // Loop-confined like the engine: `@exclusivity(unchecked)` for the same measured reason.
    @exclusivity(unchecked) var refcounts: RefcountState
    /// The epoch new metadata changes belong to; a flush captures everything before it.
    @exclusivity(unchecked) var epoch = Epoch.first
    /// L1 entries changed and not yet captured, by index, with their epoch.
    @exclusivity(unchecked) var l1Dirty: [Int: Epoch] = [:]
    @exclusivity(unchecked) var writes = Slab<WriteID, WriteRequest>()
    @exclusivity(unchecked) var allocations = Slab<AllocationID, Allocation>()
    /// Guest clusters under allocation → allocation id.
    @exclusivity(unchecked) var reservations: [UInt64: AllocationID] = [:]
    /// Data reached the file since the last sync began.
    @exclusivity(unchecked) var unsyncedData = false
    /// Overwrites the in-place fast path took (QCow2Engine+InPlace), and those still in flight.
    @exclusivity(unchecked) var inPlaceWrites = 0
    @exclusivity(unchecked) var inPlaceInFlight = 0
    /// Deferred refcount decreases: clusters whose last reference was removed at an epoch (O4).
    @exclusivity(unchecked) var pendingFrees: [(epoch: Epoch, generation: Generation, clusters: [UInt64])] = []
    @exclusivity(unchecked) var generation = Generation.initial
    @exclusivity(unchecked) var inFlight = InFlightGenerations()
    @exclusivity(unchecked) var flush = FlushState()
    /// Host clusters holding the L2 tables the L1 table points to, so that a data write or a free that
    /// would land on one is caught (see `QCow2Engine.isMetadata`).
    @exclusivity(unchecked) var l2TableClusters = ClusterBitmap()
    /// Host clusters of the snapshot table and the snapshots' L1 tables (never written by qnbd).
    @exclusivity(unchecked) var snapshotClusters = ClusterBitmap()
    /// A cluster of zeros, the source of zero writes.
    let zeroCluster: UnsafeMutableRawBufferPointer

    init(refcounts: RefcountState, clusterSize: Int) {
        self.refcounts = refcounts
        zeroCluster = .allocate(byteCount: clusterSize, alignment: 4096)
        zeroCluster.initializeMemory(as: UInt8.self, repeating: 0)
    }

    deinit {
        zeroCluster.deallocate()
        refcounts.deallocate()
    }

    // MARK: - Generations (H8)

    func pinGeneration() -> Generation {
        inFlight.pin(generation)
        return generation
    }

    func unpinGeneration(_ g: Generation) {
        inFlight.unpin(g)
    }

    var oldestInFlight: Generation? { inFlight.oldest }

    // MARK: - Dirty state

    func markDirty(_ slot: L2Slot) {
        if slot.dirtyEpoch == nil { slot.dirtyEpoch = epoch }
    }

    /// Whether a writable image's own bookkeeping says host cluster `c` holds metadata: an L2 table, a
    /// refcount block or table, or snapshot metadata.
    func holdsMetadata(cluster c: UInt64) -> Bool {
        if l2TableClusters.contains(c) { return true }
        if snapshotClusters.contains(c) { return true }
        return refcounts.holdsMetadata(cluster: c)
    }
}
