// Geometry arithmetic, L1/L2 entry decoding (every cluster kind, compressed descriptors, reserved
// bits) and refcount entries of every width.

import Testing
@testable import QCow2

func geometry(clusterBits: UInt32, extendedL2: Bool = false, refcountOrder: UInt32 = 4) -> Geometry {
    var h = goodHeader(clusterBits: clusterBits)
    if extendedL2 { h.incompatibleFeatures = FeatureBit.extendedL2 }
    h.refcountOrder = refcountOrder
    return Geometry(header: h)
}

@Suite("Geometry")
struct GeometryTests {
    static let cases: [(UInt32, Bool)] = (9...21).flatMap { bits in
        bits >= 14 ? [(UInt32(bits), false), (UInt32(bits), true)] : [(UInt32(bits), false)]
    }

    @Test(arguments: cases)
    func arithmetic(_ bits: UInt32, _ extended: Bool) {
        let g = geometry(clusterBits: bits, extendedL2: extended)
        let cs = UInt64(1) << UInt64(bits)
        let entryBytes: UInt64 = extended ? 16 : 8
        #expect(g.clusterBits == Int(bits))
        #expect(g.clusterSize == cs)
        #expect(g.extendedL2 == extended)
        #expect(g.l2EntryBytes == Int(entryBytes))
        #expect(UInt64(g.l2Entries) == cs / entryBytes)
        #expect(1 << g.l2Bits == g.l2Entries)
        #expect(g.l2Coverage == cs * (cs / entryBytes))
        #expect(g.subclusters == (extended ? 32 : 1))
        #expect(g.subclusterSize == cs / (extended ? 32 : 1))
        #expect(g.compressedOffsetBits == 62 - (Int(bits) - 8))
        var rng = SeededRandom(seed: UInt64(bits) * 2 + (extended ? 1 : 0))
        let probes: [UInt64] = [0, 1, cs - 1, cs, g.l2Coverage - 1, g.l2Coverage, g.l2Coverage + cs + 7, (1 << 50) - 1]
            + (0..<200).map { _ in rng.next() >> 14 }
        for guest in probes {
            #expect(UInt64(g.l1Index(guest)) == guest / g.l2Coverage)
            #expect(UInt64(g.l2Index(guest)) == (guest / cs) % (cs / entryBytes))
            #expect(g.offsetInCluster(guest) == guest % cs)
            #expect(g.clusterStart(guest) == guest - guest % cs)
            #expect(g.clusterIndex(guest) == guest / cs)
        }
    }

    @Test func wellKnownSizes() {
        #expect(geometry(clusterBits: 16).l2Coverage == 512 << 20)
        #expect(geometry(clusterBits: 16, extendedL2: true).l2Coverage == 256 << 20)
        #expect(geometry(clusterBits: 16, extendedL2: true).subclusterSize == 2048)
        #expect(geometry(clusterBits: 9).l2Coverage == 32 << 10)
        #expect(geometry(clusterBits: 9).l2Entries == 64)
        #expect(geometry(clusterBits: 21).l2Coverage == 512 << 30)
        #expect(geometry(clusterBits: 16).compressedOffsetBits == 54)
        // One 64 KiB refcount block with 16-bit refcounts covers 32768 clusters = 2 GiB.
        #expect(geometry(clusterBits: 16).refblockCoverage == 32768)
    }

    @Test(arguments: [UInt32(9), 12, 16, 21], [UInt32(0), 1, 2, 3, 4, 5, 6])
    func refcountArithmetic(_ bits: UInt32, _ order: UInt32) {
        let g = geometry(clusterBits: bits, refcountOrder: order)
        let width = 1 << Int(order)
        let perBlock = (UInt64(1) << UInt64(bits)) * 8 / UInt64(width)
        #expect(g.refcountOrder == Int(order))
        #expect(g.refcountBits == width)
        #expect(g.refblockCoverage == perBlock)
        #expect(g.refcountMaximum == (width == 64 ? UInt64.max : (UInt64(1) << UInt64(width)) - 1))
        for cluster: UInt64 in [0, 1, perBlock - 1, perBlock, perBlock * 7 + 3, (1 << 40) + 12345] {
            let p = g.refcountPosition(ofCluster: cluster)
            #expect(UInt64(p.table) == cluster / perBlock)
            #expect(UInt64(p.block) == cluster % perBlock)
        }
    }
}

@Suite("L2 and L1 entries")
struct EntryDecodeTests {
    let g64 = geometry(clusterBits: 16)

    @Test func clusterKinds() throws {
        let host: UInt64 = 0x5_0000
        #expect(try L2Entry.decode(0, geometry: g64, index: 0) == .unallocated)
        #expect(try L2Entry.decode(1, geometry: g64, index: 0) == .zero)
        #expect(try L2Entry.decode(host | 1, geometry: g64, index: 0) == .zeroAllocated(host: host, copied: false))
        #expect(try L2Entry.decode(host | 1 | L2Entry.copied, geometry: g64, index: 0) == .zeroAllocated(host: host, copied: true))
        #expect(try L2Entry.decode(host, geometry: g64, index: 0) == .normal(host: host, copied: false))
        #expect(try L2Entry.decode(host | L2Entry.copied, geometry: g64, index: 0) == .normal(host: host, copied: true))
        #expect(try L2Entry.decode(L2Entry.normal(host: host), geometry: g64, index: 0) == .normal(host: host, copied: true))
        // The largest host offset the mask allows (bits 9..55, cluster aligned).
        let top: UInt64 = 0x00ff_ffff_ffff_0000
        #expect(try L2Entry.decode(top, geometry: g64, index: 0) == .normal(host: top, copied: false))
    }

    @Test(arguments: Array(1...8) + Array(56...61))
    func reservedBitIsCorruption(_ bit: Int) {
        expectQCow2Error("L2 entry 17", ["reserved bits"]) {
            _ = try L2Entry.decode(0x5_0000 | L2Entry.copied | (1 << UInt64(bit)), geometry: g64, index: 17)
        }
        expectQCow2Error("L2 entry 3", ["reserved bits"]) {
            _ = try L2Entry.decode(1 << UInt64(bit), geometry: g64, index: 3)
        }
    }

    @Test func unalignedHostOffset() throws {
        expectQCow2Error("L2 entry 5", ["not cluster aligned"]) {
            _ = try L2Entry.decode(0x5_0200 | L2Entry.copied, geometry: g64, index: 5)
        }
        // 512-byte clusters: every mask-aligned offset is a cluster.
        #expect(try L2Entry.decode(0x5_0200, geometry: geometry(clusterBits: 9), index: 0) == .normal(host: 0x5_0200, copied: false))
    }

    /// Without an external data file, COPIED on an entry with no host offset means nothing: qemu reads
    /// the cluster as unallocated and `qemu-img check` calls the image clean, so serving and `qnbd check`
    /// (which both classify through `clusterType`) take it as unallocated too.
    @Test func copiedWithoutHostClusterIsUnallocated() throws {
        #expect(L2Entry.clusterType(L2Entry.copied, extendedL2: false) == .unallocated)
        #expect(L2Entry.clusterType(L2Entry.copied, extendedL2: true) == .unallocated)
        #expect(try L2Entry.decode(L2Entry.copied, geometry: g64, index: 9) == .unallocated)
    }

    /// One classification for serving and the tools: every flag combination decodes to the mapping
    /// its qemu cluster type names.
    @Test func decodeAgreesWithClusterType() throws {
        let host: UInt64 = 0x5_0000
        let cases: [(UInt64, ClusterType, ClusterMapping)] = [
            (0, .unallocated, .unallocated),
            (L2Entry.copied, .unallocated, .unallocated),
            (L2Entry.zeroFlag, .zeroPlain, .zero),
            (host | L2Entry.zeroFlag, .zeroAllocated, .zeroAllocated(host: host, copied: false)),
            (host | L2Entry.copied | L2Entry.zeroFlag, .zeroAllocated, .zeroAllocated(host: host, copied: true)),
            (host, .normal, .normal(host: host, copied: false)),
            (host | L2Entry.copied, .normal, .normal(host: host, copied: true)),
        ]
        for (raw, type, mapping) in cases {
            #expect(L2Entry.clusterType(raw, extendedL2: false) == type)
            #expect(try L2Entry.decode(raw, geometry: g64, index: 0) == mapping)
        }
    }

    @Test(arguments: [UInt32(9), 10, 12, 16, 20, 21])
    func compressedDescriptor(_ bits: UInt32) throws {
        let g = geometry(clusterBits: bits)
        let x = 62 - (Int(bits) - 8)
        let maxSectors = (UInt64(1) << UInt64(bits - 8)) - 1   // the field is cluster_bits - 8 bits wide
        for host: UInt64 in [512, 0x5_0000, 0x5_00f1, 0x1234_5677, (UInt64(1) << UInt64(min(x, 55))) - 1] {
            for sectors: UInt64 in [0, 1, maxSectors] {
                let raw = L2Entry.compressedFlag | (sectors << UInt64(x)) | host
                let expected = Int((sectors + 1) * 512 - host % 512)
                #expect(try L2Entry.decode(raw, geometry: g, index: 0) == .compressed(host: host, byteCount: expected),
                        "bits \(bits) host \(hex(host)) sectors \(sectors)")
            }
        }
        // 64 KiB clusters: x = 54, 8-bit sector count; qemu's first compressed cluster of `convert -c`.
        if bits == 16 {
            #expect(try L2Entry.decode(0x4000_0000_0005_0000 | (3 << 54), geometry: g, index: 0)
                    == .compressed(host: 0x5_0000, byteCount: 2048))
            #expect(try L2Entry.decode(0x4000_0000_0005_00f1 | (2 << 54), geometry: g, index: 0)
                    == .compressed(host: 0x5_00f1, byteCount: 1536 - 0xf1))
        }
        expectQCow2Error("L2 entry 4", ["COPIED"]) {
            _ = try L2Entry.decode(L2Entry.compressedFlag | L2Entry.copied | 0x5_0000, geometry: g, index: 4)
        }
        expectQCow2Error("L2 entry 4", ["compressed descriptor"]) {
            _ = try L2Entry.decode(L2Entry.compressedFlag | (1 << UInt64(x)), geometry: g, index: 4)
        }
    }

    @Test func extendedL2Words() throws {
        let g = geometry(clusterBits: 16, extendedL2: true)
        // Bit 0 is reserved in extended L2: the zero state lives in the bitmap.
        expectQCow2Error("L2 entry 2", ["reserved"]) { _ = try L2Entry.decode(1, geometry: g, index: 2) }
        let normal = try L2Entry.decode(0x5_0000 | L2Entry.copied, geometry: g, index: 0)
        #expect(normal == .normal(host: 0x5_0000, copied: true))
        let bitmap: UInt64 = 0x0000_0030_0000_0c01   // alloc 0, 10, 11; zero 36-32=4, 5
        let states = try (0..<32).map { try L2Entry.subclusterState(mapping: normal, bitmap: bitmap, sub: $0, index: 0) }
        for (i, s) in states.enumerated() {
            let want: SubclusterState = [0, 10, 11].contains(i) ? .data : [4, 5].contains(i) ? .zero : .unallocated
            #expect(s == want, "subcluster \(i)")
        }
        #expect(try L2Entry.subclusterState(mapping: .unallocated, bitmap: 1 << 32, sub: 0, index: 0) == .zero)
        #expect(try L2Entry.subclusterState(mapping: .unallocated, bitmap: 1 << 32, sub: 1, index: 0) == .unallocated)
        expectQCow2Error("L2 entry 6", ["both allocated and zero"]) {
            _ = try L2Entry.subclusterState(mapping: normal, bitmap: 1 << 33 | 1 << 1, sub: 1, index: 6)
        }
        expectQCow2Error("L2 entry 6", ["without a host cluster"]) {
            _ = try L2Entry.subclusterState(mapping: .unallocated, bitmap: 1 << 7, sub: 7, index: 6)
        }
        let compressed = ClusterMapping.compressed(host: 0x5_0000, byteCount: 512)
        #expect(try L2Entry.subclusterState(mapping: compressed, bitmap: 0, sub: 3, index: 0) == .compressed)
        expectQCow2Error("L2 entry 8", ["bitmap"]) {
            _ = try L2Entry.subclusterState(mapping: compressed, bitmap: 1, sub: 0, index: 8)
        }
    }

    @Test func l1Entries() throws {
        let none = try L1Entry.decode(0, geometry: g64, index: 0)
        #expect(none.offset == 0 && !none.copied)
        let copied = try L1Entry.decode(0x3_0000 | L2Entry.copied, geometry: g64, index: 0)
        #expect(copied.offset == 0x3_0000 && copied.copied)
        let shared = try L1Entry.decode(0x3_0000, geometry: g64, index: 0)
        #expect(shared.offset == 0x3_0000 && !shared.copied)
        for bit in Array(0...8) + Array(56...62) {
            expectQCow2Error("L1 entry 3", ["reserved bits"]) {
                _ = try L1Entry.decode(0x3_0000 | (1 << UInt64(bit)), geometry: g64, index: 3)
            }
        }
        expectQCow2Error("L1 entry 1", ["not cluster aligned"]) { _ = try L1Entry.decode(0x3_0200, geometry: g64, index: 1) }
    }
}

@Suite("Refcount entries")
struct RefcountEntryTests {
    @Test(arguments: 0...6)
    func roundTripsLeaveNeighboursAlone(_ order: Int) {
        let width = 1 << order
        let blockBytes = 256
        let count = blockBytes * 8 / width
        let maximum: UInt64 = width == 64 ? .max : (1 << UInt64(width)) - 1
        let block = UnsafeMutableRawBufferPointer.allocate(byteCount: blockBytes, alignment: 8)
        defer { block.deallocate() }
        let seed = patternBytes(UInt64(order), blockBytes)
        for i in 0..<blockBytes { block[i] = seed[i] }
        var rng = SeededRandom(seed: 42 + UInt64(order))
        var model = (0..<count).map { RefcountEntry.get(UnsafeRawBufferPointer(block), index: $0, order: order) }
        #expect(model.allSatisfy { $0 <= maximum })
        let indices = [0, 1, 2, count / 2, count - 2, count - 1] + (0..<64).map { _ in Int.random(in: 0..<count, using: &rng) }
        for (n, index) in indices.enumerated() {
            let value: UInt64 = n % 3 == 0 ? maximum : n % 3 == 1 ? 0 : rng.next() & maximum
            RefcountEntry.set(block, index: index, order: order, value: value)
            model[index] = value
            for j in 0..<count {
                let got = RefcountEntry.get(UnsafeRawBufferPointer(block), index: j, order: order)
                if got != model[j] {
                    Issue.record("order \(order): after setting entry \(index) = \(value), entry \(j) is \(got), want \(model[j])")
                    return
                }
            }
        }
        // A value wider than the entry touches nothing but the entry.
        if width < 64 {
            RefcountEntry.set(block, index: 1, order: order, value: .max)
            model[1] = maximum
            for j in 0..<count { #expect(RefcountEntry.get(UnsafeRawBufferPointer(block), index: j, order: order) == model[j]) }
        }
    }

    @Test func bitLayout() {
        let block = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 8)
        defer { block.deallocate() }
        func reset() { for i in 0..<16 { block[i] = 0 } }
        // Sub-byte widths count from the least significant bit of each byte.
        reset(); RefcountEntry.set(block, index: 3, order: 0, value: 1); #expect(block[0] == 0x08)
        reset(); RefcountEntry.set(block, index: 9, order: 0, value: 1); #expect(block[1] == 0x02)
        reset(); RefcountEntry.set(block, index: 1, order: 1, value: 2); #expect(block[0] == 0x08)
        reset(); RefcountEntry.set(block, index: 1, order: 2, value: 0xa); #expect(block[0] == 0xa0)
        reset(); RefcountEntry.set(block, index: 2, order: 2, value: 0x5); #expect(block[1] == 0x05)
        reset(); RefcountEntry.set(block, index: 2, order: 3, value: 0x7f); #expect(block[2] == 0x7f)
        // 16 bits and more: big-endian.
        reset(); RefcountEntry.set(block, index: 1, order: 4, value: 0x1234); #expect(Array(block[2..<4]) == [0x12, 0x34])
        reset(); RefcountEntry.set(block, index: 1, order: 5, value: 0x1234_5678)
        #expect(Array(block[4..<8]) == [0x12, 0x34, 0x56, 0x78])
        reset(); RefcountEntry.set(block, index: 1, order: 6, value: 0x0102_0304_0506_0708)
        #expect(Array(block[8..<16]) == [1, 2, 3, 4, 5, 6, 7, 8])
        #expect(RefcountEntry.get(UnsafeRawBufferPointer(block), index: 1, order: 6) == 0x0102_0304_0506_0708)
        #expect(Array(block[0..<8]) == zeros(8))
    }
}
