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

/// qemu's cluster types (qcow2_get_cluster_type).
public enum ClusterType: Equatable, Sendable {
    case unallocated, zeroPlain, zeroAllocated, normal, compressed
}

/// qemu's subcluster types (qcow2_get_subcluster_type).
public enum SubclusterType: Equatable, Sendable {
    case unallocatedPlain, unallocatedAllocated, zeroPlain, zeroAllocated, normal, compressed, invalid
}

public enum L2Entry {
    public static let copied: UInt64 = 1 << 63
    public static let compressedFlag: UInt64 = 1 << 62
    public static let zeroFlag: UInt64 = 1
    public static let offsetMask: UInt64 = 0x00ff_ffff_ffff_fe00
    public static let standardReserved: UInt64 = 0x3f00_0000_0000_01fe

    /// Decodes a standard (or the first word of an extended) L2 entry for serving: the cluster type
    /// (`clusterType`, as qemu and `qnbd check` classify it) plus the rules a server must enforce.
    public static func decode(_ raw: UInt64, geometry: Geometry, index: Int) throws(QCow2Error) -> ClusterMapping {
        switch clusterType(raw, extendedL2: geometry.extendedL2) {
        case .compressed:
            guard raw & copied == 0 else {
                throw QCow2Error("L2 entry \(index)", "compressed cluster with the COPIED flag set")
            }
            let (host, length) = compressedExtent(raw, geometry: geometry)
            guard host != 0, length > 0 else { throw QCow2Error("L2 entry \(index)", "compressed descriptor \(hex(raw)) invalid") }
            return .compressed(host: host, byteCount: Int(length))
        case let type:
            let reserved = geometry.extendedL2 ? (standardReserved | zeroFlag) : standardReserved
            guard raw & reserved == 0 else {
                throw QCow2Error("L2 entry \(index)", "reserved bits set in \(hex(raw))")
            }
            let host = raw & offsetMask
            let isCopied = raw & copied != 0
            guard host & (geometry.clusterSize - 1) == 0 else {
                throw QCow2Error("L2 entry \(index)", "host offset \(hex(host)) is not cluster aligned")
            }
            switch type {
            case .zeroPlain: return .zero
            case .zeroAllocated: return .zeroAllocated(host: host, copied: isCopied)
            case .normal: return .normal(host: host, copied: isCopied)
            // COPIED without a host offset means nothing without an external data file (which qnbd
            // refuses at open); qemu reads such a cluster as unallocated and `qemu-img check` accepts it.
            case .unallocated, .compressed: return .unallocated
            }
        }
    }

    /// qemu's qcow2_get_cluster_type: the one classification of an L2 entry, shared by serving,
    /// `qnbd check` and `qnbd map`. It looks only at the flags and the offset; what is invalid about
    /// an entry (reserved bits, misalignment) each user reports in its own terms.
    public static func clusterType(_ raw: UInt64, extendedL2: Bool) -> ClusterType {
        if raw & compressedFlag != 0 { return .compressed }
        if raw & zeroFlag != 0 && !extendedL2 {
            return raw & offsetMask != 0 ? .zeroAllocated : .zeroPlain
        }
        return raw & offsetMask == 0 ? .unallocated : .normal
    }

    /// qemu's qcow2_get_subcluster_type; without extended L2 a cluster is one subcluster.
    public static func subclusterType(_ raw: UInt64, bitmap: UInt64, index: Int, extendedL2: Bool) -> SubclusterType {
        let type = clusterType(raw, extendedL2: extendedL2)
        guard extendedL2 else {
            switch type {
            case .compressed: return .compressed
            case .zeroPlain: return .zeroPlain
            case .zeroAllocated: return .zeroAllocated
            case .normal: return .normal
            case .unallocated: return .unallocatedPlain
            }
        }
        switch type {
        case .compressed: return .compressed
        case .normal:
            if (bitmap >> 32) & bitmap != 0 { return .invalid }
            if bitmap & (1 << UInt64(32 + index)) != 0 { return .zeroAllocated }
            if bitmap & (1 << UInt64(index)) != 0 { return .normal }
            return .unallocatedAllocated
        case .unallocated:
            if bitmap & allAllocated != 0 { return .invalid }
            return bitmap & (1 << UInt64(32 + index)) != 0 ? .zeroPlain : .unallocatedPlain
        case .zeroPlain, .zeroAllocated:
            return .invalid   // not produced with extended L2: bit 0 is not a zero flag there
        }
    }

    /// The host bytes of a compressed cluster (qcow2_parse_compressed_l2_entry): bits 0..x-1 hold the
    /// byte offset, bits x..61 the count of 512-byte sectors beyond the one holding that offset.
    public static func compressedExtent(_ raw: UInt64, geometry: Geometry) -> (host: UInt64, byteCount: UInt64) {
        let shift = UInt64(geometry.compressedOffsetBits)
        let host = raw & ((1 << shift) - 1)
        let sectorMask: UInt64 = (1 << UInt64(geometry.clusterBits - 8)) - 1
        let sectors = ((raw >> shift) & sectorMask) + 1
        return (host, sectors * 512 - (host & 511))
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
    public static let reserved: UInt64 = 0x7f00_0000_0000_01ff

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
