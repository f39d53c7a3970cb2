// Opening an image for the offline tools and reading its metadata: format probing, the qcow2 header,
// L1/L2 tables, the refcount structure, the snapshot table and the bitmap directory. Everything is read
// on demand with blocking reads; nothing here writes.

import QCow2

/// Image formats the tools understand.
public enum ImageFormat: String, Sendable {
    case qcow2
    case raw
}

/// qemu's cluster types (qcow2_get_cluster_type), which check and map classify entries by.
public enum ClusterType: Equatable, Sendable {
    case unallocated, zeroPlain, zeroAllocated, normal, compressed
}

/// qemu's subcluster types (qcow2_get_subcluster_type); without extended L2 a cluster is one subcluster.
public enum SubclusterType: Equatable, Sendable {
    case unallocatedPlain, unallocatedAllocated, zeroPlain, zeroAllocated, normal, compressed, invalid
}

/// qemu's masks (block/qcow2.h), named as there.
public enum QCow2Mask {
    public static let l1Offset: UInt64 = 0x00ff_ffff_ffff_fe00
    public static let l1Reserved: UInt64 = 0x7f00_0000_0000_01ff
    public static let l2Offset: UInt64 = 0x00ff_ffff_ffff_fe00
    public static let l2StandardReserved: UInt64 = 0x3f00_0000_0000_01fe
    public static let reftableOffset: UInt64 = 0xffff_ffff_ffff_fe00
    public static let reftableReserved: UInt64 = 0x1ff
    public static let copied: UInt64 = 1 << 63
    public static let compressed: UInt64 = 1 << 62
    public static let zero: UInt64 = 1
    public static let allSubclustersAllocated: UInt64 = 0xffff_ffff
    /// Bitmap table entries (docs/interop/qcow2.txt, "Bitmaps").
    public static let bitmapTableOffset: UInt64 = 0x00ff_ffff_ffff_fe00
    public static let bitmapTableReserved: UInt64 = 0xff00_0000_0000_01fe
}

/// qemu's limits on table sizes; an image beyond them does not open in qemu either.
enum QCow2Limit {
    static let l1Bytes: UInt64 = 32 << 20
    static let reftableBytes: UInt64 = 8 << 20
    static let snapshots: UInt32 = 65536
    static let snapshotExtraData: UInt32 = 1024
}

/// One internal snapshot (docs/interop/qcow2.txt, "Snapshots").
public struct Snapshot: Equatable, Sendable {
    public var id: String
    public var name: String
    public var l1TableOffset: UInt64
    public var l1Size: UInt32
    public var dateSeconds: UInt32
    public var dateNanoseconds: UInt32
    public var vmClockNanoseconds: UInt64
    public var vmStateSize: UInt64
    /// From the extra data; nil when the entry does not record it.
    public var icount: UInt64?
}

/// One persistent dirty bitmap's directory entry.
public struct BitmapEntry: Equatable, Sendable {
    public var name: String
    public var tableOffset: UInt64
    public var tableSize: UInt32
    public var flags: UInt32
    public var granularityBits: UInt8

    public static let inUse: UInt32 = 1 << 0
    public static let auto: UInt32 = 1 << 1
}

/// Reads the first bytes and decides the format the way qemu probes: the qcow2 magic, else raw.
public func probeFormat(_ storage: ImageStorage) throws(ToolError) -> ImageFormat {
    let magic = try storage.read(at: 0, count: 4)
    return magic == [0x51, 0x46, 0x49, 0xfb] ? .qcow2 : .raw
}

/// An opened qcow2 image: header, geometry and readers for its tables.
public final class QCow2Image {
    public let storage: ImageStorage
    public let header: Header
    public let geometry: Geometry
    /// The file length when opened.
    public let fileLength: UInt64
    private var refblockCache: [UInt64: [UInt8]] = [:]
    private var lastRefblock: (offset: UInt64, bytes: [UInt8]) = (0, [])
    private var reftableCache: [UInt64]?

    public init(storage: ImageStorage, name: String) throws(ToolError) {
        self.storage = storage
        fileLength = try storage.length()
        let prefix = try storage.read(at: 0, count: Header.version3MinimumLength)
        let needed = Header.bytesNeeded(prefix: prefix)
        let bytes = needed > 0 ? try storage.read(at: 0, count: needed) : prefix
        let parsed: Header
        do {
            parsed = try Header.parse(Array(bytes.prefix(max(Int(fileLength), Header.version2Length))))
        } catch {
            throw ToolError("could not open '\(name)': \(error)")
        }
        header = parsed
        geometry = Geometry(header: parsed)
    }

    public var clusterSize: UInt64 { geometry.clusterSize }

    /// What qemu checks when it opens an image (qcow2_do_open): the tools refuse what qemu refuses,
    /// and accept the rest so that check can diagnose it.
    public func validateForOpen(name: String) throws(ToolError) {
        let h = header
        let cs = clusterSize
        func refuse(_ why: String) -> ToolError { ToolError("could not open '\(name)': \(why)") }
        if h.cryptMethod != 0 { throw refuse("encrypted images are not supported") }
        let unknown = h.incompatibleFeatures & ~FeatureBit.knownIncompatible
        if unknown != 0 { throw refuse("unsupported incompatible feature bits \(hexString(unknown))") }
        if h.incompatibleFeatures & FeatureBit.externalDataFile != 0 {
            throw refuse("images with an external data file are not supported")
        }
        if h.refcountOrder > 6 { throw refuse("refcount_order \(h.refcountOrder) is above 6") }
        if h.compressionType > 1 { throw refuse("unknown compression type \(h.compressionType)") }
        if (h.compressionType != 0) != (h.incompatibleFeatures & FeatureBit.compressionType != 0) {
            throw refuse("compression type \(h.compressionType) disagrees with the compression type feature bit")
        }
        if geometry.extendedL2 && h.clusterBits < 14 {
            throw refuse("extended L2 entries need clusters of 16 KiB or more")
        }
        if UInt64(h.l1Size) * 8 > QCow2Limit.l1Bytes { throw refuse("active L1 table too large") }
        if h.l1TableOffset % cs != 0 { throw refuse("active L1 table offset invalid") }
        let needed = (h.size + geometry.l2Coverage - 1) / geometry.l2Coverage
        if UInt64(h.l1Size) < needed { throw refuse("L1 table is too small") }
        if UInt64(h.refcountTableClusters) * cs > QCow2Limit.reftableBytes || h.refcountTableClusters == 0 {
            throw refuse("reference count table too large")
        }
        if h.refcountTableOffset % cs != 0 { throw refuse("reference count table offset invalid") }
        if h.snapshotCount > QCow2Limit.snapshots { throw refuse("too many snapshots") }
        if h.snapshotCount > 0 && h.snapshotsOffset % cs != 0 { throw refuse("snapshot table offset invalid") }
    }

    /// The refcount table's entry count (qemu's refcount_table_size).
    public var reftableEntries: Int { Int(header.refcountTableClusters) * Int(clusterSize) / 8 }

    /// Reads `count` big-endian 64-bit words at `offset`.
    public func readWords(at offset: UInt64, count: Int) throws(ToolError) -> [UInt64] {
        let bytes = try storage.read(at: offset, count: count * 8)
        var words = [UInt64](repeating: 0, count: count)
        for i in 0..<count { words[i] = bytes.readBE64(i * 8) }
        return words
    }

    public func l1Table() throws(ToolError) -> [UInt64] {
        try readWords(at: header.l1TableOffset, count: Int(header.l1Size))
    }

    /// An L2 table as raw words: one per entry, or two (entry, bitmap) with extended L2.
    public func l2Table(at offset: UInt64) throws(ToolError) -> [UInt64] {
        try readWords(at: offset, count: Int(clusterSize / 8))
    }

    public func reftable() throws(ToolError) -> [UInt64] {
        if let reftableCache { return reftableCache }
        let table = try readWords(at: header.refcountTableOffset, count: reftableEntries)
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
        let block = table[index] & QCow2Mask.reftableOffset
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
            bytes = try storage.read(at: offset, count: Int(clusterSize))
            refblockCache[offset] = bytes
        }
        lastRefblock = (offset, bytes)
        return bytes
    }

    /// qemu's qcow2_get_cluster_type.
    public func clusterType(_ entry: UInt64) -> ClusterType {
        if entry & QCow2Mask.compressed != 0 { return .compressed }
        if entry & QCow2Mask.zero != 0 && !geometry.extendedL2 {
            return entry & QCow2Mask.l2Offset != 0 ? .zeroAllocated : .zeroPlain
        }
        return entry & QCow2Mask.l2Offset == 0 ? .unallocated : .normal
    }

    /// qemu's qcow2_get_subcluster_type.
    public func subclusterType(_ entry: UInt64, bitmap: UInt64, index: Int) -> SubclusterType {
        let type = clusterType(entry)
        guard geometry.extendedL2 else {
            switch type {
            case .compressed: return .compressed
            case .zeroPlain: return .zeroPlain
            case .zeroAllocated: return .zeroAllocated
            case .normal: return .normal
            case .unallocated: return .unallocatedPlain
            }
        }
        switch type {
        case .compressed: return .compressed
        case .normal:
            if (bitmap >> 32) & bitmap != 0 { return .invalid }
            if bitmap & (1 << UInt64(32 + index)) != 0 { return .zeroAllocated }
            if bitmap & (1 << UInt64(index)) != 0 { return .normal }
            return .unallocatedAllocated
        case .unallocated:
            if bitmap & QCow2Mask.allSubclustersAllocated != 0 { return .invalid }
            return bitmap & (1 << UInt64(32 + index)) != 0 ? .zeroPlain : .unallocatedPlain
        case .zeroPlain, .zeroAllocated:
            return .invalid   // not produced with extended L2: bit 0 is not a zero flag there
        }
    }

    /// The host byte range of a compressed cluster (qcow2_parse_compressed_l2_entry).
    public func compressedRange(_ entry: UInt64) -> (offset: UInt64, length: UInt64) {
        let shift = UInt64(geometry.compressedOffsetBits)
        let offset = entry & ((1 << shift) - 1)
        let sectorMask: UInt64 = (1 << UInt64(geometry.clusterBits - 8)) - 1
        let sectors = ((entry >> shift) & sectorMask) + 1
        return (offset, sectors * 512 - (offset & 511))
    }

    // MARK: - Snapshots

    /// The snapshot table and its size in bytes (qcow2_read_snapshots; the last entry is not padded).
    public func snapshots() throws(ToolError) -> (entries: [Snapshot], byteSize: UInt64) {
        let count = header.snapshotCount
        guard count > 0 else { return ([], 0) }
        guard count <= QCow2Limit.snapshots else {
            throw ToolError("snapshot table: \(count) snapshots exceed qemu's limit of \(QCow2Limit.snapshots)")
        }
        guard header.snapshotsOffset % clusterSize == 0 else {
            throw ToolError("snapshot table: offset \(hexString(header.snapshotsOffset)) is not cluster aligned")
        }
        var entries: [Snapshot] = []
        var offset = header.snapshotsOffset
        for i in 0..<Int(count) {
            offset = (offset + 7) & ~7
            let fixed = try storage.read(at: offset, count: 40)
            let idLength = Int(fixed.readBE16(12))
            let nameLength = Int(fixed.readBE16(14))
            let extraLength = fixed.readBE32(36)
            guard extraLength <= QCow2Limit.snapshotExtraData else {
                throw ToolError("snapshot table: entry \(i) has \(extraLength) bytes of extra data (qemu's limit is 1024)")
            }
            offset += 40
            let extra = try storage.read(at: offset, count: Int(extraLength))
            offset += UInt64(extraLength)
            let id = try storage.read(at: offset, count: idLength)
            offset += UInt64(idLength)
            let name = try storage.read(at: offset, count: nameLength)
            offset += UInt64(nameLength)
            guard offset - header.snapshotsOffset <= 64 << 20 else {
                throw ToolError("snapshot table: larger than qemu's 64 MiB limit")
            }
            var snapshot = Snapshot(
                id: String(decoding: id, as: UTF8.self), name: String(decoding: name, as: UTF8.self),
                l1TableOffset: fixed.readBE64(0), l1Size: fixed.readBE32(8), dateSeconds: fixed.readBE32(16),
                dateNanoseconds: fixed.readBE32(20), vmClockNanoseconds: fixed.readBE64(24),
                vmStateSize: UInt64(fixed.readBE32(32)), icount: nil)
            if extraLength >= 8 { snapshot.vmStateSize = extra.readBE64(0) }
            if extraLength >= 24 {
                let icount = extra.readBE64(16)
                snapshot.icount = icount == UInt64.max ? nil : icount
            }
            entries.append(snapshot)
        }
        return (entries, offset - header.snapshotsOffset)
    }

    // MARK: - Bitmaps

    /// The bitmaps extension's directory location, when the image's bitmaps are valid (autoclear bit 0
    /// set; otherwise qemu ignores the extension, and so do the tools).
    public func bitmapDirectory() throws(ToolError) -> (offset: UInt64, size: UInt64, count: UInt32)? {
        guard header.autoclearFeatures & FeatureBit.bitmaps != 0,
              let ext = header.extensions.first(where: { $0.type == HeaderExtensionType.bitmaps }) else { return nil }
        guard ext.data.count >= 24 else { throw ToolError("bitmaps extension: \(ext.data.count) bytes, expected 24") }
        let count = ext.data.readBE32(0)
        let size = ext.data.readBE64(8)
        let offset = ext.data.readBE64(16)
        guard count > 0 else { return nil }
        guard offset % clusterSize == 0, size <= 64 << 20 else {
            throw ToolError("bitmaps extension: directory at \(hexString(offset)) (\(size) bytes) is invalid")
        }
        return (offset, size, count)
    }

    public func bitmaps() throws(ToolError) -> [BitmapEntry] {
        guard let directory = try bitmapDirectory() else { return [] }
        let bytes = try storage.read(at: directory.offset, count: Int(directory.size))
        var entries: [BitmapEntry] = []
        var position = 0
        for i in 0..<Int(directory.count) {
            guard position + 24 <= bytes.count else {
                throw ToolError("bitmap directory: entry \(i) runs past the directory")
            }
            let nameLength = Int(bytes.readBE16(position + 18))
            let extraLength = Int(bytes.readBE32(position + 20))
            let end = position + 24 + extraLength + nameLength
            guard end <= bytes.count else { throw ToolError("bitmap directory: entry \(i) runs past the directory") }
            let nameStart = position + 24 + extraLength
            entries.append(BitmapEntry(
                name: String(decoding: bytes[nameStart..<end], as: UTF8.self), tableOffset: bytes.readBE64(position),
                tableSize: bytes.readBE32(position + 8), flags: bytes.readBE32(position + 12),
                granularityBits: bytes[position + 17]))
            position = (end + 7) & ~7
        }
        return entries
    }
}

/// "0x1f000" as qemu's %#x prints it ("0" for zero).
public func hexString(_ value: UInt64) -> String {
    value == 0 ? "0" : "0x" + String(value, radix: 16)
}

extension Array where Element == UInt8 {
    func readBE16(_ at: Int) -> UInt16 { UInt16(self[at]) << 8 | UInt16(self[at + 1]) }

    func readBE32(_ at: Int) -> UInt32 {
        UInt32(self[at]) << 24 | UInt32(self[at + 1]) << 16 | UInt32(self[at + 2]) << 8 | UInt32(self[at + 3])
    }

    func readBE64(_ at: Int) -> UInt64 { UInt64(readBE32(at)) << 32 | UInt64(readBE32(at + 4)) }

    mutating func putBE32(_ value: UInt32, at: Int) {
        for i in 0..<4 { self[at + i] = UInt8(truncatingIfNeeded: value >> (24 - 8 * UInt32(i))) }
    }

    mutating func putBE64(_ value: UInt64, at: Int) {
        for i in 0..<8 { self[at + i] = UInt8(truncatingIfNeeded: value >> (56 - 8 * UInt64(i))) }
    }
}
