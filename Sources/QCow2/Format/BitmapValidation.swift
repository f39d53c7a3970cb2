// What makes a bitmap directory acceptable, the rules qemu applies when it loads the directory
// (qcow2-bitmap.c's entry checks) plus what qnbd needs before it trusts an offset: every table and the
// directory inside the file, and none of them on top of other metadata. A hostile directory is refused
// with the bitmap and the structure named, before anything is read through it or written over it.

/// The metadata a bitmap structure must not overlap, from the header alone.
public struct MetadataRegions: Sendable {
    public var regions: [(name: String, range: Range<UInt64>)]

    public init(header: Header) {
        let cluster = header.clusterSize
        regions = [("the header", 0..<cluster)]
        if header.l1Size > 0 {
            regions.append(("the L1 table", header.l1TableOffset..<(header.l1TableOffset + UInt64(header.l1Size) * 8)))
        }
        let reftableEnd = header.refcountTableOffset + UInt64(header.refcountTableClusters) * cluster
        regions.append(("the refcount table", header.refcountTableOffset..<reftableEnd))
        if header.snapshotCount > 0 {
            // The table's exact length needs parsing; its first cluster is enough to catch a pointer at it.
            regions.append(("the snapshot table", header.snapshotsOffset..<(header.snapshotsOffset + cluster)))
        }
    }

    /// The region `range` overlaps, if any.
    public func overlap(_ range: Range<UInt64>) -> String? {
        regions.first { $0.range.overlaps(range) }?.name
    }
}

public enum BitmapValidation {
    /// Checks the directory's placement and every entry; returns the entries when they are all usable.
    /// Errors are `corrupt` for a broken directory and not corrupt (`QCow2Error.unsupported`) for
    /// unknown flags or types, which qemu refuses too but which are not damage (a newer writer).
    /// `withinFile` false leaves tables past the end of the file to the caller: qemu opens such an image
    /// and `qemu-img check` counts the reference as an error, so `qnbd check` does the same.
    public static func load(header: Header, fileSize: UInt64, read: MetadataRead,
                            withinFile: Bool = true) throws(QCow2Error) -> [BitmapEntry] {
        guard let directory = try BitmapDirectory(header: header) else { return [] }
        var regions = MetadataRegions(header: header)
        let directoryRange = directory.offset..<(directory.offset + directory.byteCount)
        guard directory.offset < fileSize, directory.byteCount <= fileSize - directory.offset else {
            throw QCow2Error("bitmap directory", "at \(hex(directory.offset)) (\(directory.byteCount) bytes) runs past the end of the file")
        }
        if let hit = regions.overlap(directoryRange) {
            throw QCow2Error("bitmap directory", "at \(hex(directory.offset)) overlaps \(hit)")
        }
        regions.regions.append(("the bitmap directory", directoryRange))
        let entries = try directory.entries(read: read)
        var names = Set<String>()
        for entry in entries {
            try validate(entry, header: header, fileSize: fileSize, withinFile: withinFile)
            guard names.insert(entry.name).inserted else {
                throw QCow2Error("bitmap directory", "two bitmaps are named '\(entry.name)'")
            }
            let table = entry.tableOffset..<(entry.tableOffset + UInt64(entry.tableSize) * 8)
            if let hit = regions.overlap(table) {
                throw QCow2Error("bitmap '\(entry.name)'", "table at \(hex(entry.tableOffset)) overlaps \(hit)")
            }
            regions.regions.append(("the table of bitmap '\(entry.name)'", table))
        }
        return entries
    }

    /// One entry's fields (qemu's check_dir_entry, and the table inside the file).
    public static func validate(_ entry: BitmapEntry, header: Header, fileSize: UInt64,
                                withinFile: Bool = true) throws(QCow2Error) {
        let what = "bitmap '\(entry.name)'"
        guard !entry.name.isEmpty, entry.name.utf8.count <= BitmapDirectory.maximumNameBytes else {
            throw QCow2Error("bitmap directory", "a bitmap name of \(entry.name.utf8.count) bytes (1 to \(BitmapDirectory.maximumNameBytes) allowed)")
        }
        guard entry.flags & ~(BitmapEntry.knownFlags | BitmapEntry.extraDataCompatible) == 0 else {
            throw .unsupported(what, "unknown flags \(hex(UInt64(entry.flags & ~BitmapEntry.knownFlags))); qnbd cannot use its bitmaps")
        }
        guard entry.type == BitmapEntry.dirtyTrackingType else {
            throw .unsupported(what, "unknown bitmap type \(entry.type); qnbd cannot use its bitmaps")
        }
        guard entry.extraData.isEmpty else {
            throw .unsupported(what, "\(entry.extraData.count) bytes of extra data, which qnbd (like qemu) does not support")
        }
        guard entry.flags & BitmapEntry.extraDataCompatible == 0 else {
            throw .unsupported(what, "unknown flags \(hex(UInt64(BitmapEntry.extraDataCompatible))); qnbd cannot use its bitmaps")
        }
        guard BitmapEntry.granularityBitsRange.contains(entry.granularityBits) else {
            throw QCow2Error(what, "granularity_bits \(entry.granularityBits) outside \(BitmapEntry.granularityBitsRange.lowerBound)...\(BitmapEntry.granularityBitsRange.upperBound)")
        }
        let cluster = header.clusterSize
        guard entry.tableOffset != 0, entry.tableOffset % cluster == 0 else {
            throw QCow2Error(what, "table offset \(hex(entry.tableOffset)) is not a cluster-aligned, non-zero offset")
        }
        let expected = BitmapEntry.tableEntries(virtualSize: header.size, granularityBits: entry.granularityBits, clusterSize: cluster)
        guard entry.tableSize > 0, entry.tableSize <= BitmapDirectory.maximumTableEntries,
              UInt64(entry.tableSize) == expected else {
            throw QCow2Error(what, "table has \(entry.tableSize) entries; a \(header.size)-byte disk at granularity \(entry.granularity) needs \(expected)")
        }
        guard UInt64(entry.tableSize) * cluster <= fileSize else {
            throw QCow2Error(what, "\(entry.tableSize) data clusters cannot fit in a \(fileSize)-byte file")
        }
        guard !withinFile || entry.tableOffset < fileSize && UInt64(entry.tableSize) * 8 <= fileSize - entry.tableOffset else {
            throw QCow2Error(what, "table at \(hex(entry.tableOffset)) runs past the end of the file")
        }
    }

    /// A bitmap table's entries, each checked: a data cluster must be aligned, inside the file and off
    /// the metadata in `regions`.
    public static func table(of entry: BitmapEntry, clusterSize: UInt64, fileSize: UInt64, regions: MetadataRegions,
                             read: MetadataRead) throws(QCow2Error) -> [BitmapTableEntry.Kind] {
        let words = try read(entry.tableOffset, Int(entry.tableSize) * 8).be64Words(count: Int(entry.tableSize))
        var kinds: [BitmapTableEntry.Kind] = []
        kinds.reserveCapacity(words.count)
        for (i, word) in words.enumerated() {
            guard let kind = BitmapTableEntry.kind(word, clusterSize: clusterSize) else {
                throw QCow2Error("bitmap '\(entry.name)'", "table entry \(i) (\(hex(word))) is invalid")
            }
            if case .data(let offset) = kind {
                guard offset < fileSize, clusterSize <= fileSize - offset else {
                    throw QCow2Error("bitmap '\(entry.name)'", "table entry \(i) points past the end of the file (\(hex(offset)))")
                }
                if let hit = regions.overlap(offset..<(offset + clusterSize)) {
                    throw QCow2Error("bitmap '\(entry.name)'", "table entry \(i) points into \(hit) (\(hex(offset)))")
                }
            }
            kinds.append(kind)
        }
        return kinds
    }
}
