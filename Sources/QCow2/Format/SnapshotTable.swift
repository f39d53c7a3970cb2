// The snapshot table (docs/interop/qcow2.txt, "Snapshots"): one parser for `qnbd info`, `qnbd check`
// and the writable open, with qemu's limits from QCow2Limits. Each entry: a 40-byte fixed part (L1
// offset, L1 entries, id and name lengths, dates, VM state size, extra data length), the extra data,
// the id, the name, padded to 8 bytes; the last entry is not padded (qcow2_read_snapshots).

/// One internal snapshot.
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

public struct SnapshotTable: Sendable {
    public private(set) var entries: [Snapshot] = []
    /// Bytes from the table's start to the end of its last entry.
    public private(set) var byteCount: UInt64 = 0

    public init() {}

    /// Parses the table the header points to. Refuses what qemu refuses at open: too many snapshots,
    /// a misaligned table, too much extra data, a table over 64 MiB. What an entry points to (its L1
    /// table) is left to the caller: `qnbd check` reports it, a writable open refuses it.
    public init(header: Header, read: MetadataRead) throws(QCow2Error) {
        let count = header.snapshotCount
        guard count > 0 else { return }
        guard count <= QCow2Limits.snapshots else {
            throw QCow2Error("snapshot table", "\(count) snapshots exceed qemu's limit of \(QCow2Limits.snapshots)")
        }
        let start = header.snapshotsOffset
        guard start % header.clusterSize == 0 else {
            throw QCow2Error("snapshot table", "offset \(hex(start)) is not cluster aligned")
        }
        var offset = start
        for i in 0..<Int(count) {
            offset = (offset + 7) & ~7
            let fixed = try read(offset, 40)
            let idLength = Int(fixed.be16(12))
            let nameLength = Int(fixed.be16(14))
            let extraLength = fixed.be32(36)
            guard extraLength <= QCow2Limits.snapshotExtraData else {
                throw QCow2Error("snapshot table", "entry \(i) has \(extraLength) bytes of extra data (qemu's limit is 1024)")
            }
            offset += 40
            let extra = try read(offset, Int(extraLength))
            offset += UInt64(extraLength)
            let id = try read(offset, idLength)
            offset += UInt64(idLength)
            let name = try read(offset, nameLength)
            offset += UInt64(nameLength)
            guard offset - start <= QCow2Limits.snapshotTableBytes else {
                throw QCow2Error("snapshot table", "larger than qemu's 64 MiB limit")
            }
            var snapshot = Snapshot(
                id: String(decoding: id, as: UTF8.self), name: String(decoding: name, as: UTF8.self),
                l1TableOffset: fixed.be64(0), l1Size: fixed.be32(8), dateSeconds: fixed.be32(16),
                dateNanoseconds: fixed.be32(20), vmClockNanoseconds: fixed.be64(24),
                vmStateSize: UInt64(fixed.be32(32)), icount: nil)
            if extraLength >= 8 { snapshot.vmStateSize = extra.be64(0) }
            if extraLength >= 24 {
                let icount = extra.be64(16)
                snapshot.icount = icount == UInt64.max ? nil : icount
            }
            entries.append(snapshot)
        }
        byteCount = offset - start
    }
}
