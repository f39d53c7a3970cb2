// Opening an image for the offline tools: the format layer (QCow2: probe, header, tables, snapshots,
// bitmaps) over a blocking ImageStorage, plus the refcount lookups `check` and `map` make on demand.
// Nothing here writes.

import QCow2

/// Image formats the tools understand.
public enum ImageFormat: String, Sendable {
    case qcow2
    case raw
}

/// Reads the first bytes and decides the format (ImageProbe); a file with another format's signature
/// is refused rather than taken for raw.
public func probeFormat(_ storage: ImageStorage, name: String) throws(ToolError) -> ImageFormat {
    switch probedFormat(storage) {
    case .qcow2: return .qcow2
    case .raw: return .raw
    case .foreign(let format):
        throw ToolError("'\(name)' is a \(format) image, which qnbd does not read; convert it with `qemu-img convert -O qcow2`")
    }
}

/// What the first bytes of the storage say, unjudged.
public func probedFormat(_ storage: ImageStorage) -> ProbedFormat {
    (try? MetadataLoader(storage: storage).probe()) ?? .raw
}

extension MetadataLoader {
    /// A loader over the tools' blocking storage.
    public init(storage: ImageStorage) {
        self.init { (offset, count) throws(QCow2Error) in
            do throws(ToolError) { return try storage.read(at: offset, count: count) } catch {
                throw QCow2Error("file", error.message)
            }
        }
    }
}

extension ToolError {
    /// A format-layer error as the tools print it.
    init(_ error: QCow2Error) { self.init("\(error.structure): \(error.message)") }
}

/// An opened qcow2 image: header, geometry and readers for its tables.
public final class QCow2Image {
    public let storage: ImageStorage
    public let loader: MetadataLoader
    public let header: Header
    public let geometry: Geometry
    /// The file length when opened.
    public let fileLength: UInt64
    private var refblockCache: [UInt64: [UInt8]] = [:]
    private var lastRefblock: (offset: UInt64, bytes: [UInt8]) = (0, [])
    private var reftableCache: [UInt64]?

    public init(storage: ImageStorage, name: String) throws(ToolError) {
        self.storage = storage
        loader = MetadataLoader(storage: storage)
        fileLength = try storage.length()
        do {
            header = try loader.header(fileSize: fileLength)
        } catch {
            throw ToolError("could not open '\(name)': \(error)")
        }
        geometry = Geometry(header: header)
    }

    public var clusterSize: UInt64 { geometry.clusterSize }

    /// What qemu checks when it opens an image (Header.validateOpenable): the tools refuse what qemu
    /// refuses, and accept the rest so that check can diagnose it.
    public func validateForOpen(name: String) throws(ToolError) {
        do {
            try header.validateOpenable()
        } catch {
            throw ToolError("could not open '\(name)': \(error)")
        }
    }

    /// The refcount table's entry count (qemu's refcount_table_size).
    public var reftableEntries: Int { Int(header.refcountTableClusters) * Int(clusterSize) / 8 }

    /// Reads `count` big-endian 64-bit words at `offset`.
    public func readWords(at offset: UInt64, count: Int) throws(ToolError) -> [UInt64] {
        do { return try loader.words(at: offset, count: count) } catch { throw ToolError(error) }
    }

    public func l1Table() throws(ToolError) -> [UInt64] {
        do { return try loader.l1Table(header) } catch { throw ToolError(error) }
    }

    /// An L2 table as raw words: one per entry, or two (entry, bitmap) with extended L2.
    public func l2Table(at offset: UInt64) throws(ToolError) -> [UInt64] {
        do { return try loader.l2Table(at: offset, geometry: geometry) } catch { throw ToolError(error) }
    }

    public func reftable() throws(ToolError) -> [UInt64] {
        if let reftableCache { return reftableCache }
        let table: [UInt64]
        do { table = try loader.refcountTable(header) } catch { throw ToolError(error) }
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
    public func refcount(ofCluster cluster: UInt64) throws(ToolError) -> UInt64? {
        let (index, slot) = geometry.refcountPosition(ofCluster: cluster)
        let table = try reftable()
        guard index < table.count else { return 0 }
        let block = table[index] & RefcountTableEntry.offsetMask
        if block == 0 { return 0 }
        guard block % clusterSize == 0 else { return nil }
        let bytes = try refblock(at: block)
        return bytes.withUnsafeBytes { RefcountEntry.get($0, index: slot, order: geometry.refcountOrder) }
    }

    func refblock(at offset: UInt64) throws(ToolError) -> [UInt8] {
        // Lookups come in runs on one block; skip the dictionary for those.
        if offset == lastRefblock.offset { return lastRefblock.bytes }
        let bytes: [UInt8]
        if let cached = refblockCache[offset] {
            bytes = cached
        } else {
            do { bytes = try loader.refcountBlock(at: offset, geometry: geometry) } catch { throw ToolError(error) }
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
    public func snapshots() throws(ToolError) -> SnapshotTable {
        do { return try SnapshotTable(header: header, read: loader.read) } catch { throw ToolError(error) }
    }

    /// The bitmap directory's location, when the image's bitmaps are valid (BitmapDirectory).
    public func bitmapDirectory() throws(ToolError) -> BitmapDirectory? {
        do { return try BitmapDirectory(header: header) } catch { throw ToolError(error) }
    }

    public func bitmaps() throws(ToolError) -> [BitmapEntry] {
        guard let directory = try bitmapDirectory() else { return [] }
        do { return try directory.entries(read: loader.read) } catch { throw ToolError(error) }
    }
}
