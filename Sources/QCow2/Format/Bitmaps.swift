// The bitmaps extension (docs/interop/qcow2.txt, "Bitmaps extension" and "Bitmaps"): where the bitmap
// directory lives and what each entry says, validated once for every reader (`qnbd info`, `check`,
// `bitmap`, and the engine's open). qemu refuses to open an image whose directory breaks these rules,
// so qnbd refuses it too, naming the bitmap and the structure at fault.

/// One persistent dirty bitmap's directory entry, every field of it.
public struct BitmapEntry: Equatable, Sendable {
    public var name: String
    public var tableOffset: UInt64
    /// Entries of the bitmap table.
    public var tableSize: UInt32
    public var flags: UInt32
    /// 1: dirty tracking bitmap, the only type the spec defines.
    public var type: UInt8
    public var granularityBits: UInt8
    /// Extra data (kept byte for byte; qemu refuses entries that have any, see `validate`).
    public var extraData: [UInt8]

    /// The bitmap was in use (being changed) when the image was last closed: its bits cannot be trusted.
    public static let inUse: UInt32 = 1 << 0
    /// The bitmap tracks writes (enabled); without it the bitmap is kept as it is (disabled).
    public static let auto: UInt32 = 1 << 1
    /// Extra data may be ignored by readers that do not know it.
    public static let extraDataCompatible: UInt32 = 1 << 2
    /// Flags qemu knows; any other bit set makes qemu refuse the bitmap (BME_RESERVED_FLAGS).
    public static let knownFlags: UInt32 = inUse | auto
    public static let dirtyTrackingType: UInt8 = 1
    /// qemu's granularity limits (BME_MIN/MAX_GRANULARITY_BITS).
    public static let granularityBitsRange: ClosedRange<UInt8> = 9...31

    public init(name: String, tableOffset: UInt64 = 0, tableSize: UInt32 = 0, flags: UInt32 = 0,
                type: UInt8 = BitmapEntry.dirtyTrackingType, granularityBits: UInt8, extraData: [UInt8] = []) {
        self.name = name
        self.tableOffset = tableOffset
        self.tableSize = tableSize
        self.flags = flags
        self.type = type
        self.granularityBits = granularityBits
        self.extraData = extraData
    }

    public var granularity: UInt64 { 1 << UInt64(granularityBits) }
    public var isInUse: Bool { flags & Self.inUse != 0 }
    public var isEnabled: Bool { flags & Self.auto != 0 }

    /// Bits in the bitmap: one per granule of the virtual disk.
    public static func bitCount(virtualSize: UInt64, granularityBits: UInt8) -> UInt64 {
        let g = UInt64(1) << UInt64(granularityBits)
        return virtualSize / g + (virtualSize % g == 0 ? 0 : 1)
    }

    /// Entries the bitmap table needs: one per cluster of bitmap data.
    public static func tableEntries(virtualSize: UInt64, granularityBits: UInt8, clusterSize: UInt64) -> UInt64 {
        let bits = bitCount(virtualSize: virtualSize, granularityBits: granularityBits)
        let perCluster = clusterSize * 8
        return bits / perCluster + (bits % perCluster == 0 ? 0 : 1)
    }

    /// The entry as the directory stores it: fixed part, extra data, name, padded to 8 bytes.
    public func encoded() -> [UInt8] {
        let name = Array(self.name.utf8)
        let length = 24 + extraData.count + name.count
        var out = [UInt8](repeating: 0, count: (length + 7) & ~7)
        out.setBE64(tableOffset, at: 0)
        out.setBE32(tableSize, at: 8)
        out.setBE32(flags, at: 12)
        out[16] = type
        out[17] = granularityBits
        out.setBE16(UInt16(name.count), at: 18)
        out.setBE32(UInt32(extraData.count), at: 20)
        out.replaceSubrange(24..<(24 + extraData.count), with: extraData)
        out.replaceSubrange((24 + extraData.count)..<length, with: name)
        return out
    }
}

/// Bitmap table entries: the offset of a data cluster, or 0 with bit 0 saying all zeros (0) or all
/// ones (1).
public enum BitmapTableEntry {
    public static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    public static let reserved: UInt64 = 0xff00_0000_0000_01fe
    public static let allOnes: UInt64 = 1

    /// What one table entry says about its cluster of bits.
    public enum Kind: Equatable, Sendable {
        case allZeros
        case allOnes
        case data(UInt64)
    }

    /// Classifies `entry`; nil when it breaks the spec (reserved bits, bit 0 with an offset, a
    /// misaligned offset).
    public static func kind(_ entry: UInt64, clusterSize: UInt64) -> Kind? {
        guard entry & reserved == 0 else { return nil }
        let offset = entry & offsetMask
        if offset == 0 { return entry & allOnes != 0 ? .allOnes : .allZeros }
        guard entry & allOnes == 0, offset % clusterSize == 0 else { return nil }
        return .data(offset)
    }
}

public struct BitmapDirectory: Sendable {
    public let offset: UInt64
    public let byteCount: UInt64
    public let count: UInt32

    /// qemu's QCOW2_MAX_BITMAPS.
    public static let maximumBitmaps: UInt32 = 65535
    /// qemu's BME_MAX_NAME_SIZE.
    public static let maximumNameBytes = 1023
    /// qemu's BME_MAX_TABLE_SIZE and BME_MAX_PHYS_SIZE (a bitmap's bytes in memory).
    public static let maximumTableEntries: UInt32 = 0x800_0000
    public static let maximumBitmapBytes: UInt64 = 0x2000_0000
    /// The extension's length.
    public static let extensionBytes = 24

    /// The directory the extension names, when the image's bitmaps are valid (autoclear bit 0 set;
    /// otherwise qemu ignores the extension, and so does qnbd). Nil when there is none.
    public init?(header: Header) throws(QCow2Error) {
        guard header.autoclearFeatures & FeatureBit.bitmaps != 0,
              let ext = header.extensions.first(where: { $0.type == HeaderExtensionType.bitmaps }) else { return nil }
        guard ext.data.count == Self.extensionBytes else {
            throw QCow2Error("bitmaps extension", "\(ext.data.count) bytes, expected \(Self.extensionBytes)")
        }
        count = ext.data.be32(0)
        byteCount = ext.data.be64(8)
        offset = ext.data.be64(16)
        guard ext.data.be32(4) == 0 else { throw QCow2Error("bitmaps extension", "reserved field is not zero") }
        guard count > 0 else { throw QCow2Error("bitmaps extension", "names no bitmaps (nb_bitmaps is 0)") }
        guard count <= Self.maximumBitmaps else {
            throw QCow2Error("bitmaps extension", "\(count) bitmaps exceed qemu's limit of \(Self.maximumBitmaps)")
        }
        guard offset != 0, offset % header.clusterSize == 0 else {
            throw QCow2Error("bitmap directory", "offset \(hex(offset)) is not a cluster-aligned, non-zero offset")
        }
        guard byteCount >= UInt64(count) * 24, byteCount <= QCow2Limits.bitmapDirectoryBytes else {
            throw QCow2Error("bitmap directory", "size \(byteCount) is invalid for \(count) bitmaps")
        }
        guard offset <= UInt64(Int64.max) - byteCount else {
            throw QCow2Error("bitmap directory", "offset \(hex(offset)) lies beyond any file")
        }
    }

    /// The extension's bytes for a directory of `count` entries at `offset`.
    public static func extensionData(count: Int, offset: UInt64, byteCount: UInt64) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: extensionBytes)
        out.setBE32(UInt32(count), at: 0)
        out.setBE64(byteCount, at: 8)
        out.setBE64(offset, at: 16)
        return out
    }

    /// The directory's entries, parsed (each a 24-byte fixed part, extra data and the name, padded to 8
    /// bytes). Framing only; `BitmapValidation` judges the fields.
    public func entries(read: MetadataRead) throws(QCow2Error) -> [BitmapEntry] {
        let bytes = try read(offset, Int(byteCount))
        var entries: [BitmapEntry] = []
        var position = 0
        for i in 0..<Int(count) {
            guard position + 24 <= bytes.count else {
                throw QCow2Error("bitmap directory", "entry \(i) runs past the directory")
            }
            let nameLength = Int(bytes.be16(position + 18))
            let extraLength = Int(bytes.be32(position + 20))
            let end = position + 24 + extraLength + nameLength
            guard extraLength <= bytes.count, end <= bytes.count else {
                throw QCow2Error("bitmap directory", "entry \(i) runs past the directory")
            }
            let nameStart = position + 24 + extraLength
            guard let name = String(validating: bytes[nameStart..<end], as: UTF8.self) else {
                throw QCow2Error("bitmap directory", "entry \(i): name is not UTF-8")
            }
            entries.append(BitmapEntry(
                name: name, tableOffset: bytes.be64(position), tableSize: bytes.be32(position + 8),
                flags: bytes.be32(position + 12), type: bytes[position + 16], granularityBits: bytes[position + 17],
                extraData: Array(bytes[(position + 24)..<nameStart])))
            position = (end + 7) & ~7
        }
        if UInt64(position) != byteCount {
            throw QCow2Error("bitmap directory", "size \(byteCount) does not match its \(count) entries (\(position) bytes)")
        }
        return entries
    }
}
