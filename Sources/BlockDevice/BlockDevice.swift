// The seam between the NBD protocol layer and the image formats.
//
// A driver is loop-confined: every method is called on the event-loop thread and every completion is
// delivered on it too. A completion may arrive from inside the call that started the operation (a
// page-cache hit is answered inline, without a thread hand-off), so callers must not hold state across
// the call that the completion could invalidate. Requests are identified by a caller-chosen `tag`;
// completions go to a handler object instead of a closure so that the hot path allocates nothing per
// request.

/// Receives the outcome of operations started on a `BlockDevice`.
public protocol BlockIOHandler: AnyObject {
    /// The operation started with `tag` finished. Called exactly once per operation, on the loop thread.
    func blockIOCompleted(tag: UInt64, outcome: BlockOutcome)
}

/// What a finished operation produced.
public enum BlockOutcome: Sendable {
    /// A write, zero, trim, flush or cache request finished.
    case done
    /// A read filled the whole buffer. `zeroRanges` lists sub-ranges (relative to the read's offset,
    /// sorted, disjoint) that the driver knows to read as zeros; the buffer holds zeros there too, so a
    /// caller that ignores the list is still correct. Empty for drivers that do not know.
    case read(zeroRanges: [Range<UInt64>])
    /// Block-status extents covering a prefix (at least one byte) of the asked range, in order.
    case extents([Extent])
    case failed(BlockError)
}

/// One run of equal allocation state, as reported by `blockStatus`.
public struct Extent: Equatable, Sendable {
    public var length: UInt64
    public var flags: ExtentFlags
    /// Which layer of a backing chain holds the range: 1 this device, 2 its backing image, and so on;
    /// 0 only when no layer holds it (an unallocated qcow2 entry with nothing below). A device without
    /// layers of its own holds every byte of itself, holes included (a raw file's hole is that file's
    /// zeros, as qemu counts it), so it answers 1 everywhere and an image above it adds its own depth
    /// without knowing what kind of device it sits on.
    public var depth: UInt32

    public init(length: UInt64, flags: ExtentFlags, depth: UInt32) {
        self.length = length
        self.flags = flags
        self.depth = depth
    }
}

/// base:allocation flags, bit for bit as NBD defines them.
public struct ExtentFlags: OptionSet, Equatable, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// NBD_STATE_HOLE: no storage is allocated.
    public static let hole = ExtentFlags(rawValue: 1 << 0)
    /// NBD_STATE_ZERO: reads return zeros.
    public static let zero = ExtentFlags(rawValue: 1 << 1)
}

/// Options of a write-zeroes request.
public struct ZeroOptions: OptionSet, Sendable {
    public let rawValue: UInt8
    public init(rawValue: UInt8) { self.rawValue = rawValue }
    /// Keep the range allocated (NBD_CMD_FLAG_NO_HOLE).
    public static let noHole = ZeroOptions(rawValue: 1 << 0)
    /// Fail with `.notSupported` unless zeroing is cheaper than writing zeros (NBD_CMD_FLAG_FAST_ZERO).
    public static let fastZero = ZeroOptions(rawValue: 1 << 1)
    /// Durable before completion (NBD_CMD_FLAG_FUA).
    public static let fua = ZeroOptions(rawValue: 1 << 2)
}

/// What a driver can do; the protocol layer turns this into transmission flags and block sizes.
public struct BlockCapabilities: Sendable, Equatable {
    public var writable: Bool
    public var canFlush: Bool
    public var canTrim: Bool
    public var canZero: Bool
    public var canFastZero: Bool
    public var canCache: Bool
    /// Every connection may see a different instance of the driver if false; true when one instance
    /// serves all connections, so a flush on any connection covers writes completed on all of them.
    public var canMultiConn: Bool
    public var rotational: Bool
    /// Whether `blockStatus` reports meaningful `depth` (backing chains); enables qemu:allocation-depth.
    public var knowsAllocationDepth: Bool
    /// Smallest request alignment the driver handles without read-modify-write.
    public var minimumBlockSize: UInt32
    /// The size requests should ideally be multiples of (cluster size for qcow2).
    public var preferredBlockSize: UInt32

    public init(writable: Bool, canFlush: Bool = true, canTrim: Bool, canZero: Bool, canFastZero: Bool,
                canCache: Bool = true, canMultiConn: Bool = true, rotational: Bool = false,
                knowsAllocationDepth: Bool = false, minimumBlockSize: UInt32 = 1, preferredBlockSize: UInt32 = 4096) {
        self.writable = writable
        self.canFlush = canFlush
        self.canTrim = canTrim
        self.canZero = canZero
        self.canFastZero = canFastZero
        self.canCache = canCache
        self.canMultiConn = canMultiConn
        self.rotational = rotational
        self.knowsAllocationDepth = knowsAllocationDepth
        self.minimumBlockSize = minimumBlockSize
        self.preferredBlockSize = preferredBlockSize
    }
}

/// An image served over NBD. Ranges given to these methods have already been validated against `size`
/// and `capabilities` by the protocol layer.
public protocol BlockDevice: AnyObject {
    /// Virtual size in bytes.
    var size: UInt64 { get }
    var capabilities: BlockCapabilities { get }
    /// A short human description for logs ("raw file /path, 1 GiB").
    var summary: String { get }

    /// Fills `buffer` with `buffer.count` bytes starting at `offset`.
    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, tag: UInt64, handler: BlockIOHandler)
    /// Writes all of `buffer` at `offset`; with `fua` it is durable before completion.
    func write(offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool, tag: UInt64, handler: BlockIOHandler)
    func writeZeroes(offset: UInt64, length: UInt64, options: ZeroOptions, tag: UInt64, handler: BlockIOHandler)
    /// Drops the range's contents; afterwards it reads as zeros (NBD allows garbage, we promise zeros).
    func trim(offset: UInt64, length: UInt64, fua: Bool, tag: UInt64, handler: BlockIOHandler)
    /// Makes every write completed before this call durable.
    func flush(tag: UInt64, handler: BlockIOHandler)
    /// Advisory prefetch.
    func cache(offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler)
    /// The last call before the device is dropped: makes everything durable and leaves the image clean
    /// (no pending frees or dirty metadata), so a checker finds no leaks after a clean stop.
    func close(tag: UInt64, handler: BlockIOHandler)
    /// Extents for a prefix of `offset ..< offset + length` (never empty, never past the range).
    func blockStatus(offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler)
}

extension BlockDevice {
    /// For devices whose flush already leaves nothing behind.
    public func close(tag: UInt64, handler: BlockIOHandler) { flush(tag: tag, handler: handler) }
}
