// The bitmaps extension (docs/interop/qcow2.txt, "Bitmaps extension" and "Bitmaps"): where the bitmap
// directory lives and what each entry says. This is the format layer's home for persistent dirty
// bitmaps; qnbd reads the directory (for `qnbd info` and for `qnbd check` to count the bitmaps'
// clusters) but does not maintain bitmaps yet, so the writable open clears the autoclear bit.

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

/// Bitmap table entries: the offset of a data cluster (0: all zeros or all ones, by bit 0).
public enum BitmapTableEntry {
    public static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    public static let reserved: UInt64 = 0xff00_0000_0000_01fe
}

public struct BitmapDirectory: Sendable {
    public let offset: UInt64
    public let byteCount: UInt64
    public let count: UInt32

    /// The directory the extension names, when the image's bitmaps are valid (autoclear bit 0 set;
    /// otherwise qemu ignores the extension, and so does qnbd). Nil when there is none.
    public init?(header: Header) throws(QCow2Error) {
        guard header.autoclearFeatures & FeatureBit.bitmaps != 0,
              let ext = header.extensions.first(where: { $0.type == HeaderExtensionType.bitmaps }) else { return nil }
        guard ext.data.count >= 24 else {
            throw QCow2Error("bitmaps extension", "\(ext.data.count) bytes, expected 24")
        }
        count = ext.data.be32(0)
        byteCount = ext.data.be64(8)
        offset = ext.data.be64(16)
        guard count > 0 else { return nil }
        guard offset % header.clusterSize == 0, byteCount <= QCow2Limits.bitmapDirectoryBytes else {
            throw QCow2Error("bitmaps extension", "directory at \(hex(offset, .alternate)) (\(byteCount) bytes) is invalid")
        }
    }

    /// The directory's entries: each a 24-byte fixed part, extra data and the name, padded to 8 bytes.
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
            guard end <= bytes.count else { throw QCow2Error("bitmap directory", "entry \(i) runs past the directory") }
            let nameStart = position + 24 + extraLength
            entries.append(BitmapEntry(
                name: String(decoding: bytes[nameStart..<end], as: UTF8.self), tableOffset: bytes.be64(position),
                tableSize: bytes.be32(position + 8), flags: bytes.be32(position + 12),
                granularityBits: bytes[position + 17]))
            position = (end + 7) & ~7
        }
        return entries
    }
}
