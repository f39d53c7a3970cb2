// The in-place write fast path: an overwrite of a cluster that is already ours, answered at once.
//
// Most writes to a long-lived image land in clusters it has written before. For those the general
// path (a WriteRequest in its slab, an IOToken, an action through the outbox, the completion dispatch)
// does nothing but look the cluster up and write it; callgrind put that bookkeeping at half of a 4 KiB
// overwrite's instructions (docs/ARCHITECTURE.md, "The in-place fast path"). So the shell first asks
// `beginInPlaceWrite`, a synchronous query: when the write is the simple case it answers the host
// offset and the generation it pinned, and the shell issues the file write itself and reports back
// with `finishInPlaceWrite`. Anything else answers nil and the shell takes the general path, unchanged.
//
// The simple case, every condition checked here (the general path handles each exception):
//   - the image is writable and has not failed, the write is not FUA (FUA waits for a flush) and not
//     extended L2 (subcluster bitmaps may need updating);
//   - the range lies inside one cluster;
//   - the L1 entry has COPIED (the L2 table is ours, not a snapshot's) and the table is cached, ready;
//   - the entry is a normal cluster with COPIED (refcount 1: no snapshot shares it), decoding cleanly;
//   - no allocation has reserved the guest cluster (no COW or link in flight on it);
//   - the host range lies inside the file and on no metadata cluster (else the general path reports the
//     corruption).
// What the general path does for an in-place write and this one does too: the bitmaps are marked at
// entry, the request pins the current generation until its write is back (H8: a TRIM that frees the
// cluster meanwhile cannot let it be reused or punched under the write), and the completion notes
// unsynced data so that the next flush syncs it (a flush covers exactly the writes completed before
// it). A failed write fails only its request; the image stays writable, as on the general path.

import BlockDevice

/// A write the engine let the shell issue directly (`QCow2Engine.beginInPlaceWrite`).
public struct InPlaceWrite: Sendable {
    /// Where the guest bytes go in the image file.
    public let host: UInt64
    /// The generation pinned while the write is in flight (H8).
    let generation: Generation
}

extension QCow2Engine {
    /// The host offset for an overwrite of `count` bytes at guest `offset`, when the write is the
    /// simple case above; nil sends it down the general path. A non-nil answer has marked the bitmaps
    /// and pinned a generation: the shell must call `finishInPlaceWrite` exactly once.
    @inline(__always)
    public func beginInPlaceWrite(offset: UInt64, count: Int, fua: Bool) -> InPlaceWrite? {
        guard !fua, count > 0, let writing = writableState, failure == nil else { return nil }
        let g = geometry
        let inCluster = g.offsetInCluster(offset)
        guard !g.extendedL2, inCluster + UInt64(count) <= g.clusterSize else { return nil }
        let l1Index = g.l1Index(offset)
        guard l1Index < l1.count, l1[l1Index] & L2Entry.copied != 0,
              let slot = cache[l1Index], case .ready = slot.state else { return nil }
        let word = slot.entry(g.l2Index(offset), extended: false).word
        // Normal, COPIED, no compressed or zero flag, no reserved bit, aligned: the word is its offset
        // plus COPIED. Anything else, corrupt entries included, is the general path's to handle.
        let host = word & L2Entry.offsetMask
        guard word == host | L2Entry.copied, host != 0, host & (g.clusterSize - 1) == 0 else { return nil }
        if !writing.reservations.isEmpty, writing.reservations[offset >> UInt64(g.clusterBits)] != nil { return nil }
        let target = host + inCluster
        guard target + UInt64(count) <= hostLimit, !isMetadata(cluster: host >> UInt64(g.clusterBits)) else { return nil }
        markBitmaps(offset: offset, length: UInt64(count))
        cache.touch(slot)
        writing.inPlaceWrites += 1
        writing.inPlaceInFlight += 1
        return InPlaceWrite(host: target, generation: writing.pinGeneration())
    }

    /// The file write of `write` came back (`errno` nil on success): what to answer the caller.
    public func finishInPlaceWrite(_ write: InPlaceWrite, errno: Int32?) -> BlockOutcome {
        let writing = writeSide("an in-place write completion")
        writing.inPlaceInFlight -= 1
        writing.unpinGeneration(write.generation)
        dataWriteReturned(writing)
        return errno.map { .failed(BlockError(errno: $0)) } ?? .done
    }

    /// Overwrites the fast path has taken since the image was opened (tests and profiles).
    public var fastPathWrites: Int { writableState?.inPlaceWrites ?? 0 }

    /// A data write reached the file (or failed: it may have reached it in part): the next flush
    /// must sync before it can say the data is durable.
    @inline(__always)
    func dataWriteReturned(_ writing: WritableState) {
        writing.unsyncedData = true
    }
}
