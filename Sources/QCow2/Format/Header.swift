// The qcow2 header (cluster 0): fields, header extensions and the backing file name, parsed and
// validated before anything is served. Layout and rules: qemu/qemu docs/interop/qcow2.txt.
//
// Only fields the driver changes are ever rewritten, in place (feature bits, the refcount table
// pointer), so unknown fields below header_length and unknown extensions survive byte for byte without
// the driver having to re-encode them. `encodeNew` exists for `qnbd create`.

/// Feature bits qnbd knows, by the spec's names.
public enum FeatureBit {
    public static let dirty: UInt64 = 1 << 0                  // incompatible
    public static let corrupt: UInt64 = 1 << 1                // incompatible
    public static let externalDataFile: UInt64 = 1 << 2       // incompatible
    public static let compressionType: UInt64 = 1 << 3        // incompatible
    public static let extendedL2: UInt64 = 1 << 4             // incompatible
    public static let knownIncompatible: UInt64 = 0x1f
    public static let lazyRefcounts: UInt64 = 1 << 0          // compatible
    public static let bitmaps: UInt64 = 1 << 0                // autoclear
    public static let rawExternalData: UInt64 = 1 << 1        // autoclear
}

/// Header extension type numbers.
public enum HeaderExtensionType {
    public static let end: UInt32 = 0
    public static let backingFormat: UInt32 = 0xe279_2aca
    public static let featureNameTable: UInt32 = 0x6803_f857
    public static let bitmaps: UInt32 = 0x2385_2875
    public static let fullDiskEncryption: UInt32 = 0x0537_be77
    public static let externalDataFile: UInt32 = 0x4441_5441
}

public struct HeaderExtension: Equatable, Sendable {
    public var type: UInt32
    public var data: [UInt8]

    public init(type: UInt32, data: [UInt8]) {
        self.type = type
        self.data = data
    }
}

public struct Header: Equatable, Sendable {
    public static let magic: UInt32 = 0x5146_49fb   // "QFI\xfb"
    /// Bytes of the fixed part that every version has.
    public static let version2Length = 72
    public static let version3MinimumLength = 104

    public var version: UInt32
    public var backingFileOffset: UInt64
    public var backingFileSize: UInt32
    public var clusterBits: UInt32
    public var size: UInt64
    public var cryptMethod: UInt32
    public var l1Size: UInt32
    public var l1TableOffset: UInt64
    public var refcountTableOffset: UInt64
    public var refcountTableClusters: UInt32
    public var snapshotCount: UInt32
    public var snapshotsOffset: UInt64
    public var incompatibleFeatures: UInt64
    public var compatibleFeatures: UInt64
    public var autoclearFeatures: UInt64
    public var refcountOrder: UInt32
    public var headerLength: UInt32
    /// 0 deflate, 1 zstd.
    public var compressionType: UInt8
    public var extensions: [HeaderExtension]
    public var backingFileName: String?

    /// A fresh header with no tables yet, for tools that build images (`qnbd create`).
    public init(version: UInt32, clusterBits: UInt32 = 16, size: UInt64 = 0) {
        self.init(version: version, backingFileOffset: 0, backingFileSize: 0, clusterBits: clusterBits, size: size,
                  cryptMethod: 0, l1Size: 0, l1TableOffset: 0, refcountTableOffset: 0, refcountTableClusters: 0,
                  snapshotCount: 0, snapshotsOffset: 0, incompatibleFeatures: 0, compatibleFeatures: 0,
                  autoclearFeatures: 0, refcountOrder: 4,
                  headerLength: UInt32(version == 3 ? Self.version3MinimumLength : Self.version2Length),
                  compressionType: 0, extensions: [], backingFileName: nil)
    }

    init(version: UInt32, backingFileOffset: UInt64, backingFileSize: UInt32, clusterBits: UInt32, size: UInt64,
                 cryptMethod: UInt32, l1Size: UInt32, l1TableOffset: UInt64, refcountTableOffset: UInt64,
                 refcountTableClusters: UInt32, snapshotCount: UInt32, snapshotsOffset: UInt64,
                 incompatibleFeatures: UInt64, compatibleFeatures: UInt64, autoclearFeatures: UInt64,
                 refcountOrder: UInt32, headerLength: UInt32, compressionType: UInt8, extensions: [HeaderExtension],
                 backingFileName: String?) {
        self.version = version
        self.backingFileOffset = backingFileOffset
        self.backingFileSize = backingFileSize
        self.clusterBits = clusterBits
        self.size = size
        self.cryptMethod = cryptMethod
        self.l1Size = l1Size
        self.l1TableOffset = l1TableOffset
        self.refcountTableOffset = refcountTableOffset
        self.refcountTableClusters = refcountTableClusters
        self.snapshotCount = snapshotCount
        self.snapshotsOffset = snapshotsOffset
        self.incompatibleFeatures = incompatibleFeatures
        self.compatibleFeatures = compatibleFeatures
        self.autoclearFeatures = autoclearFeatures
        self.refcountOrder = refcountOrder
        self.headerLength = headerLength
        self.compressionType = compressionType
        self.extensions = extensions
        self.backingFileName = backingFileName
    }

    public var clusterSize: UInt64 { 1 << UInt64(clusterBits) }
    public var extendedL2: Bool { incompatibleFeatures & FeatureBit.extendedL2 != 0 }
    public var isDirty: Bool { incompatibleFeatures & FeatureBit.dirty != 0 }
    public var isCorrupt: Bool { incompatibleFeatures & FeatureBit.corrupt != 0 }
    public var lazyRefcounts: Bool { compatibleFeatures & FeatureBit.lazyRefcounts != 0 }

    /// The backing format from its extension ("qcow2", "raw"), if the image names one.
    public var backingFormat: String? {
        extensions.first { $0.type == HeaderExtensionType.backingFormat }
            .flatMap { String(validating: $0.data, as: UTF8.self) }
    }

    /// Feature names from the feature name table, for messages about unknown bits.
    public func featureName(type: UInt8, bit: UInt8) -> String? {
        guard let table = extensions.first(where: { $0.type == HeaderExtensionType.featureNameTable }) else { return nil }
        var i = 0
        while i + 48 <= table.data.count {
            if table.data[i] == type && table.data[i + 1] == bit {
                let name = table.data[(i + 2)..<(i + 48)].prefix { $0 != 0 }
                return String(decoding: name, as: UTF8.self)
            }
            i += 48
        }
        return nil
    }

    /// How many bytes of the file's start `parse` needs: the whole first cluster, which holds the header,
    /// its extensions and the backing file name. Call with the first 104 bytes (or fewer for a short file).
    public static func bytesNeeded(prefix: [UInt8]) -> Int {
        guard prefix.count >= 24, prefix.be32(0) == magic else { return 0 }
        let bits = prefix.be32(20)
        guard (9...21).contains(bits) else { return 0 }
        return 1 << Int(bits)
    }

    /// Parses cluster 0 (`bytes`, the first cluster or the whole file when shorter).
    public static func parse(_ bytes: [UInt8]) throws(QCow2Error) -> Header {
        guard bytes.count >= version2Length else {
            throw QCow2Error("header", "file is \(bytes.count) bytes, shorter than a qcow2 header")
        }
        guard bytes.be32(0) == magic else { throw QCow2Error("header", "bad magic (not a qcow2 image)") }
        let version = bytes.be32(4)
        guard version == 2 || version == 3 else {
            throw QCow2Error.unsupported("header", "version \(version) (qnbd reads versions 2 and 3)")
        }
        var h = Header(
            version: version, backingFileOffset: bytes.be64(8), backingFileSize: bytes.be32(16),
            clusterBits: bytes.be32(20), size: bytes.be64(24), cryptMethod: bytes.be32(32), l1Size: bytes.be32(36),
            l1TableOffset: bytes.be64(40), refcountTableOffset: bytes.be64(48), refcountTableClusters: bytes.be32(56),
            snapshotCount: bytes.be32(60), snapshotsOffset: bytes.be64(64), incompatibleFeatures: 0,
            compatibleFeatures: 0, autoclearFeatures: 0, refcountOrder: 4, headerLength: UInt32(version2Length),
            compressionType: 0, extensions: [], backingFileName: nil)
        guard (9...21).contains(h.clusterBits) else {
            throw QCow2Error("header", "cluster_bits \(h.clusterBits) outside 9...21 (512 B to 2 MiB clusters)")
        }
        if version == 3 {
            guard bytes.count >= version3MinimumLength else { throw QCow2Error("header", "v3 header truncated") }
            h.incompatibleFeatures = bytes.be64(72)
            h.compatibleFeatures = bytes.be64(80)
            h.autoclearFeatures = bytes.be64(88)
            h.refcountOrder = bytes.be32(96)
            h.headerLength = bytes.be32(100)
            guard h.headerLength >= UInt32(version3MinimumLength), h.headerLength % 8 == 0,
                  Int(h.headerLength) <= bytes.count, UInt64(h.headerLength) <= h.clusterSize else {
                throw QCow2Error("header", "header_length \(h.headerLength) invalid")
            }
            if h.headerLength > 104 { h.compressionType = bytes[104] }
        }
        // Extensions follow the header and end with type 0; each is padded to 8 bytes.
        var position = Int(h.headerLength)
        let limit = min(bytes.count, Int(h.clusterSize))
        var seen = Set<UInt32>()
        while position + 8 <= limit {
            let type = bytes.be32(position)
            let length = Int(bytes.be32(position + 4))
            if type == HeaderExtensionType.end { break }
            guard position + 8 + length <= limit else {
                throw QCow2Error("header extension \(hex(UInt64(type)))", "length \(length) runs past the first cluster")
            }
            guard seen.insert(type).inserted else {
                throw QCow2Error("header extension \(hex(UInt64(type)))", "appears twice")
            }
            h.extensions.append(HeaderExtension(type: type, data: Array(bytes[(position + 8)..<(position + 8 + length)])))
            position += 8 + (length + 7) / 8 * 8
        }
        if h.backingFileOffset != 0 {
            let start = Int(clamping: h.backingFileOffset)
            let length = Int(h.backingFileSize)
            guard length > 0, length <= 1023, start < limit, start + length <= limit else {
                throw QCow2Error("header", "backing file name at \(hex(h.backingFileOffset)) (\(length) bytes) is not inside the first cluster")
            }
            guard let name = String(validating: bytes[start..<(start + length)], as: UTF8.self) else {
                throw QCow2Error("header", "backing file name is not UTF-8")
            }
            h.backingFileName = name
        }
        return h
    }

    /// What qemu checks when it opens an image (qcow2_do_open), from the header alone. The tools refuse
    /// exactly this (and accept the rest, so that `qnbd check` can diagnose it); serving adds
    /// `validate(fileSize:writable:)`.
    public func validateOpenable() throws(QCow2Error) {
        let cluster = clusterSize
        if cryptMethod != 0 {
            throw .unsupported("header", "encrypted images (crypt_method \(cryptMethod)) are not supported")
        }
        let unknown = incompatibleFeatures & ~FeatureBit.knownIncompatible
        if unknown != 0 {
            let bit = UInt8(unknown.trailingZeroBitCount)
            let name = featureName(type: 0, bit: bit).map { " (\($0))" } ?? ""
            throw .unsupported("header", "unknown incompatible feature bit \(bit)\(name)")
        }
        if incompatibleFeatures & FeatureBit.externalDataFile != 0 {
            throw .unsupported("header", "images with an external data file are not supported")
        }
        if version == 2 && refcountOrder != 4 {
            throw QCow2Error("header", "version 2 image with refcount_order \(refcountOrder)")
        }
        guard refcountOrder <= 6 else { throw QCow2Error("header", "refcount_order \(refcountOrder) above 6") }
        let zstd = incompatibleFeatures & FeatureBit.compressionType != 0
        if zstd ? compressionType == 0 : compressionType != 0 {
            throw QCow2Error("header", "compression_type \(compressionType) disagrees with the compression type feature bit")
        }
        guard compressionType <= 1 else {
            throw .unsupported("header", "compression type \(compressionType) (qnbd reads deflate and zstd)")
        }
        if extendedL2 && clusterBits < 14 {
            throw QCow2Error("header", "extended L2 entries need clusters of 16 KiB or more")
        }
        // L1: within qemu's 32 MiB limit, aligned, and big enough for the virtual size.
        guard UInt64(l1Size) * 8 <= QCow2Limits.l1Bytes else {
            throw QCow2Error("L1 table", "\(l1Size) entries exceed 32 MiB")
        }
        // qemu (qcow2_validate_table) also refuses a table whose end would not fit in a signed 64-bit
        // file offset; readers would overflow computing it.
        func fitsInFile(_ offset: UInt64, _ bytes: UInt64) -> Bool { offset <= UInt64(Int64.max) - bytes }
        guard l1TableOffset % cluster == 0 else {
            throw QCow2Error("L1 table", "offset \(hex(l1TableOffset)) is not cluster aligned")
        }
        guard fitsInFile(l1TableOffset, UInt64(l1Size) * 8) else {
            throw QCow2Error("L1 table", "offset \(hex(l1TableOffset)) lies beyond any file")
        }
        let entryBytes: UInt64 = extendedL2 ? 16 : 8
        let coverage = cluster * (cluster / entryBytes)
        let needed = size / coverage + (size % coverage == 0 ? 0 : 1)
        guard UInt64(l1Size) >= needed else {
            throw QCow2Error("L1 table", "\(l1Size) entries cannot map a \(size)-byte disk (needs \(needed))")
        }
        guard refcountTableClusters > 0, UInt64(refcountTableClusters) * cluster <= QCow2Limits.refcountTableBytes else {
            throw QCow2Error("refcount table", "\(refcountTableClusters) clusters is outside 1 cluster ... 8 MiB")
        }
        guard refcountTableOffset % cluster == 0 else {
            throw QCow2Error("refcount table", "offset \(hex(refcountTableOffset)) is not a cluster-aligned, non-zero offset")
        }
        guard fitsInFile(refcountTableOffset, UInt64(refcountTableClusters) * cluster) else {
            throw QCow2Error("refcount table", "offset \(hex(refcountTableOffset)) lies beyond any file")
        }
        guard snapshotCount <= QCow2Limits.snapshots else {
            throw QCow2Error("snapshot table", "\(snapshotCount) snapshots exceed qemu's limit of \(QCow2Limits.snapshots)")
        }
        if snapshotCount > 0 && !fitsInFile(snapshotsOffset, UInt64(snapshotCount) * 40) {
            throw QCow2Error("snapshot table", "offset \(hex(snapshotsOffset)) lies beyond any file")
        }
        if snapshotCount > 0 && snapshotsOffset % cluster != 0 {
            throw QCow2Error("snapshot table", "offset \(hex(snapshotsOffset)) is not cluster aligned")
        }
    }

    /// Checks everything that can be checked without reading further metadata, before serving: qemu's
    /// open checks, plus bounds against the file (`fileSize`) and overlaps, so that no table read or
    /// write strays; `writable` adds the checks that only matter when qnbd will write.
    public func validate(fileSize: UInt64, writable: Bool) throws(QCow2Error) {
        try validateOpenable()
        let cluster = clusterSize
        guard size <= 1 << 62 else { throw QCow2Error("header", "virtual size \(size) is absurd") }
        guard l1Size == 0 || l1TableOffset != 0 else {
            throw QCow2Error("L1 table", "offset \(hex(l1TableOffset)) is not cluster aligned")
        }
        guard l1TableOffset <= fileSize, UInt64(l1Size) * 8 <= fileSize - l1TableOffset else {
            throw QCow2Error("L1 table", "\(l1Size) entries at \(hex(l1TableOffset)) run past the end of the file (\(fileSize) bytes)")
        }
        guard refcountTableOffset != 0 else {
            throw QCow2Error("refcount table", "offset \(hex(refcountTableOffset)) is not a cluster-aligned, non-zero offset")
        }
        guard refcountTableOffset <= fileSize + cluster,
              UInt64(refcountTableClusters) * cluster <= fileSize + cluster - refcountTableOffset else {
            throw QCow2Error("refcount table", "at \(hex(refcountTableOffset)) runs past the end of the file")
        }
        if snapshotCount > 0 {
            guard snapshotsOffset != 0, snapshotsOffset < fileSize else {
                throw QCow2Error("snapshot table", "offset \(hex(snapshotsOffset)) invalid")
            }
        }
        // Metadata must not overlap: header cluster, L1, refcount table.
        let header = 0..<cluster
        let l1 = l1TableOffset..<(l1TableOffset + max(UInt64(l1Size) * 8, 1))
        let reftable = refcountTableOffset..<(refcountTableOffset + UInt64(refcountTableClusters) * cluster)
        if l1Size > 0 && l1.overlaps(header) { throw QCow2Error("L1 table", "overlaps the header") }
        if reftable.overlaps(header) { throw QCow2Error("refcount table", "overlaps the header") }
        if l1Size > 0 && l1.overlaps(reftable) { throw QCow2Error("L1 table", "overlaps the refcount table") }
        if writable && isCorrupt {
            throw .unsupported("header", "the image is marked corrupt; it can only be served read-only (repair it with `qemu-img check -r all`)")
        }
    }

    /// The 8 feature bytes at their offsets, for in-place rewrites.
    public static let incompatibleFeaturesOffset: UInt64 = 72
    public static let autoclearFeaturesOffset: UInt64 = 88
    public static let refcountTableFieldsOffset: UInt64 = 48

    /// Encodes a fresh header with its extensions and backing name into one cluster (qnbd create).
    public func encodeNew() -> [UInt8] {
        var out = [UInt8](repeating: 0, count: Int(clusterSize))
        out.setBE32(Self.magic, at: 0)
        out.setBE32(version, at: 4)
        out.setBE32(backingFileSize, at: 16)
        out.setBE32(clusterBits, at: 20)
        out.setBE64(size, at: 24)
        out.setBE32(cryptMethod, at: 32)
        out.setBE32(l1Size, at: 36)
        out.setBE64(l1TableOffset, at: 40)
        out.setBE64(refcountTableOffset, at: 48)
        out.setBE32(refcountTableClusters, at: 56)
        out.setBE32(snapshotCount, at: 60)
        out.setBE64(snapshotsOffset, at: 64)
        var position = Self.version2Length
        if version == 3 {
            out.setBE64(incompatibleFeatures, at: 72)
            out.setBE64(compatibleFeatures, at: 80)
            out.setBE64(autoclearFeatures, at: 88)
            out.setBE32(refcountOrder, at: 96)
            out.setBE32(headerLength, at: 100)
            if headerLength > 104 { out[104] = compressionType }
            position = Int(headerLength)
        }
        for e in extensions {
            out.setBE32(e.type, at: position)
            out.setBE32(UInt32(e.data.count), at: position + 4)
            for (i, b) in e.data.enumerated() { out[position + 8 + i] = b }
            position += 8 + (e.data.count + 7) / 8 * 8
        }
        position += 8   // end-of-extensions marker (type 0, length 0)
        if let name = backingFileName {
            let bytes = Array(name.utf8)
            for (i, b) in bytes.enumerated() { out[position + i] = b }
            out.setBE64(UInt64(position), at: 8)
            out.setBE32(UInt32(bytes.count), at: 16)
        }
        return out
    }
}
