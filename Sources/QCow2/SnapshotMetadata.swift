// Where an image's internal snapshots keep their metadata: the snapshot table and each snapshot's L1
// table. qnbd never changes snapshots, but a writable open must know these clusters: a hostile image
// that calls one free (refcount 0) would have it handed out for new data, and one that points an
// active L2 entry at it would have guest writes land on it.

public struct SnapshotMetadata: Sendable {
    public struct Extent: Sendable {
        public let offset: UInt64
        public let byteCount: UInt64
        public let owner: String
    }

    public private(set) var extents: [Extent] = []

    /// qemu's limits (QCOW_MAX_SNAPSHOTS, QCOW_MAX_SNAPSHOT_EXTRA_DATA, QCOW_MAX_SNAPSHOTS_SIZE).
    static let maximumSnapshots: UInt32 = 65536
    static let maximumExtraData: UInt32 = 1024
    static let maximumTableBytes: UInt64 = 64 << 20

    public init() {}

    /// Reads the table through `read(offset, count)` (bytes of the image file). Each entry: a 40-byte
    /// fixed part (L1 offset, L1 entries, id and name lengths, ..., extra data length), the extra data,
    /// the id, the name, padded to 8 bytes (docs/interop/qcow2.txt, "Snapshots").
    public init(header: Header, fileSize: UInt64,
                read: (UInt64, Int) throws(QCow2Error) -> [UInt8]) throws(QCow2Error) {
        let count = header.snapshotCount
        guard count > 0 else { return }
        guard count <= Self.maximumSnapshots else {
            throw QCow2Error("snapshot table", "\(count) snapshots exceed qemu's limit of \(Self.maximumSnapshots)")
        }
        let start = header.snapshotsOffset
        var offset = start
        for i in 0..<Int(count) {
            offset = (offset + 7) & ~7
            guard offset + 40 <= fileSize else {
                throw QCow2Error("snapshot table", "entry \(i) at \(hex(offset)) runs past the end of the file")
            }
            let fixed = try read(offset, 40)
            let l1Offset = fixed.be64(0)
            let l1Entries = UInt64(fixed.be32(8))
            let idLength = UInt64(fixed.be16(12))
            let nameLength = UInt64(fixed.be16(14))
            let extraLength = fixed.be32(36)
            guard extraLength <= Self.maximumExtraData else {
                throw QCow2Error("snapshot table", "entry \(i) has \(extraLength) bytes of extra data (limit 1024)")
            }
            offset += 40 + UInt64(extraLength) + idLength + nameLength
            guard offset - start <= Self.maximumTableBytes else {
                throw QCow2Error("snapshot table", "larger than qemu's 64 MiB limit")
            }
            guard l1Offset % header.clusterSize == 0, l1Entries * 8 <= 32 << 20,
                  l1Offset <= fileSize, l1Entries * 8 <= fileSize - l1Offset else {
                throw QCow2Error("snapshot \(i)", "L1 table at \(hex(l1Offset)) (\(l1Entries) entries) is invalid")
            }
            if l1Entries > 0 {
                extents.append(Extent(offset: l1Offset, byteCount: l1Entries * 8, owner: "the L1 table of snapshot \(i)"))
            }
        }
        extents.append(Extent(offset: start, byteCount: offset - start, owner: "the snapshot table"))
    }
}
