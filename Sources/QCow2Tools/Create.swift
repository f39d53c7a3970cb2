// `qnbd create`: new raw and qcow2 images. A qcow2 image gets qemu-img's layout (header at cluster 0,
// refcount table at 1, first refcount block at 2, L1 at 3), so a default image is byte for byte what
// `qemu-img create` writes. When the L1 table or preallocated metadata needs more than one refcount
// block (or more than one refcount table cluster), the extra clusters are counted before anything is
// placed, so every cluster the image uses is refcounted exactly once.

import QCow2
#if canImport(Glibc)
import Glibc
#endif

public enum Preallocation: String, Sendable, CaseIterable {
    case off
    /// Every L2 table exists and every entry points at its own data cluster (COPIED set); the data
    /// clusters are reserved but left as holes in the file.
    case metadata
}

public struct CreateOptions: Sendable, Equatable {
    public var format: ImageFormat = .qcow2
    /// Virtual size in bytes; nil takes the backing file's size.
    public var size: UInt64?
    public var clusterSize: UInt64 = 65536
    /// 2 (qemu's compat=0.10) or 3 (compat=1.1).
    public var version: UInt32 = 3
    public var refcountBits: Int = 16
    public var lazyRefcounts = false
    public var extendedL2 = false
    /// 0 deflate ("zlib"), 1 zstd.
    public var compressionType: UInt8 = 0
    public var preallocation: Preallocation = .off
    /// The backing file name exactly as it is stored in the header.
    public var backingFile: String?
    public var backingFormat: ImageFormat?

    public init() {}

    /// The option combinations qemu-img refuses, refused with the same reasoning.
    public func validate() throws(ToolError) {
        if let size, size > UInt64(Int64.max) { throw ToolError("size \(size) is too large") }
        if format == .raw {
            if backingFile != nil { throw ToolError("raw images cannot have a backing file") }
            if preallocation != .off { throw ToolError("--preallocation metadata needs a qcow2 image") }
            return
        }
        guard clusterSize.nonzeroBitCount == 1, (512...(2 << 20)).contains(clusterSize) else {
            throw ToolError("cluster size must be a power of two between 512 and 2M, not \(clusterSize)")
        }
        guard [1, 2, 4, 8, 16, 32, 64].contains(refcountBits) else {
            throw ToolError("refcount bits must be a power of two between 1 and 64, not \(refcountBits)")
        }
        guard version == 2 || version == 3 else { throw ToolError("compat must be 2 (0.10) or 3 (1.1)") }
        if version == 2 {
            if refcountBits != 16 { throw ToolError("compat 0.10 images only support 16-bit refcounts (use --compat 1.1)") }
            if lazyRefcounts { throw ToolError("lazy refcounts need compat 1.1 or later") }
            if extendedL2 { throw ToolError("extended L2 entries need compat 1.1 or later") }
            if compressionType != 0 { throw ToolError("compression type zstd needs compat 1.1 or later") }
        }
        if extendedL2 && clusterSize < 16384 {
            throw ToolError("extended L2 entries need a cluster size of at least 16K")
        }
        if backingFile != nil && preallocation != .off && !extendedL2 {
            // What is preallocated would hide the backing file; subclusters keep it visible (qemu's rule).
            throw ToolError("a backing file and preallocation can only be combined with --extended-l2")
        }
        if let backingFile {
            if backingFile.isEmpty { throw ToolError("the backing file name is empty") }
            if backingFile.utf8.count > 1023 { throw ToolError("the backing file name is longer than 1023 bytes") }
        }
    }
}

/// Where every structure of a new qcow2 image goes. Pure arithmetic, so it is unit-tested directly.
public struct CreateLayout: Equatable, Sendable {
    public var clusterBits: Int
    public var virtualSize: UInt64
    public var l1Size: UInt32
    /// 0 when the L1 table is empty (a zero-sized disk), as qemu leaves it.
    public var l1Offset: UInt64
    public var reftableOffset: UInt64
    public var reftableClusters: UInt32
    /// One entry per refcount block, in refcount table order.
    public var refblockOffsets: [UInt64]
    /// Preallocated L2 tables, in L1 order (empty without preallocation).
    public var l2Offsets: [UInt64]
    /// The first preallocated data cluster; guest cluster g lives at dataOffset + g * cluster size.
    public var dataOffset: UInt64
    public var dataClusters: UInt64
    /// Clusters 0 ..< clusterCount are in use, each with refcount 1.
    public var clusterCount: UInt64
    public var fileLength: UInt64

    public var clusterSize: UInt64 { 1 << UInt64(clusterBits) }

    public static func compute(virtualSize: UInt64, clusterBits: Int, refcountOrder: Int, extendedL2: Bool,
                               preallocation: Preallocation) throws(ToolError) -> CreateLayout {
        let cs: UInt64 = 1 << UInt64(clusterBits)
        let entryBytes: UInt64 = extendedL2 ? 16 : 8
        let l2Coverage = cs * (cs / entryBytes)
        let l1Entries = (virtualSize + l2Coverage - 1) / l2Coverage
        guard l1Entries * 8 <= QCow2Limits.l1Bytes else {
            throw ToolError("a \(virtualSize)-byte disk needs an L1 table larger than 32 MiB (use bigger clusters)")
        }
        let l1Clusters = (l1Entries * 8 + cs - 1) / cs
        let preallocate = preallocation == .metadata
        let l2Tables = preallocate ? l1Entries : 0
        let dataClusters = preallocate ? (virtualSize + cs - 1) / cs : 0
        let refblockCoverage = (cs * 8) >> UInt64(refcountOrder)   // clusters per refcount block
        // Refcount blocks and table clusters count themselves: grow both until they cover everything.
        var refblocks: UInt64 = 1
        var reftableClusters: UInt64 = 1
        while true {
            let total = 1 + reftableClusters + refblocks + l1Clusters + l2Tables + dataClusters
            let neededBlocks = (total + refblockCoverage - 1) / refblockCoverage
            let neededTable = (neededBlocks * 8 + cs - 1) / cs
            if neededBlocks <= refblocks && neededTable <= reftableClusters { break }
            refblocks = max(refblocks, neededBlocks)
            reftableClusters = max(reftableClusters, neededTable)
        }
        guard reftableClusters * cs <= QCow2Limits.refcountTableBytes else {
            throw ToolError("the image would need a refcount table larger than 8 MiB (use bigger clusters)")
        }
        // qemu's order: header, refcount table, first refcount block, L1; then what preallocation adds;
        // further refcount blocks go last.
        var next: UInt64 = 1
        let reftableOffset = next * cs
        next += reftableClusters
        var refblockOffsets = [next * cs]
        next += 1
        let l1Offset = l1Entries > 0 ? next * cs : 0
        next += l1Clusters
        var l2Offsets: [UInt64] = []
        for _ in 0..<l2Tables {
            l2Offsets.append(next * cs)
            next += 1
        }
        let dataOffset = next * cs
        next += dataClusters
        for _ in 1..<refblocks {
            refblockOffsets.append(next * cs)
            next += 1
        }
        // qemu writes the L1 table only up to its last entry, and preallocated data stays a hole up to
        // the end of the last data cluster (the file must reach it: a cluster past EOF is corruption).
        let fileLength: UInt64
        if preallocate || refblocks > 1 {
            fileLength = next * cs
        } else if l1Entries > 0 {
            fileLength = l1Offset + l1Entries * 8
        } else {
            fileLength = next * cs
        }
        return CreateLayout(
            clusterBits: clusterBits, virtualSize: virtualSize, l1Size: UInt32(l1Entries), l1Offset: l1Offset,
            reftableOffset: reftableOffset, reftableClusters: UInt32(reftableClusters),
            refblockOffsets: refblockOffsets, l2Offsets: l2Offsets, dataOffset: dataOffset,
            dataClusters: dataClusters, clusterCount: next, fileLength: fileLength)
    }
}

/// What `create` made, for its one-line report.
public struct CreateSummary: Sendable {
    public var path: String
    public var options: CreateOptions
    public var virtualSize: UInt64

    /// qemu-img's "Formatting ..." line.
    public var line: String {
        var s = "Formatting '\(path)', fmt=\(options.format.rawValue)"
        if options.format == .qcow2 {
            s += " cluster_size=\(options.clusterSize)"
            if options.version == 2 { s += " compat=0.10" }
            s += " extended_l2=\(options.extendedL2 ? "on" : "off")"
            s += " compression_type=\(options.compressionType == 1 ? "zstd" : "zlib")"
        }
        s += " size=\(virtualSize)"
        if let backing = options.backingFile {
            s += " backing_file=\(backing)"
            if let format = options.backingFormat { s += " backing_fmt=\(format.rawValue)" }
        }
        if options.format == .qcow2 {
            if options.preallocation != .off { s += " preallocation=\(options.preallocation.rawValue)" }
            s += " lazy_refcounts=\(options.lazyRefcounts ? "on" : "off") refcount_bits=\(options.refcountBits)"
        }
        return s
    }
}

public enum ImageCreator {
    /// qemu's feature name table: names for every feature bit it knows, so that other tools can say
    /// which feature they do not support.
    static let featureNames: [(type: UInt8, bit: UInt8, name: String)] = [
        (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"), (0, 3, "compression type"),
        (0, 4, "extended L2 entries"), (1, 0, "lazy refcounts"), (2, 0, "bitmaps"), (2, 1, "raw external data"),
    ]

    static func featureNameTable() -> HeaderExtension {
        var data: [UInt8] = []
        for feature in featureNames {
            var entry = [feature.type, feature.bit] + Array(feature.name.utf8)
            entry += [UInt8](repeating: 0, count: 48 - entry.count)
            data += entry
        }
        return HeaderExtension(type: HeaderExtensionType.featureNameTable, data: data)
    }

    /// Cluster 0 of the new image.
    public static func header(options: CreateOptions, layout: CreateLayout) throws(ToolError) -> [UInt8] {
        var h = Header(version: options.version)
        h.clusterBits = UInt32(layout.clusterBits)
        h.size = layout.virtualSize
        h.l1Size = layout.l1Size
        h.l1TableOffset = layout.l1Offset
        h.refcountTableOffset = layout.reftableOffset
        h.refcountTableClusters = layout.reftableClusters
        if options.version == 3 {
            h.refcountOrder = UInt32(options.refcountBits.trailingZeroBitCount)
            h.headerLength = 112   // what qemu writes: the compression type byte plus padding
            h.compressionType = options.compressionType
            if options.compressionType != 0 { h.incompatibleFeatures |= FeatureBit.compressionType }
            if options.extendedL2 { h.incompatibleFeatures |= FeatureBit.extendedL2 }
            if options.lazyRefcounts { h.compatibleFeatures |= FeatureBit.lazyRefcounts }
        }
        // qemu's extension order: backing format, then the feature name table.
        if let format = options.backingFormat, options.backingFile != nil {
            h.extensions.append(HeaderExtension(type: HeaderExtensionType.backingFormat, data: Array(format.rawValue.utf8)))
        }
        h.backingFileName = options.backingFile
        let fixed = options.version == 3 ? Int(h.headerLength) : Header.version2Length
        func used(_ extensions: [HeaderExtension]) -> Int {
            fixed + extensions.reduce(0) { $0 + 8 + ($1.data.count + 7) / 8 * 8 } + 8
                + (options.backingFile?.utf8.count ?? 0)
        }
        if options.version == 3 && layout.clusterSize > 4096 {
            // The table only names features, and its 392 bytes would leave small clusters almost no
            // room for a backing file name; qemu leaves it out at 4K and below, and so do we.
            h.extensions.append(featureNameTable())
        }
        guard used(h.extensions) <= Int(layout.clusterSize) else {
            throw ToolError("the backing file name does not fit in the \(layout.clusterSize)-byte header cluster")
        }
        return h.encodeNew()
    }

    /// Writes a qcow2 image into `storage` (which must be empty).
    public static func writeQCow2(options: CreateOptions, layout: CreateLayout, to storage: ImageStorage) throws(ToolError) {
        let cs = layout.clusterSize
        try storage.write(try header(options: options, layout: layout), at: 0)
        // Refcount table: one entry per refcount block.
        var reftable = [UInt8](repeating: 0, count: Int(layout.reftableClusters) * Int(cs))
        for (i, offset) in layout.refblockOffsets.enumerated() { reftable.setBE64(offset, at: i * 8) }
        try storage.write(reftable, at: layout.reftableOffset)
        // Refcount blocks: clusters 0 ..< clusterCount have refcount 1, everything else 0.
        let order = options.refcountBits.trailingZeroBitCount
        let coverage = (cs * 8) >> UInt64(order)
        for (i, offset) in layout.refblockOffsets.enumerated() {
            var block = [UInt8](repeating: 0, count: Int(cs))
            let first = UInt64(i) * coverage
            let end = min(first + coverage, layout.clusterCount)
            if first < end {
                block.withUnsafeMutableBytes { buffer in
                    for cluster in first..<end {
                        RefcountEntry.set(buffer, index: Int(cluster - first), order: order, value: 1)
                    }
                }
            }
            try storage.write(block, at: offset)
        }
        // L1 (only up to its last entry, as qemu writes it) and, preallocated, the L2 tables.
        if layout.l1Size > 0 {
            var l1 = [UInt8](repeating: 0, count: Int(layout.l1Size) * 8)
            for (i, l2) in layout.l2Offsets.enumerated() { l1.setBE64(l2 | L2Entry.copied, at: i * 8) }
            try storage.write(l1, at: layout.l1Offset)
        }
        let entryWords = options.extendedL2 ? 2 : 1
        let entriesPerTable = UInt64(cs) / UInt64(8 * entryWords)
        for (table, l2) in layout.l2Offsets.enumerated() {
            var block = [UInt8](repeating: 0, count: Int(cs))
            let firstGuest = UInt64(table) * entriesPerTable
            let count = min(entriesPerTable, layout.dataClusters - min(firstGuest, layout.dataClusters))
            for j in 0..<count {
                let host = layout.dataOffset + (firstGuest + j) * cs
                // Extended L2: the subcluster bitmap stays 0 (allocated cluster, unallocated subclusters),
                // which is what qemu's metadata preallocation leaves.
                block.setBE64(host | L2Entry.copied, at: Int(j) * 8 * entryWords)
            }
            try storage.write(block, at: l2)
        }
        if try storage.length() < layout.fileLength { try storage.truncate(to: layout.fileLength) }
        try storage.sync()
    }

    /// Creates the image file at `path`. Refuses to replace an existing file unless `force`.
    @discardableResult
    public static func create(path: String, options requested: CreateOptions, force: Bool) throws(ToolError) -> CreateSummary {
        var options = requested
        try resolveBacking(path: path, options: &options)
        try options.validate()
        guard let requestedSize = options.size else {
            throw ToolError("a size is needed (it can only be left out with --backing)")
        }
        // qemu rounds the virtual size up to whole 512-byte sectors.
        let size = (requestedSize + 511) & ~511
        var layout: CreateLayout?
        if options.format == .qcow2 {
            let computed = try CreateLayout.compute(
                virtualSize: size, clusterBits: options.clusterSize.trailingZeroBitCount,
                refcountOrder: options.refcountBits.trailingZeroBitCount, extendedL2: options.extendedL2,
                preallocation: options.preallocation)
            _ = try header(options: options, layout: computed)   // a header that cannot fit fails before the file exists
            layout = computed
        }
        let storage = try FileStorage(path: path, mode: force ? .createOrTruncate : .createNew)
        do {
            if let layout {
                try writeQCow2(options: options, layout: layout, to: storage)
            } else {
                try storage.truncate(to: size)
                try storage.sync()
            }
        } catch {
            // A half-written image is worse than none.
            storage.close()
            unlink(path)
            throw error
        }
        storage.close()
        return CreateSummary(path: path, options: options, virtualSize: size)
    }

    /// Checks the backing file, takes its format from its magic when none was given (qcow2 only: a file
    /// without the magic could be anything, and guessing raw is how images leak host data), and takes
    /// its size when the new image has none.
    static func resolveBacking(path: String, options: inout CreateOptions) throws(ToolError) {
        guard let backing = options.backingFile, options.format == .qcow2 else { return }
        if backing.isEmpty { throw ToolError("the backing file name is empty") }
        let full = resolveBackingPath(backing, relativeTo: path)
        if full == path || backing == path {
            throw ToolError("the image cannot be its own backing file")
        }
        let storage: FileStorage
        do {
            storage = try FileStorage(path: full, mode: .readOnly)
        } catch {
            throw ToolError("could not open backing file '\(full)': \(error.message)")
        }
        defer { storage.close() }
        let detected = probedFormat(storage)
        if options.backingFormat == nil {
            guard detected == .qcow2 else {
                throw ToolError("backing file '\(full)' is not qcow2; say what it is with --backing-format (raw or qcow2)")
            }
            options.backingFormat = .qcow2
        }
        if options.backingFormat == .qcow2 && detected != .qcow2 {
            throw ToolError("backing file '\(full)' is not a qcow2 image")
        }
        if options.size == nil {
            switch options.backingFormat! {
            case .qcow2:
                // qemu sees a qcow2 disk in whole sectors (the header size rounded down).
                options.size = try ImageMetadata.open(storage, name: full, validate: false).header.size & ~511
            case .raw:
                options.size = (try storage.length() + 511) & ~511
            }
        }
    }
}
