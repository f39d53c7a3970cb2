// Decoding (and building) L1 and L2 entries. Masks follow qemu's block/qcow2.h; the spec's reserved
// bits must be zero, and a set reserved bit is reported as corruption rather than guessed around.

/// What one guest cluster maps to.
public enum ClusterMapping: Equatable, Sendable {
    /// No data here: read from the backing file, or zeros without one.
    case unallocated
    /// Reads as zeros; no host cluster (ZERO_PLAIN).
    case zero
    /// Reads as zeros; a preallocated host cluster stays reserved (ZERO_ALLOC).
    case zeroAllocated(host: UInt64, copied: Bool)
    /// Data at `host`.
    case normal(host: UInt64, copied: Bool)
    /// Compressed data: `byteCount` bytes at byte offset `host` (may span host clusters).
    case compressed(host: UInt64, byteCount: Int)
}

/// How one subcluster reads (extended L2), or the whole cluster otherwise.
public enum SubclusterState: Equatable, Sendable {
    case unallocated
    case zero
    case data
    case compressed
}

public enum L2Entry {
    public static let copied: UInt64 = 1 << 63
    public static let compressedFlag: UInt64 = 1 << 62
    public static let zeroFlag: UInt64 = 1
    public static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let standardReserved: UInt64 = 0x3f00_0000_0000_01fe

    /// Decodes a standard (or the first word of an extended) L2 entry.
    public static func decode(_ raw: UInt64, geometry: Geometry, index: Int) throws(QCow2Error) -> ClusterMapping {
        if raw & compressedFlag != 0 {
            let x = geometry.compressedOffsetBits
            let host = raw & ((1 << UInt64(x)) - 1)
            let sectors = (raw & ~copied & ~compressedFlag) >> UInt64(x)
            guard raw & copied == 0 else {
                throw QCow2Error("L2 entry \(index)", "compressed cluster with the COPIED flag set")
            }
            let length = Int((sectors + 1) * 512 - (host & 511))
            guard host != 0, length > 0 else { throw QCow2Error("L2 entry \(index)", "compressed descriptor \(hex(raw)) invalid") }
            return .compressed(host: host, byteCount: length)
        }
        let reserved = geometry.extendedL2 ? (standardReserved | zeroFlag) : standardReserved
        guard raw & reserved == 0 else {
            throw QCow2Error("L2 entry \(index)", "reserved bits set in \(hex(raw))")
        }
        let host = raw & offsetMask
        let isCopied = raw & copied != 0
        guard host & (geometry.clusterSize - 1) == 0 else {
            throw QCow2Error("L2 entry \(index)", "host offset \(hex(host)) is not cluster aligned")
        }
        if raw & zeroFlag != 0 {
            return host == 0 ? .zero : .zeroAllocated(host: host, copied: isCopied)
        }
        if host == 0 {
            guard !isCopied else {
                throw QCow2Error("L2 entry \(index)", "COPIED set on an unallocated cluster (external data files are not supported)")
            }
            return .unallocated
        }
        return .normal(host: host, copied: isCopied)
    }

    /// The state of subcluster `sub` of an extended-L2 entry.
    public static func subclusterState(mapping: ClusterMapping, bitmap: UInt64, sub: Int,
                                       index: Int) throws(QCow2Error) -> SubclusterState {
        if case .compressed = mapping {
            guard bitmap == 0 else { throw QCow2Error("L2 entry \(index)", "compressed cluster with a subcluster bitmap") }
            return .compressed
        }
        let allocated = bitmap & (1 << UInt64(sub)) != 0
        let zero = bitmap & (1 << UInt64(32 + sub)) != 0
        if allocated && zero { throw QCow2Error("L2 entry \(index)", "subcluster \(sub) both allocated and zero") }
        switch mapping {
        case .unallocated:
            if allocated { throw QCow2Error("L2 entry \(index)", "subcluster \(sub) allocated without a host cluster") }
            return zero ? .zero : .unallocated
        case .normal:
            return allocated ? .data : zero ? .zero : .unallocated
        case .zero, .zeroAllocated, .compressed:
            return .zero   // not produced for extended L2 (bit 0 is reserved there)
        }
    }

    /// Extended L2 bitmaps: every subcluster allocated; every subcluster reading as zero.
    public static let allAllocated: UInt64 = 0xffff_ffff
    public static let allZero: UInt64 = 0xffff_ffff << 32

    /// An entry for `host` with COPIED set: refcount 1, written in place from now on.
    public static func normal(host: UInt64) -> UInt64 { host | copied }
}

public enum L1Entry {
    public static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    static let reserved: UInt64 = 0x7f00_0000_0000_01ff

    /// The L2 table offset (0 = none) and its COPIED flag.
    public static func decode(_ raw: UInt64, geometry: Geometry, index: Int) throws(QCow2Error) -> (offset: UInt64, copied: Bool) {
        guard raw & reserved == 0 else { throw QCow2Error("L1 entry \(index)", "reserved bits set in \(hex(raw))") }
        let offset = raw & offsetMask
        guard offset & (geometry.clusterSize - 1) == 0 else {
            throw QCow2Error("L1 entry \(index)", "L2 table offset \(hex(offset)) is not cluster aligned")
        }
        return (offset, raw & L2Entry.copied != 0)
    }
}
