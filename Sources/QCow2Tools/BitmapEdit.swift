// `qnbd bitmap`: qemu-img bitmap's operations on an image's persistent dirty bitmaps, applied in the
// order given. The bitmaps are held in memory while the operations run (bits of the changed ones, the
// rest left on disk as they are); then the changed bitmaps' data clusters and tables and a new
// directory are written and synced, the header's extension switched to them, and only then are the old
// structures freed (qemu's order: a crash at any point leaves the old bitmaps or the new ones, and at
// worst leaked clusters). Like qemu-img, an operation that fails stops the rest, and what the earlier
// ones did is still stored.

import QCow2

/// One operation of `qnbd bitmap`.
public enum BitmapOperation: Equatable, Sendable {
    case add
    case remove
    case clear
    case enable
    case disable
    /// Merge bitmap `source` (from `file` when given, else this image) into the named bitmap.
    case merge(source: String, file: String?)

    var name: String {
        switch self {
        case .add: "add"
        case .remove: "remove"
        case .clear: "clear"
        case .enable: "enable"
        case .disable: "disable"
        case .merge: "merge"
        }
    }
}

/// A bitmap as the editor holds it (the format layer's StoredBitmap).
typealias EditedBitmap = StoredBitmap

public enum BitmapEditor {
    /// qemu's default granularity for a new bitmap: the cluster size, within 4 KiB ... 64 KiB.
    public static func defaultGranularity(clusterSize: UInt64) -> UInt64 { min(65536, max(4096, clusterSize)) }

    /// Runs `operations` on bitmap `name` of the image at `path`.
    public static func run(path: String, name: String, operations: [BitmapOperation],
                           granularity: UInt64?) throws(ToolError) {
        // qemu-img opens a merge's source image before any operation runs.
        for case .merge(_, let file?) in operations {
            let source = try FileStorage(path: file, mode: .readOnly)
            defer { source.close() }
            _ = try ImageMetadata.open(source, name: file)
        }
        let storage = try FileStorage(path: path, mode: .readWrite)
        defer { storage.close() }
        guard try probeFormat(storage, name: path) == .qcow2 else {
            throw ToolError("Format driver 'raw' does not support bitmaps ('\(path)' is not a qcow2 image)")
        }
        let image = try ImageMetadata.open(storage, name: path)
        try run(image: image, path: path, name: name, operations: operations, granularity: granularity)
    }

    static func run(image: ImageMetadata, path: String, name: String, operations: [BitmapOperation],
                    granularity: UInt64?) throws(ToolError) {
        guard image.header.version == 3 else {
            throw ToolError("Cannot store dirty bitmaps in qcow2 v2 files")
        }
        var bitmaps = try tool { () throws(QCow2Error) in
            try image.bitmaps().map { entry throws(QCow2Error) in
                EditedBitmap(entry: entry, bits: nil, onDisk: try ownedClusters(entry, image: image))
            }
        }
        let before = bitmaps.map(\.entry)
        var removed: [EditedBitmap] = []
        var failure: ToolError?
        for operation in operations {
            do throws(ToolError) {
                try apply(operation, name: name, granularity: granularity, bitmaps: &bitmaps, removed: &removed, image: image)
            } catch {
                failure = ToolError("Operation \(operation.name) on bitmap \(name) failed: \(error.message)")
                break
            }
        }
        if bitmaps.map(\.entry) != before || bitmaps.contains(where: { $0.bits != nil }) || !removed.isEmpty {
            try refuseCorruptImage(image, path: path)
            try tool { () throws(QCow2Error) in try store(bitmaps, removed: removed, image: image) }
        }
        if let failure { throw failure }
    }

    /// Freeing an old bitmap's clusters trusts that nothing else uses them; a bitmap table pointing at
    /// an L2 table or guest data would have the writer free live clusters. So the image's references
    /// are counted first (the check, read only) and an image with corruptions is refused; leaks are fine.
    static func refuseCorruptImage(_ image: ImageMetadata, path: String) throws(ToolError) {
        let outcome = QCow2Check.run(file: image.file, name: path, repair: nil)
        if let failure = outcome.failure { throw ToolError(failure) }
        guard outcome.first.corruptions == 0 else {
            throw ToolError("'\(path)' has \(outcome.first.corruptions) corruptions (see `qnbd check`); "
                + "qnbd does not change bitmaps in a corrupt image")
        }
        image.forgetRefcounts()
    }

    /// The table and data clusters a bitmap on disk owns.
    static func ownedClusters(_ entry: BitmapEntry, image: ImageMetadata) throws(QCow2Error) -> [(offset: UInt64, clusters: UInt64)] {
        try BitmapStore.ownedClusters(entry, image: image)
    }

    static func apply(_ operation: BitmapOperation, name: String, granularity: UInt64?, bitmaps: inout [EditedBitmap],
                      removed: inout [EditedBitmap], image: ImageMetadata) throws(ToolError) {
        let index = bitmaps.firstIndex { $0.entry.name == name }
        if operation == .add {
            guard index == nil else { throw ToolError("Bitmap already exists: \(name)") }
            try addBitmap(name: name, granularity: granularity, bitmaps: &bitmaps, image: image)
            return
        }
        guard let index else { throw ToolError("Dirty bitmap '\(name)' not found") }
        if operation == .remove {
            removed.append(bitmaps.remove(at: index))
            return
        }
        guard !bitmaps[index].entry.isInUse else {
            throw ToolError("Bitmap '\(name)' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk")
        }
        switch operation {
        case .enable: bitmaps[index].entry.flags |= BitmapEntry.auto
        case .disable: bitmaps[index].entry.flags &= ~BitmapEntry.auto
        case .clear: bitmaps[index].bits = zeroBits(bitmaps[index].entry, image: image)
        case .merge(let source, let file):
            let runs = try sourceRuns(source: source, file: file, image: image, bitmaps: bitmaps)
            var bits = try currentBits(bitmaps[index], image: image)
            let shift = UInt64(bitmaps[index].entry.granularityBits)
            for run in runs where run.dirty {
                for g in (run.offset >> shift)...((run.offset + run.length - 1) >> shift) {
                    bits[Int(g / 8)] |= 1 << UInt8(g % 8)
                }
            }
            bitmaps[index].bits = bits
        case .add, .remove: break
        }
    }

    static func addBitmap(name: String, granularity: UInt64?, bitmaps: inout [EditedBitmap], image: ImageMetadata) throws(ToolError) {
        let g = granularity ?? defaultGranularity(clusterSize: image.clusterSize)
        guard g.nonzeroBitCount == 1, g >= 512 else { throw ToolError("Granularity must be power of 2 and at least 512") }
        guard g <= 1 << 31 else { throw ToolError("Granularity must be at most 2^31 (the qcow2 limit)") }
        guard !name.isEmpty, name.utf8.count <= BitmapDirectory.maximumNameBytes else {
            throw ToolError("Bitmap name is too long (the limit is \(BitmapDirectory.maximumNameBytes) bytes)")
        }
        guard bitmaps.count < Int(BitmapDirectory.maximumBitmaps) else {
            throw ToolError("Maximum number of persistent bitmaps is already reached")
        }
        let entry = BitmapEntry(name: name, flags: BitmapEntry.auto, granularityBits: UInt8(g.trailingZeroBitCount))
        let bytes = BitmapEntry.bitCount(virtualSize: image.header.size, granularityBits: entry.granularityBits) / 8
        guard bytes <= BitmapDirectory.maximumBitmapBytes else { throw ToolError("Too large bitmap") }
        bitmaps.append(EditedBitmap(entry: entry, bits: zeroBits(entry, image: image), onDisk: []))
    }

    static func zeroBits(_ entry: BitmapEntry, image: ImageMetadata) -> [UInt8] {
        let bits = BitmapEntry.bitCount(virtualSize: image.header.size, granularityBits: entry.granularityBits)
        return [UInt8](repeating: 0, count: Int((bits + 7) / 8))
    }

    static func currentBits(_ bitmap: EditedBitmap, image: ImageMetadata) throws(ToolError) -> [UInt8] {
        if let bits = bitmap.bits { return bits }
        return try tool { () throws(QCow2Error) in try image.bitmapReader(bitmap.entry).allBits() }
    }

    /// The dirty runs of the merge source, over the whole disk.
    static func sourceRuns(source: String, file: String?, image: ImageMetadata, bitmaps: [EditedBitmap]) throws(ToolError) -> [BitmapRun] {
        if let file {
            let storage = try FileStorage(path: file, mode: .readOnly)
            defer { storage.close() }
            guard try probeFormat(storage, name: file) == .qcow2 else { throw ToolError("Dirty bitmap '\(source)' not found") }
            let other = try ImageMetadata.open(storage, name: file)
            guard let entry = try tool({ () throws(QCow2Error) in try other.bitmaps() }).first(where: { $0.name == source }) else {
                throw ToolError("Dirty bitmap '\(source)' not found")
            }
            guard other.header.size == image.header.size else { throw ToolError("Bitmaps are incompatible and can't be merged") }
            guard !entry.isInUse else {
                throw ToolError("Bitmap '\(source)' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk")
            }
            return try tool { () throws(QCow2Error) in try other.bitmapReader(entry).runs(offset: 0, length: other.header.size) }
        }
        guard let bitmap = bitmaps.first(where: { $0.entry.name == source }) else {
            throw ToolError("Dirty bitmap '\(source)' not found")
        }
        guard !bitmap.entry.isInUse else {
            throw ToolError("Bitmap '\(source)' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk")
        }
        let bits = try currentBits(bitmap, image: image)
        let g = bitmap.entry.granularity
        var runs: [BitmapRun] = []
        for (i, byte) in bits.enumerated() where byte != 0 {
            for b in 0..<8 where byte & (1 << UInt8(b)) != 0 {
                let start = UInt64(i * 8 + b) * g
                runs.append(BitmapRun(offset: start, length: min(g, image.header.size - start), dirty: true))
            }
        }
        return runs
    }

    /// Writes the changed bitmaps and a new directory, switches the header to them, frees the old ones.
    static func store(_ bitmaps: [EditedBitmap], removed: [EditedBitmap], image: ImageMetadata) throws(QCow2Error) {
        try BitmapStore.store(bitmaps, removed: removed, image: image)
    }
}
