// Address arithmetic derived from the header: where a guest offset's L1 and L2 entries live, where a
// host cluster's refcount lives. All sizes are powers of two, so everything is shifts and masks.

public struct Geometry: Equatable, Sendable {
    public let clusterBits: Int
    public let clusterSize: UInt64
    public let extendedL2: Bool
    /// Bytes per L2 entry: 8, or 16 with extended L2.
    public let l2EntryBytes: Int
    /// log2 of entries per L2 table.
    public let l2Bits: Int
    public let l2Entries: Int
    /// log2 of the refcount width in bits (0...6).
    public let refcountOrder: Int
    public let refcountBits: Int
    /// log2 of refcount entries per refcount block.
    public let refblockBits: Int
    public let virtualSize: UInt64
    /// Subclusters per cluster: 32 with extended L2, else 1.
    public let subclusters: Int
    public let subclusterSize: UInt64

    public init(header: Header) {
        clusterBits = Int(header.clusterBits)
        clusterSize = 1 << UInt64(clusterBits)
        extendedL2 = header.extendedL2
        l2EntryBytes = extendedL2 ? 16 : 8
        l2Bits = clusterBits - (extendedL2 ? 4 : 3)
        l2Entries = 1 << l2Bits
        refcountOrder = Int(header.refcountOrder)
        refcountBits = 1 << refcountOrder
        refblockBits = clusterBits + 3 - refcountOrder
        virtualSize = header.size
        subclusters = extendedL2 ? 32 : 1
        subclusterSize = clusterSize / UInt64(subclusters)
    }

    /// Guest bytes one L2 table maps.
    public var l2Coverage: UInt64 { clusterSize << UInt64(l2Bits) }

    @inline(__always) public func l1Index(_ guest: UInt64) -> Int { Int(guest >> UInt64(clusterBits + l2Bits)) }
    @inline(__always) public func l2Index(_ guest: UInt64) -> Int { Int((guest >> UInt64(clusterBits)) & UInt64(l2Entries - 1)) }
    @inline(__always) public func offsetInCluster(_ offset: UInt64) -> UInt64 { offset & (clusterSize - 1) }
    @inline(__always) public func clusterStart(_ offset: UInt64) -> UInt64 { offset & ~(clusterSize - 1) }
    @inline(__always) public func clusterIndex(_ host: UInt64) -> UInt64 { host >> UInt64(clusterBits) }
    /// The clusters that the bytes [offset, offset + byteCount) touch; empty when there are none.
    @inline(__always) public func clusters(covering offset: UInt64, byteCount: UInt64) -> Range<UInt64> {
        let first = clusterIndex(offset)
        return byteCount == 0 ? first..<first : first..<(clusterIndex(offset + byteCount - 1) + 1)
    }

    /// Reftable index and refblock index of a host cluster.
    @inline(__always)
    public func refcountPosition(ofCluster cluster: UInt64) -> (table: Int, block: Int) {
        (Int(cluster >> UInt64(refblockBits)), Int(cluster & ((1 << UInt64(refblockBits)) - 1)))
    }

    /// Host clusters one refcount block covers.
    public var refblockCoverage: UInt64 { 1 << UInt64(refblockBits) }

    /// The largest refcount this width can hold.
    public var refcountMaximum: UInt64 { refcountBits == 64 ? UInt64.max : (1 << UInt64(refcountBits)) - 1 }

    /// Bits 0..x-1 of a compressed entry hold the host byte offset; x..61 the sector count.
    public var compressedOffsetBits: Int { 62 - (clusterBits - 8) }
}
