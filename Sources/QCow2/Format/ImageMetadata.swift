// An opened qcow2 image for the offline work (check and repair, info, map): header and geometry read
// at once, tables on demand, refcount blocks cached. Reads go through a MetadataFile.

/// An opened qcow2 image: header, geometry and readers for its tables.
public final class ImageMetadata {
    public let file: MetadataFile
    public let loader: MetadataLoader
    public let header: Header
    public let geometry: Geometry
    /// The file length when opened.
    public let fileLength: UInt64
    private var refblockCache: [UInt64: [UInt8]] = [:]
    private var lastRefblock: (offset: UInt64, bytes: [UInt8]) = (0, [])
    private var reftableCache: [UInt64]?

    /// Reads and parses the header; nothing else is read until asked for.
    public init(file: MetadataFile) throws(QCow2Error) {
        self.file = file
        loader = MetadataLoader(file: file)
        fileLength = try file.length()
        header = try loader.header(fileSize: fileLength)
        geometry = Geometry(header: header)
    }

    public var clusterSize: UInt64 { geometry.clusterSize }

    /// The refcount table's entry count (qemu's refcount_table_size).
    public var reftableEntries: Int { Int(header.refcountTableClusters) * Int(clusterSize) / 8 }

    /// Reads `count` big-endian 64-bit words at `offset`.
    public func readWords(at offset: UInt64, count: Int) throws(QCow2Error) -> [UInt64] {
        return try loader.words(at: offset, count: count)
    }

    public func l1Table() throws(QCow2Error) -> [UInt64] {
        return try loader.l1Table(header)
    }

    /// An L2 table as raw words: one per entry, or two (entry, bitmap) with extended L2.
    public func l2Table(at offset: UInt64) throws(QCow2Error) -> [UInt64] {
        return try loader.l2Table(at: offset, geometry: geometry)
    }

    public func reftable() throws(QCow2Error) -> [UInt64] {
        if let reftableCache { return reftableCache }
        let table: [UInt64]
        table = try loader.refcountTable(header)
        reftableCache = table
        return table
    }

    /// Drops cached refcount data after the tools change it on disk.
    public func forgetRefcounts() {
        refblockCache = [:]
        lastRefblock = (0, [])
        reftableCache = nil
    }

    /// The on-disk refcount of a host cluster (qcow2_get_refcount): 0 where no refcount block exists;
    /// nil when the refcount block's offset is not cluster aligned (qemu fails such lookups with EIO).
    public func refcount(ofCluster cluster: UInt64) throws(QCow2Error) -> UInt64? {
        let (index, slot) = geometry.refcountPosition(ofCluster: cluster)
        let table = try reftable()
        guard index < table.count else { return 0 }
        let block = table[index] & RefcountTableEntry.offsetMask
        if block == 0 { return 0 }
        guard block % clusterSize == 0 else { return nil }
        let bytes = try refblock(at: block)
        return bytes.withUnsafeBytes { RefcountEntry.get($0, index: slot, order: geometry.refcountOrder) }
    }

    public func refblock(at offset: UInt64) throws(QCow2Error) -> [UInt8] {
        // Lookups come in runs on one block; skip the dictionary for those.
        if offset == lastRefblock.offset { return lastRefblock.bytes }
        let bytes: [UInt8]
        if let cached = refblockCache[offset] {
            bytes = cached
        } else {
            bytes = try loader.refcountBlock(at: offset, geometry: geometry)
            refblockCache[offset] = bytes
        }
        lastRefblock = (offset, bytes)
        return bytes
    }

    /// qemu's qcow2_get_cluster_type (L2Entry.clusterType).
    public func clusterType(_ entry: UInt64) -> ClusterType {
        L2Entry.clusterType(entry, extendedL2: geometry.extendedL2)
    }

    /// qemu's qcow2_get_subcluster_type (L2Entry.subclusterType).
    public func subclusterType(_ entry: UInt64, bitmap: UInt64, index: Int) -> SubclusterType {
        L2Entry.subclusterType(entry, bitmap: bitmap, index: index, extendedL2: geometry.extendedL2)
    }

    /// The snapshot table (SnapshotTable).
    public func snapshots() throws(QCow2Error) -> SnapshotTable {
        return try SnapshotTable(header: header, read: loader.read)
    }

    /// The bitmap directory's location, when the image's bitmaps are valid (BitmapDirectory).
    public func bitmapDirectory() throws(QCow2Error) -> BitmapDirectory? {
        return try BitmapDirectory(header: header)
    }

    /// The bitmaps, validated (BitmapValidation): a hostile directory is refused, naming the fault.
    public func bitmaps() throws(QCow2Error) -> [BitmapEntry] {
        return try BitmapValidation.load(header: header, fileSize: fileLength, read: loader.read)
    }

    /// A reader of one bitmap's bits.
    public func bitmapReader(_ entry: BitmapEntry) throws(QCow2Error) -> BitmapReader {
        return try BitmapReader(entry: entry, header: header, fileSize: fileLength, read: loader.read)
    }
}
