// qemu's limits on qcow2 tables (block/qcow2.h). An image beyond them does not open in qemu, so qnbd
// refuses it too, in the server and in the tools alike: this is the one table of them.

public enum QCow2Limits {
    /// QCOW_MAX_L1_SIZE: an L1 table (active or a snapshot's).
    public static let l1Bytes: UInt64 = 32 << 20
    /// QCOW_MAX_REFTABLE_SIZE.
    public static let refcountTableBytes: UInt64 = 8 << 20
    /// QCOW_MAX_SNAPSHOTS.
    public static let snapshots: UInt32 = 65536
    /// QCOW_MAX_SNAPSHOT_EXTRA_DATA.
    public static let snapshotExtraData: UInt32 = 1024
    /// QCOW_MAX_SNAPSHOTS_SIZE: the whole snapshot table.
    public static let snapshotTableBytes: UInt64 = 64 << 20
    /// QCOW2_MAX_BITMAP_DIRECTORY_SIZE.
    public static let bitmapDirectoryBytes: UInt64 = 64 << 20
    /// Longest backing file name (qemu's 1023).
    public static let backingFileNameBytes = 1023
}
