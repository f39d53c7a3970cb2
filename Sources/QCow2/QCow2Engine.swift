// The qcow2 engine: image metadata and request state machines, with no I/O of its own.
//
// Calls (`read`, `write`, `writeZeroes`, `trim`, `flush`, `blockStatus`) and completions
// (`completed`) are events; each may append actions to the outbox, which the I/O shell drains
// (`takeActions`) and executes, feeding every completion back with its token. Everything runs on the
// shell's loop thread; nothing here blocks, sleeps or locks.
//
// The parts live in extensions by request kind: reads (+Read), block status (+Status), writes and
// allocation (+Write), the flush pipeline (+Flush). This file holds the shared state, L2 resolution
// and the completion dispatch.
//
// A writable image has a WritableState besides (allocator, refcounts, dirty metadata, flush pipeline);
// a read-only one has none, and nothing of the write side exists for it.
//
// In-flight I/O and frees. Every request that touches host clusters takes a generation when it starts;
// every free records the generation after it. A freed cluster is handed out again (or punched) only
// when no request older than its free is still running, so a read or write issued before a TRIM can
// never land in a cluster that was freed and reused meanwhile (hard case H8; qemu has this race).

import BlockDevice

public final class QCow2Engine {
    // Stored state is `@exclusivity(unchecked)`: the engine is confined to one thread and its
    // accesses never overlap, and the dynamic checks cost more instructions than a cache-hit
    // overwrite's own work (callgrind: ~15% of the server's instructions on 4 KiB random writes).
    public let header: Header
    public let geometry: Geometry
    /// Whether reads of unallocated clusters go to a backing image, and how big it is.
    public let backingSize: UInt64?
    /// The write side; nil for a read-only image.
    let writableState: WritableState?
    public var writable: Bool { writableState != nil }
    let fileSize: UInt64
    @exclusivity(unchecked) var l1: [UInt64]
    @exclusivity(unchecked) var cache: L2Cache
    @exclusivity(unchecked) var reads = Slab<ReadID, ReadRequest>()
    @exclusivity(unchecked) var statuses = Slab<StatusID, StatusRequest>()
    @exclusivity(unchecked) var tokens = Slab<IOToken, TokenPurpose>()
    @exclusivity(unchecked) var outbox: [IOAction] = []
    /// Actions before this index have been handed to the shell.
    @exclusivity(unchecked) var outboxHead = 0
    let compression: CompressionAlgorithm
    /// Set after a metadata write or sync failed for a reason other than space: the image is read-only
    /// from then on (H10).
    @exclusivity(unchecked) public private(set) var failure: String?

    /// Why an action was issued.
    enum TokenPurpose {
        case loadL2(l1Index: Int)
        case readData(request: ReadID)
        case readCompressed(request: ReadID, source: UnsafeMutableRawBufferPointer, destination: UnsafeMutableRawBufferPointer,
                            copyFrom: Int, copyTo: Int, count: Int)
        case decompress(request: ReadID, source: UnsafeMutableRawBufferPointer, destination: UnsafeMutableRawBufferPointer,
                        copyFrom: Int, copyTo: Int, count: Int)
        case backingStatus(request: StatusID, length: UInt64)
        case writeInPlace(request: WriteID)
        case allocationWrite(allocation: AllocationID)
        case cowRead(allocation: AllocationID)
        case cowCompressed(allocation: AllocationID, source: UnsafeMutableRawBufferPointer, scratch: UnsafeMutableRawBufferPointer)
        case cowDecompress(allocation: AllocationID, source: UnsafeMutableRawBufferPointer, scratch: UnsafeMutableRawBufferPointer)
        case flushStep(buffer: UnsafeMutableRawBufferPointer?, offset: UInt64?)
        case punch(cluster: UInt64, count: UInt64)
        case headerUpdate(buffer: UnsafeMutableRawBufferPointer)
    }

    /// - Parameters:
    ///   - l1: the L1 table as read from the file.
    ///   - backingSize: the backing image's size, or nil when there is none.
    ///   - cacheBytes: budget for clean L2 tables in memory.
    ///   - refcounts: the loaded refcount state for a writable image, nil for read-only.
    init(header: Header, l1: [UInt64], fileSize: UInt64, backingSize: UInt64?, cacheBytes: Int,
         refcounts: RefcountState?) throws(QCow2Error) {
        self.header = header
        self.geometry = Geometry(header: header)
        self.l1 = l1
        self.fileSize = fileSize
        self.backingSize = backingSize
        self.compression = header.compressionType == 1 ? .zstd : .deflate
        self.cache = L2Cache(tableSize: Int(geometry.clusterSize), budgetBytes: cacheBytes)
        let clusterSize = Int(geometry.clusterSize)
        let writing = refcounts.map { WritableState(refcounts: $0, clusterSize: clusterSize) }
        self.writableState = writing
        for (i, raw) in l1.enumerated() {
            let (offset, _) = try L1Entry.decode(raw, geometry: geometry, index: i)
            if offset != 0 && (offset < geometry.clusterSize || offset >= fileSize) {
                throw QCow2Error("L1 entry \(i)", "L2 table offset \(hex(offset)) outside the image file")
            }
            if offset != 0, let writing { writing.l2TableClusters.insert(offset / geometry.clusterSize) }
        }
        outbox.reserveCapacity(64)
    }

    /// A read-only engine.
    public convenience init(header: Header, l1: [UInt64], fileSize: UInt64, backingSize: UInt64?,
                            cacheBytes: Int) throws(QCow2Error) {
        try self.init(header: header, l1: l1, fileSize: fileSize, backingSize: backingSize, cacheBytes: cacheBytes,
                      refcounts: nil)
    }

    /// A writable engine over refcounts loaded at open: `table` is the refcount table, `blocks` the
    /// refcount blocks by table index.
    public convenience init(header: Header, l1: [UInt64], fileSize: UInt64, backingSize: UInt64?, cacheBytes: Int,
                            refcountTable table: [UInt64], refcountBlocks blocks: [Int: [UInt8]],
                            snapshots: SnapshotMetadata = SnapshotMetadata()) throws(QCow2Error) {
        let g = Geometry(header: header)
        var end = (fileSize + g.clusterSize - 1) / g.clusterSize
        end = max(end, (header.refcountTableOffset / g.clusterSize) + UInt64(header.refcountTableClusters))
        var state = RefcountState(geometry: g, table: table, tableOffset: header.refcountTableOffset,
                                  tableClusters: Int(header.refcountTableClusters), endCluster: end)
        for (index, bytes) in blocks {
            bytes.withUnsafeBytes { state.install(index: index, bytes: $0) }
        }
        do {
            try Self.checkMetadataLayout(header: header, l1: l1, refcounts: state, snapshots: snapshots)
        } catch {
            state.deallocate()
            throw error
        }
        state.collectFreeClusters()
        try self.init(header: header, l1: l1, fileSize: fileSize, backingSize: backingSize, cacheBytes: cacheBytes,
                      refcounts: state)
        for e in snapshots.extents {
            writableState?.snapshotClusters.formUnion(geometry.clusters(covering: e.offset, byteCount: e.byteCount))
        }
    }

    /// Before anything is written: the header, the L1 and refcount tables, the refcount blocks and the
    /// L2 tables must each own their clusters, and each must be counted. A hostile image that points one
    /// structure into another, or calls a table's cluster free, would otherwise have its metadata
    /// overwritten by the allocator or by a write through the other structure.
    static func checkMetadataLayout(header: Header, l1: [UInt64], refcounts: RefcountState,
                                    snapshots: SnapshotMetadata) throws(QCow2Error) {
        let g = Geometry(header: header)
        let c = g.clusterSize
        var owners: [UInt64: String] = [0: "the header"]
        func claim(_ clusters: Range<UInt64>, _ owner: String, _ structure: String) throws(QCow2Error) {
            for k in clusters {
                if let other = owners[k] {
                    throw QCow2Error(structure, "cluster \(hex(k * c)) of \(owner) is also \(other)")
                }
                owners[k] = owner
                if refcounts.refcount(ofCluster: k) == 0 {
                    throw QCow2Error(structure, "cluster \(hex(k * c)) of \(owner) has refcount 0")
                }
            }
        }
        if refcounts.refcount(ofCluster: 0) == 0 { throw QCow2Error("header", "the header cluster has refcount 0") }
        try claim(g.clusters(covering: header.l1TableOffset, byteCount: UInt64(header.l1Size) * 8), "the L1 table", "L1 table")
        try claim(g.clusters(covering: header.refcountTableOffset, byteCount: UInt64(header.refcountTableClusters) * c),
                  "the refcount table", "refcount table")
        for (i, offset) in refcounts.table.enumerated() where offset != 0 {
            try claim(g.clusters(covering: offset, byteCount: 1), "refcount block \(i)", "refcount table entry \(i)")
        }
        for (i, raw) in l1.enumerated() where raw & L1Entry.offsetMask != 0 {
            try claim(g.clusters(covering: raw & L1Entry.offsetMask, byteCount: 1), "the L2 table of L1 entry \(i)", "L1 entry \(i)")
        }
        // Snapshot L2 tables and data are shared with the active image and counted by it; the tables
        // that belong to snapshots alone are the snapshot table and their L1 tables.
        for e in snapshots.extents {
            try claim(g.clusters(covering: e.offset, byteCount: e.byteCount), e.owner, e.owner)
        }
    }

    /// Default L2 cache budget: enough to map the whole disk, capped at 64 MiB (512 GiB of disk with
    /// 64 KiB clusters). Beyond that, random reads over a huge disk cost an extra metadata read each
    /// time a table has been evicted, which is the qemu trade-off too.
    public static func defaultCacheBytes(header: Header) -> Int {
        let g = Geometry(header: header)
        let tables = (header.size + g.l2Coverage - 1) / g.l2Coverage
        return Int(min(tables * g.clusterSize, 64 << 20))
    }

    /// The next pending action, oldest first; nil when there is none. Actions appended while the
    /// shell executes one (inline completions) come out of later calls. Draining one by one, with the
    /// outbox's storage kept, costs no allocation per request, where handing out the array did.
    public func nextAction() -> IOAction? {
        guard outboxHead < outbox.count else {
            if outboxHead > 0 {
                outbox.removeAll(keepingCapacity: true)
                outboxHead = 0
            }
            return nil
        }
        defer { outboxHead += 1 }
        return outbox[outboxHead]
    }

    /// Hands all pending actions to the shell at once (tests that choose the completion order).
    public func takeActions() -> [IOAction] {
        defer {
            outbox.removeAll(keepingCapacity: true)
            outboxHead = 0
        }
        return Array(outbox[outboxHead...])
    }

    public var hasActions: Bool { outboxHead < outbox.count }

    /// Requests still in flight.
    public var activeRequests: Int { reads.count + statuses.count + (writableState?.writes.count ?? 0) }

    func issue(_ purpose: TokenPurpose) -> IOToken {
        tokens.insert(purpose)
    }

    // MARK: - L2 resolution

    enum Resolution {
        /// No L2 table: every cluster it would map is unallocated.
        case none
        case table(L2Slot)
        /// The request was parked on a loading slot.
        case parked
    }

    func resolveL2(_ l1Index: Int, waiter: Waiter) -> Resolution {
        guard l1Index < l1.count else { return .none }
        let offset = l1[l1Index] & L1Entry.offsetMask
        if offset == 0 { return .none }
        if let slot = cache[l1Index] {
            switch slot.state {
            case .ready:
                cache.touch(slot)
                return .table(slot)
            case .loading:
                slot.waiters.append(waiter)
                return .parked
            }
        }
        // Q1: the first lookup of an absent table starts its one load; later ones queue behind it.
        let slot = cache.startLoading(l1Index: l1Index, hostOffset: offset)
        slot.waiters.append(waiter)
        let token = issue(.loadL2(l1Index: l1Index))
        outbox.append(.readFile(token, offset: offset, into: slot.table))
        return .parked
    }

    func wake(_ waiters: [Waiter]) {
        for w in waiters {
            switch w {
            case .read(let id): continueRead(id)
            case .status(let id): continueStatus(id)
            case .write(let id): continueWrite(id, writeSide("a parked write"))
            }
        }
    }

    /// The writable state, for an event that only the write side can have caused (a parked write, a
    /// write-side completion): getting one on a read-only engine is a bug in the engine, not in the image.
    @inline(__always)
    func writeSide(_ event: StaticString) -> WritableState {
        guard let writableState else { preconditionFailure("\(event) on a read-only engine") }
        return writableState
    }

    // MARK: - Completions

    public func completed(_ token: IOToken, result: IOResult) {
        let purpose = tokens.remove(token)
        var errno: Int32? = nil
        if case .failure(let e) = result { errno = e }
        switch purpose {
        case .loadL2(let l1Index):
            guard let slot = cache[l1Index] else { preconditionFailure("L2 load for a missing slot") }
            let waiters = slot.waiters
            slot.waiters.removeAll()
            if let errno {
                cache.remove(l1Index)
                let error = BlockError(errno: errno, message: "reading the L2 table at \(hex(slot.hostOffset))")
                for w in waiters { failWaiter(w, error) }
                return
            }
            slot.state = .ready
            // Pinned while its waiters run: one of them moving on to another table must not evict it
            // before the next waiter has looked at it (that would load the same table twice).
            slot.pins += 1
            wake(waiters)
            slot.pins -= 1
        case .readData(let id):
            readDataCompleted(id, errno: errno)
        case .readCompressed(let id, let source, let destination, let copyFrom, let copyTo, let count):
            compressedReadCompleted(id, source: source, destination: destination, copyFrom: copyFrom, copyTo: copyTo,
                                    count: count, errno: errno)
        case .decompress(let id, let source, let destination, let copyFrom, let copyTo, let count):
            decompressCompleted(id, source: source, destination: destination, copyFrom: copyFrom, copyTo: copyTo,
                                count: count, errno: errno)
        case .backingStatus(let id, let length):
            backingStatusCompleted(id, length: length, result: result)
        case .writeInPlace(let id):
            inPlaceWriteCompleted(id, errno: errno, writeSide("an in-place write completion"))
        case .allocationWrite(let a), .cowRead(let a), .cowCompressed(let a, _, _), .cowDecompress(let a, _, _):
            allocationCompleted(purpose, a, errno: errno, writeSide("an allocation's completion"))
        case .flushStep(let buffer, let offset):
            buffer?.deallocate()
            flushStepCompleted(offset: offset, errno: errno, writeSide("a flush completion"))
        case .punch(let cluster, let count):
            punchCompleted(cluster: cluster, count: count, writeSide("a punch completion"))
        case .headerUpdate(let buffer):
            buffer.deallocate()
        }
    }

    func failWaiter(_ w: Waiter, _ error: BlockError) {
        switch w {
        case .read(let id): failRead(id, error)
        case .status(let id):
            let r = statuses.remove(id)
            outbox.append(.complete(r.tag, .failed(error)))
        case .write(let id): failWrite(id, error, writeSide("a parked write"))
        }
    }

    /// Whether host cluster `c` holds metadata right now: the header, the L1 or refcount table, a
    /// refcount block or an L2 table. Data never goes there; when an L2 entry says it does, the
    /// tables point into each other.
    func isMetadata(cluster c: UInt64) -> Bool {
        if c == 0 { return true }
        if let writableState, writableState.holdsMetadata(cluster: c) { return true }
        return geometry.clusters(covering: header.l1TableOffset, byteCount: UInt64(header.l1Size) * 8).contains(c)
    }

    /// Refuses data I/O to `count` bytes at `host` (an L2 entry's target) when they run past the image
    /// file or reach a metadata cluster: either way the entry is corrupt.
    func checkDataTarget(_ host: UInt64, count: UInt64, entry index: Int) throws(QCow2Error) {
        guard host + count <= hostLimit else {
            throw QCow2Error("L2 entry \(index)", "data cluster at \(hex(geometry.clusterStart(host))) lies outside the image file")
        }
        for k in geometry.clusters(covering: host, byteCount: max(count, 1)) where isMetadata(cluster: k) {
            throw QCow2Error("L2 entry \(index)", "data cluster at \(hex(host)) overlaps metadata at \(hex(k * geometry.clusterSize))")
        }
    }

    /// A metadata write failed: stop writing for good and say why (H10). The durable image is still
    /// consistent because every stage waits for the one before it.
    func markFailed(_ reason: String) {
        if failure == nil { failure = reason }
    }

    /// Metadata is inconsistent (an entry points outside the file, reserved bits are set, ...): stop
    /// writing, and set the corrupt bit so that no writer, qemu included, trusts the image until it
    /// has been repaired. Reads of sound clusters go on.
    func markCorrupt(_ reason: String) {
        guard failure == nil else { return }
        markFailed("metadata is corrupt: \(reason)")
        guard writableState != nil, header.version >= 3 else { return }
        let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: 8, alignment: 8)
        bytes.setBE64(header.incompatibleFeatures | FeatureBit.corrupt, at: 0)
        let token = issue(.headerUpdate(buffer: bytes))
        outbox.append(.writeFile(token, offset: Header.incompatibleFeaturesOffset, from: UnsafeRawBufferPointer(bytes),
                                 dsync: true))
    }
}

/// Errno values used without importing Glibc into the pure module (Linux numbering, as NBD's).
let EIO_: Int32 = 5
let EROFS_: Int32 = 30
let ENOSPC_: Int32 = 28
let EDQUOT_: Int32 = 122

/// "EIO (errno 5)": the symbol operators search for, and the number for the rest.
func errnoName(_ e: Int32) -> String {
    let names: [Int32: String] = [1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 27: "EFBIG", 28: "ENOSPC",
                                  30: "EROFS", 61: "ENODATA", 117: "EUCLEAN", 122: "EDQUOT"]
    return names[e].map { "\($0) (errno \(e))" } ?? "errno \(e)"
}
