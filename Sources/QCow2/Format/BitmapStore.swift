// Storing persistent bitmaps into an image that nothing else is writing: `qnbd bitmap` after its
// operations, and the qcow2 driver at a clean close after the engine's last flush.
//
// Order (qemu's, and the engine's O-rules applied to bitmaps): new data clusters (only where a bit is
// set; an all-zero cluster stays a 0 table entry), then the new tables, then a new directory, sync;
// refcounts of the new clusters durable (OfflineAllocator.commit: blocks, then table entries, each
// synced); then cluster 0 with the extension pointing at the new directory, sync; only then are the old
// tables, data and directory freed and their refcounts committed. A crash at any point leaves the old
// directory (in_use still set where the writer set it, so those bitmaps read as inconsistent) or the
// new one, and at worst leaked clusters; never a pointer to a cluster that is free or reused.

/// A bitmap as it is to be stored: its entry, and its bits when they changed.
public struct StoredBitmap {
    public var entry: BitmapEntry
    /// nil: unchanged, still as on disk (and left there, clusters included).
    public var bits: [UInt8]?
    /// The clusters the on-disk version owns (table and data), freed when it is replaced or removed.
    public var onDisk: [(offset: UInt64, clusters: UInt64)]

    public init(entry: BitmapEntry, bits: [UInt8]?, onDisk: [(offset: UInt64, clusters: UInt64)]) {
        self.entry = entry
        self.bits = bits
        self.onDisk = onDisk
    }
}

public enum BitmapStore {
    /// The table and data clusters a bitmap on disk owns.
    public static func ownedClusters(_ entry: BitmapEntry, image: ImageMetadata) throws(QCow2Error) -> [(offset: UInt64, clusters: UInt64)] {
        let cs = image.clusterSize
        var owned = [(entry.tableOffset, (UInt64(entry.tableSize) * 8 + cs - 1) / cs)]
        let table = try BitmapValidation.table(of: entry, clusterSize: cs, fileSize: image.fileLength,
                                               regions: MetadataRegions(header: image.header), read: image.loader.read)
        for kind in table { if case .data(let offset) = kind { owned.append((offset, 1)) } }
        return owned
    }

    /// Writes the changed bitmaps and a new directory, switches the header to them, frees the old ones.
    public static func store(_ bitmaps: [StoredBitmap], removed: [StoredBitmap], image: ImageMetadata) throws(QCow2Error) {
        let allocator = try OfflineAllocator(image: image)
        let cs = image.clusterSize
        try requireReferenced(bitmaps + removed, image: image, allocator: allocator)
        var entries: [BitmapEntry] = []
        var freed: [(offset: UInt64, clusters: UInt64)] = removed.flatMap(\.onDisk)
        for bitmap in bitmaps {
            var entry = bitmap.entry
            if let bits = bitmap.bits {
                freed += bitmap.onDisk
                let tableSize = BitmapEntry.tableEntries(virtualSize: image.header.size, granularityBits: entry.granularityBits, clusterSize: cs)
                var table = [UInt64](repeating: 0, count: Int(tableSize))
                for i in 0..<Int(tableSize) {
                    let chunk = bits[(i * Int(cs))..<min(bits.count, (i + 1) * Int(cs))]
                    guard chunk.contains(where: { $0 != 0 }) else { continue }
                    let offset = try allocator.allocate(clusters: 1)
                    try image.file.write(Array(chunk) + [UInt8](repeating: 0, count: Int(cs) - chunk.count), at: offset)
                    table[i] = offset
                }
                let tableClusters = (tableSize * 8 + cs - 1) / cs
                entry.tableOffset = try allocator.allocate(clusters: tableClusters)
                entry.tableSize = UInt32(tableSize)
                try image.file.write(padded([UInt8].be64Bytes(table), cs), at: entry.tableOffset)
            }
            entries.append(entry)
        }
        var header = image.header
        header.extensions.removeAll { $0.type == HeaderExtensionType.bitmaps }
        if let old = try BitmapDirectory(header: image.header) {
            freed.append((old.offset, (old.byteCount + cs - 1) / cs))
        }
        if entries.isEmpty {
            header.autoclearFeatures &= ~FeatureBit.bitmaps
        } else {
            let directory = entries.flatMap { $0.encoded() }
            let offset = try allocator.allocate(clusters: (UInt64(directory.count) + cs - 1) / cs)
            try image.file.write(padded(directory, cs), at: offset)
            header.extensions.insert(HeaderExtension(type: HeaderExtensionType.bitmaps, data: BitmapDirectory.extensionData(
                count: entries.count, offset: offset, byteCount: UInt64(directory.count))), at: 0)
            header.autoclearFeatures |= FeatureBit.bitmaps
        }
        // New structures and their refcounts are durable before the header points at them.
        try image.file.sync()
        try allocator.commit()
        let cluster0 = try image.loader.read(0, Int(cs))
        try image.file.write(try header.rewritingExtensions(of: cluster0), at: 0)
        try image.file.sync()
        // Only now is nothing durable pointing at the old structures.
        for (offset, clusters) in freed { try allocator.free(offset, clusters: clusters) }
        try allocator.commit()
    }

    /// Refuses, before anything is written, an image whose refcounts call a cluster of the bitmaps (the
    /// directory, a table, a data cluster) free: the allocator would hand it out for new bitmap data and
    /// overwrite what the old directory still points at (a disabled bitmap's bits, or the directory a
    /// crash would fall back to), and freeing it after the switch would find it already free.
    static func requireReferenced(_ bitmaps: [StoredBitmap], image: ImageMetadata,
                                  allocator: OfflineAllocator) throws(QCow2Error) {
        let cs = image.clusterSize
        func check(_ offset: UInt64, clusters: UInt64, _ what: String) throws(QCow2Error) {
            for c in (offset / cs)..<(offset / cs + clusters) where try allocator.refcount(ofCluster: c) == 0 {
                throw QCow2Error(what, "cluster \(hex(c * cs)) has refcount 0; the refcounts are corrupt (repair with `qnbd check -r all`)")
            }
        }
        if let directory = try BitmapDirectory(header: image.header) {
            try check(directory.offset, clusters: (directory.byteCount + cs - 1) / cs, "bitmap directory")
        }
        for bitmap in bitmaps where bitmap.entry.tableOffset != 0 {
            let what = "bitmap '\(bitmap.entry.name)'"
            for (offset, clusters) in bitmap.onDisk { try check(offset, clusters: clusters, what) }
            // Unchanged bitmaps come without `onDisk`: their table and data stay, so they must stay
            // allocated. A table that does not parse (an in-use bitmap's, never loaded) counts alone.
            try check(bitmap.entry.tableOffset, clusters: (UInt64(bitmap.entry.tableSize) * 8 + cs - 1) / cs, what)
            if bitmap.onDisk.isEmpty, let table = try? BitmapValidation.table(
                of: bitmap.entry, clusterSize: cs, fileSize: image.fileLength,
                regions: MetadataRegions(header: image.header), read: image.loader.read) {
                for case .data(let offset) in table { try check(offset, clusters: 1, what) }
            }
        }
    }

    static func padded(_ bytes: [UInt8], _ cs: UInt64) -> [UInt8] {
        let total = (bytes.count + Int(cs) - 1) / Int(cs) * Int(cs)
        return bytes + [UInt8](repeating: 0, count: total - bytes.count)
    }
}
