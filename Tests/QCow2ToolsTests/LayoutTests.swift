// Where `create` puts things: qemu-img's layout in the common case, and refcount blocks and table
// clusters counted correctly when the L1 table or preallocated metadata outgrows one refcount block.

import Testing
@testable import QCow2
@testable import QCow2Tools

@Suite struct LayoutTests {
    func layout(_ size: UInt64, clusterBits: Int = 16, refcountBits: Int = 16, extendedL2: Bool = false,
                preallocation: Preallocation = .off) throws -> CreateLayout {
        try CreateLayout.compute(virtualSize: size, clusterBits: clusterBits,
                                 refcountOrder: refcountBits.trailingZeroBitCount, extendedL2: extendedL2,
                                 preallocation: preallocation)
    }

    @Test func qemuDefaultLayout() throws {
        // qemu-img create -f qcow2 a.qcow2 10G: reftable@1, refblock@2, L1@3 with 20 entries, file ends
        // right after the last L1 entry.
        let l = try layout(10 << 30)
        #expect(l.reftableOffset == 0x10000)
        #expect(l.reftableClusters == 1)
        #expect(l.refblockOffsets == [0x20000])
        #expect(l.l1Offset == 0x30000)
        #expect(l.l1Size == 20)
        #expect(l.clusterCount == 4)
        #expect(l.fileLength == 0x30000 + 160)
        #expect(l.l2Offsets.isEmpty)
    }

    @Test func zeroSizedDiskHasNoL1() throws {
        let l = try layout(0)
        #expect(l.l1Size == 0)
        #expect(l.l1Offset == 0)
        #expect(l.clusterCount == 3)
        #expect(l.fileLength == 3 * 65536)
    }

    @Test func extendedL2HalvesWhatATableMaps() throws {
        #expect(try layout(1 << 30).l1Size == 2)
        #expect(try layout(1 << 30, extendedL2: true).l1Size == 4)
    }

    @Test func bigL1NeedsMoreRefcountBlocks() throws {
        // 512-byte clusters, 16-bit refcounts: a refcount block covers 256 clusters; a 1 GiB disk has a
        // 256 KiB (512-cluster) L1 table, so clusters 0..516 need three blocks.
        let l = try layout(1 << 30, clusterBits: 9)
        #expect(l.l1Size == 32768)
        #expect(l.refblockOffsets == [1024, 263_680, 264_192] as [UInt64])   // clusters 2, 515, 516
        #expect(l.l1Offset == 3 * 512)
        #expect(l.clusterCount == 517)
        #expect(l.fileLength == 517 * 512)
    }

    @Test func refcountTableGrowsPastOneCluster() throws {
        // 512-byte clusters and 64-bit refcounts: 64 clusters per block, 64 blocks per table cluster.
        let l = try layout(100 << 30, clusterBits: 9, refcountBits: 64)
        #expect(l.reftableClusters > 1)
        try expectConsistent(l, refcountBits: 64)
    }

    @Test func preallocatedMetadata() throws {
        let l = try layout(1 << 30, preallocation: .metadata)
        #expect(l.l2Offsets == [262_144, 327_680] as [UInt64])   // clusters 4 and 5
        #expect(l.dataOffset == 6 * 65536)
        #expect(l.dataClusters == 16384)
        #expect(l.clusterCount == 6 + 16384)
        #expect(l.fileLength == l.clusterCount * 65536)
        #expect(l.refblockOffsets.count == 1)   // one 64 KiB refcount block covers 32768 clusters
    }

    @Test func preallocatedPartialLastCluster() throws {
        let l = try layout(1_000_448, preallocation: .metadata)
        #expect(l.dataClusters == 16)
    }

    @Test func tooBigForQemu() {
        // 512-byte clusters map at most 128 GiB with a 32 MiB L1 table.
        #expect(throws: ToolError.self) { try layout(1 << 40, clusterBits: 9) }
    }

    /// Every structure is inside 0 ..< clusterCount, nothing overlaps, and the refcount blocks cover it.
    func expectConsistent(_ l: CreateLayout, refcountBits: Int) throws {
        let cs = l.clusterSize
        var used = Set<UInt64>()
        func claim(_ offset: UInt64, _ clusters: UInt64) {
            for c in (offset / cs)..<(offset / cs + clusters) {
                #expect(c < l.clusterCount)
                #expect(used.insert(c).inserted, "cluster \(c) used twice")
            }
        }
        claim(0, 1)
        claim(l.reftableOffset, UInt64(l.reftableClusters))
        for b in l.refblockOffsets { claim(b, 1) }
        claim(l.l1Offset, (UInt64(l.l1Size) * 8 + cs - 1) / cs)
        for t in l.l2Offsets { claim(t, 1) }
        if l.dataClusters > 0 { claim(l.dataOffset, l.dataClusters) }
        #expect(UInt64(used.count) == l.clusterCount)
        let perBlock = (cs * 8) / UInt64(refcountBits)
        #expect(UInt64(l.refblockOffsets.count) * perBlock >= l.clusterCount)
        #expect(UInt64(l.reftableClusters) * cs / 8 >= UInt64(l.refblockOffsets.count))
    }

    @Test(arguments: [9, 10, 12, 16, 21])
    func layoutsAreConsistent(clusterBits: Int) throws {
        for refcountBits in [1, 16, 64] {
            for size: UInt64 in [0, 512, 1 << 20, 1 << 30, 40 << 30] {
                let l = try layout(size, clusterBits: clusterBits, refcountBits: refcountBits)
                try expectConsistent(l, refcountBits: refcountBits)
            }
            let p = try layout(32 << 20, clusterBits: clusterBits, refcountBits: refcountBits, preallocation: .metadata)
            try expectConsistent(p, refcountBits: refcountBits)
        }
    }
}

@Suite struct CreatedImageTests {
    /// Every option combination checks clean in memory (the interop suite repeats this with qemu-img).
    @Test(arguments: [512, 4096, 65536, 2 << 20] as [UInt64])
    func createdImagesCheckClean(clusterSize: UInt64) throws {
        for refcountBits in [1, 2, 8, 16, 64] {
            for preallocation in Preallocation.allCases {
                for extendedL2 in clusterSize >= 16384 ? [false, true] : [false] {
                    let image = try MemoryImage(clusterSize: clusterSize, size: 6 << 20, refcountBits: refcountBits,
                                                extendedL2: extendedL2, preallocation: preallocation)
                    let report = image.check()
                    #expect(report.exitCode == 0, "\(clusterSize) \(refcountBits) \(preallocation): \(report.diagnostics)")
                    #expect(report.diagnostics.isEmpty)
                    if preallocation == .metadata {
                        #expect(report.final.allocatedClusters == (6 << 20) / clusterSize)
                        #expect(report.final.fragmentedClusters == 0)
                    }
                }
            }
        }
    }

    @Test func headerIsQemus() throws {
        let image = try MemoryImage(clusterSize: 65536, size: 10 << 30)
        let h = try Header.parse(image.storage.read(at: 0, count: 65536))
        #expect(h.version == 3)
        #expect(h.headerLength == 112)
        #expect(h.featureName(type: 0, bit: 4) == "extended L2 entries")
        #expect(h.featureName(type: 2, bit: 1) == "raw external data")
        #expect(h.extensions.map(\.type) == [HeaderExtensionType.featureNameTable])
        #expect(h.extensions[0].data.count == 8 * 48)
    }

    @Test func smallClustersLeaveTheFeatureTableOut() throws {
        let image = try MemoryImage(clusterSize: 4096, size: 1 << 20)
        let h = try Header.parse(image.storage.read(at: 0, count: 4096))
        #expect(h.extensions.isEmpty)
    }

    @Test func backingNameFollowsTheExtensions() throws {
        var o = CreateOptions()
        o.backingFile = "a.qcow2"
        o.backingFormat = .qcow2
        let l = try CreateLayout.compute(virtualSize: 1 << 30, clusterBits: 16, refcountOrder: 4, extendedL2: false,
                                         preallocation: .off)
        let bytes = try ImageCreator.header(options: o, layout: l)
        let h = try Header.parse(bytes)
        #expect(h.backingFileOffset == 528)   // where qemu-img create -b puts it
        #expect(h.backingFileName == "a.qcow2")
        #expect(h.backingFormat == "qcow2")
    }

    @Test func backingNameThatDoesNotFitIsRefused() throws {
        var o = CreateOptions()
        o.version = 2
        o.backingFile = String(repeating: "x", count: 500)
        o.backingFormat = .raw
        let l = try CreateLayout.compute(virtualSize: 1 << 20, clusterBits: 9, refcountOrder: 4, extendedL2: false,
                                         preallocation: .off)
        #expect(throws: ToolError.self) { try ImageCreator.header(options: o, layout: l) }
    }

    @Test func optionRules() {
        func refused(_ change: (inout CreateOptions) -> Void) -> Bool {
            var o = CreateOptions()
            o.size = 1 << 30
            change(&o)
            do { try o.validate(); return false } catch { return true }
        }
        #expect(refused { $0.version = 2; $0.lazyRefcounts = true })
        #expect(refused { $0.version = 2; $0.refcountBits = 8 })
        #expect(refused { $0.version = 2; $0.extendedL2 = true })
        #expect(refused { $0.version = 2; $0.compressionType = 1 })
        #expect(refused { $0.extendedL2 = true; $0.clusterSize = 8192 })
        #expect(refused { $0.clusterSize = 3000 })
        #expect(refused { $0.clusterSize = 256 })
        #expect(refused { $0.clusterSize = 4 << 20 })
        #expect(refused { $0.refcountBits = 3 })
        #expect(refused { $0.backingFile = "b"; $0.preallocation = .metadata })
        #expect(refused { $0.format = .raw; $0.backingFile = "b" })
        #expect(!refused { $0.backingFile = "b"; $0.preallocation = .metadata; $0.extendedL2 = true })
        #expect(!refused { $0.version = 2 })
    }
}
