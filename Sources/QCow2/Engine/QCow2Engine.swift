// The qcow2 engine: image metadata and request state machines, with no I/O of its own.
//
// Calls (`read`, `write`, `writeZeroes`, `trim`, `flush`, `blockStatus`) and completions
// (`completed`) are events; each may append actions to the outbox, which the I/O shell drains
// (`takeActions`) and executes, feeding every completion back with its token. Everything runs on the
// shell's loop thread; nothing here blocks, sleeps or locks.
//
// The parts live in extensions, one idea each: opening a writable image (+Open), L2 table lookup and
// waiting (+L2), the completion dispatch (+Completions), reads (+Read), block status (+Status), writes
// (+Write, +Subclusters, +ZeroTrim), allocations (+Allocation, over Allocation's state machine), frees
// (+Frees) and the flush (+Flush, over FlushPipeline). The write side's state is WritableState. This
// file holds the read-only core: the shared state, the outbox, and the integrity checks.
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
    /// Host clusters of the L1 table, computed once: every write's target is checked against them.
    let l1Clusters: Range<UInt64>
    @exclusivity(unchecked) var l1: [UInt64]
    @exclusivity(unchecked) var cache: L2Cache
    @exclusivity(unchecked) var reads = Slab<ReadID, ReadRequest>()
    @exclusivity(unchecked) var statuses = Slab<StatusID, StatusRequest>()
    @exclusivity(unchecked) var tokens = Slab<IOToken, TokenPurpose>()
    @exclusivity(unchecked) var outbox = ArrayQueue<IOAction>(reservingCapacity: 64)
    let compression: CompressionAlgorithm
    /// Set after a metadata write or sync failed for a reason other than space: the image is read-only
    /// from then on (H10).
    @exclusivity(unchecked) public private(set) var failure: String?
    /// The image's persistent dirty bitmaps (LiveBitmap), marked at every write's entry.
    @exclusivity(unchecked) public private(set) var bitmaps: [LiveBitmap] = []
    /// The recording bitmaps' markers (the one check a write pays when there are none).
    @exclusivity(unchecked) var bitmapMarkers: [LiveBitmap.Marker] = []

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
        self.l1Clusters = Geometry(header: header).clusters(covering: header.l1TableOffset, byteCount: UInt64(header.l1Size) * 8)
        self.backingSize = backingSize
        self.compression = header.compressionType == 1 ? .zstd : .deflate
        self.cache = L2Cache(tableSize: Int(geometry.clusterSize), budgetBytes: cacheBytes, l1Entries: l1.count)
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
    }

    /// A read-only engine.
    public convenience init(header: Header, l1: [UInt64], fileSize: UInt64, backingSize: UInt64?,
                            cacheBytes: Int) throws(QCow2Error) {
        try self.init(header: header, l1: l1, fileSize: fileSize, backingSize: backingSize, cacheBytes: cacheBytes,
                      refcounts: nil)
    }

    /// Installs the bitmaps loaded at open (before anything is served).
    public func install(bitmaps: [LiveBitmap]) {
        self.bitmaps = bitmaps
        bitmapMarkers = writableState == nil ? [] : bitmaps.filter(\.records).map(\.marker)
    }

    /// Marks `offset..<offset+length` dirty in every bitmap that records writes. Called when a write,
    /// zero or trim is accepted, before any of its I/O: a request that completes is always reflected,
    /// and a request that fails part-way leaves its range dirty (a backup copies a little more).
    @inline(__always)
    func markBitmaps(offset: UInt64, length: UInt64) {
        guard !bitmapMarkers.isEmpty else { return }
        for marker in bitmapMarkers { marker.mark(offset: offset, length: length) }
    }

    /// I/O still in flight (actions issued and not completed), punches included.
    public var outstandingIO: Int { tokens.count }

    /// The next pending action, oldest first; nil when there is none. Actions appended while the
    /// shell executes one (inline completions) come out of later calls. Draining one by one, with the
    /// outbox's storage kept, costs no allocation per request, where handing out the array did.
    public func nextAction() -> IOAction? {
        outbox.popFirst()
    }

    /// Hands all pending actions to the shell at once (tests that choose the completion order).
    public func takeActions() -> [IOAction] {
        outbox.removeAll()
    }

    public var hasActions: Bool { !outbox.isEmpty }

    /// Requests still in flight, in-place fast-path writes included.
    public var activeRequests: Int {
        reads.count + statuses.count + (writableState.map { $0.writes.count + $0.inPlaceInFlight } ?? 0)
    }

    func issue(_ purpose: TokenPurpose) -> IOToken {
        tokens.insert(purpose)
    }

    /// The writable state, for an event that only the write side can have caused (a parked write, a
    /// write-side completion): getting one on a read-only engine is a bug in the engine, not in the image.
    @inline(__always)
    func writeSide(_ event: StaticString) -> WritableState {
        guard let writableState else { preconditionFailure("\(event) on a read-only engine") }
        return writableState
    }

    /// Whether host cluster `c` holds metadata right now: the header, the L1 or refcount table, a
    /// refcount block or an L2 table. Data never goes there; when an L2 entry says it does, the
    /// tables point into each other.
    func isMetadata(cluster c: UInt64) -> Bool {
        if c == 0 { return true }
        if let writableState, writableState.holdsMetadata(cluster: c) { return true }
        return l1Clusters.contains(c)
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
