// Opening a writable engine: the refcounts loaded at open, and the layout check that must pass before
// anything is written.

extension QCow2Engine {
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
}
