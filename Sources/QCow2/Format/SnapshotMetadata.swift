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

    public init() {}

    /// Reads the table (SnapshotTable) through `read`, refusing entries whose L1 table a server could
    /// not keep safe: misaligned, over qemu's L1 limit, or outside the file.
    public init(header: Header, fileSize: UInt64, read: MetadataRead) throws(QCow2Error) {
        guard header.snapshotCount > 0 else { return }
        let table = try SnapshotTable(header: header) { (offset, count) throws(QCow2Error) in
            guard offset <= fileSize, UInt64(count) <= fileSize - offset else {
                throw QCow2Error("snapshot table", "\(count) bytes at \(hex(offset)) run past the end of the file")
            }
            return try read(offset, count)
        }
        for (i, snapshot) in table.entries.enumerated() {
            let l1Offset = snapshot.l1TableOffset
            let l1Bytes = UInt64(snapshot.l1Size) * 8
            guard l1Offset % header.clusterSize == 0, l1Bytes <= QCow2Limits.l1Bytes,
                  l1Offset <= fileSize, l1Bytes <= fileSize - l1Offset else {
                throw QCow2Error("snapshot \(i)", "L1 table at \(hex(l1Offset)) (\(snapshot.l1Size) entries) is invalid")
            }
            if l1Bytes > 0 {
                extents.append(Extent(offset: l1Offset, byteCount: l1Bytes, owner: "the L1 table of snapshot \(i)"))
            }
        }
        extents.append(Extent(offset: header.snapshotsOffset, byteCount: table.byteCount, owner: "the snapshot table"))
    }
}
