// Persistent dirty bitmaps as the protocol layer sees them: which a device keeps, and which parts of
// the disk each one marks dirty. Only qcow2 keeps them; everything else has none.
//
// This is the seam between the qcow2 driver, which owns the live bits (loaded at open, marked by
// every write, zero and trim, stored at close), and the connection, which answers NBD_CMD_BLOCK_STATUS
// for a `qemu:dirty-bitmap:NAME` meta context (qemu's docs/interop/nbd.rst).

/// One persistent bitmap of a device, as it was when the device opened.
public struct DirtyBitmapInfo: Equatable, Sendable {
    /// The bitmap's name in the image (what follows `qemu:dirty-bitmap:`).
    public var name: String
    /// Bytes of disk per bit; a power of two, at least 512.
    public var granularity: UInt64
    /// An enabled bitmap records every write from now on; a disabled one is a frozen picture.
    public var enabled: Bool
    /// The bitmap was marked in use when the image was opened (the last writer did not store it), so
    /// its bits cannot be trusted; it is not served.
    public var inconsistent: Bool

    public init(name: String, granularity: UInt64, enabled: Bool, inconsistent: Bool) {
        self.name = name
        self.granularity = granularity
        self.enabled = enabled
        self.inconsistent = inconsistent
    }
}

/// A device that keeps persistent dirty bitmaps.
public protocol DirtyBitmapDevice: BlockDevice {
    /// The image's bitmaps in directory order, fixed for the life of the device.
    var dirtyBitmaps: [DirtyBitmapInfo] { get }
    /// Completes with `.extents` covering a prefix of `offset ..< offset + length` (never empty, never
    /// past the range), each run at the bitmap's granularity with `flags.rawValue` 1 where the bitmap
    /// is dirty (NBD_STATE_DIRTY of the `qemu:dirty-bitmap:` context) and 0 where it is clean, and
    /// `depth` 0. Writes completed before the call are reflected. A `name` that
    /// `dirtyBitmaps.servableIndex(named:)` does not find fails with `BlockError.invalid`.
    func dirtyBitmapStatus(name: String, offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler)
}

extension Array where Element == DirtyBitmapInfo {
    /// The index of the bitmap called `name` if status queries may read it: it exists and is not
    /// inconsistent. The one statement of that rule, for the driver and for a proxy on another loop
    /// (which decides from its copy of the list and sends the index).
    public func servableIndex(named name: String) -> Int? {
        guard let index = firstIndex(where: { $0.name == name }), !self[index].inconsistent else { return nil }
        return index
    }
}
