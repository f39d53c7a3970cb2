// The checker's classification on hand-damaged images, in qemu-img check's terms: what is corruption,
// what is a leak, what the exit code is, and what a repair leaves behind.

import Testing
@testable import QCow2
@testable import QCow2Tools

@Suite struct CheckClassificationTests {
    @Test func cleanImageWithData() throws {
        let image = try MemoryImage()
        image.allocate(0)
        image.allocate(512 << 10)
        image.allocate(4096)
        let report = image.check()
        #expect(report.exitCode == 0)
        #expect(report.diagnostics.isEmpty)
        #expect(report.final.allocatedClusters == 3)
        // In guest order the hosts are 5, 7, 6: two breaks in host contiguity (qemu's fragmentation).
        #expect(report.final.fragmentedClusters == 2)
        #expect(report.final.totalClusters == 256)
        #expect(report.human.hasPrefix("No errors were found on the image.\n3/256 = 1.17% allocated"))
    }

    @Test func leakedClusters() throws {
        let image = try MemoryImage()
        image.allocate(0)
        let spare = image.appendCluster()
        image.setRefcount(spare / 4096, 1)
        let report = image.check()
        #expect(report.exitCode == 3)
        #expect(report.final.leaks == 1)
        #expect(report.final.corruptions == 0)
        #expect(findings(report) == ["Leaked cluster \(spare / 4096) refcount=1 reference=0"])
        #expect(report.human.contains("1 leaked clusters were found on the image."))
    }

    @Test func refcountTooLowIsCorruption() throws {
        let image = try MemoryImage()
        let host = image.allocate(0)
        image.setRefcount(host / 4096, 0)
        let report = image.check()
        #expect(report.exitCode == 2)
        // The refcount itself, and the COPIED flag that now disagrees with it.
        #expect(findings(report) == [
            "ERROR cluster \(host / 4096) refcount=0 reference=1",
            "ERROR OFLAG_COPIED data cluster: l2_entry=\(String(host | L2Entry.copied, radix: 16)) refcount=0",
        ])
        #expect(report.final.corruptions == 2)
    }

    @Test func sharedDataClusterNamesItsUsers() throws {
        let image = try MemoryImage()
        image.allocate(0)
        // A data cluster pointing at the L1 table: two references to a cluster with refcount 1.
        image.setU64(image.l2EntryOffset(8192), image.layout.l1Offset | L2Entry.copied)
        let report = image.check()
        #expect(report.exitCode == 2)
        let cluster = image.layout.l1Offset / 4096
        #expect(report.diagnostics.contains("ERROR cluster \(cluster) refcount=1 reference=2"))
        #expect(report.diagnostics.contains("  cluster \(cluster) is used by: active L1 table, 1 data reference(s)"))
    }

    @Test func offsetPastTheEndOfTheFile() throws {
        let image = try MemoryImage()
        image.allocate(0)
        image.setU64(image.l2EntryOffset(4096), (1 << 30) | L2Entry.copied)
        let report = image.check()
        #expect(report.exitCode == 2)
        #expect(report.diagnostics.contains(
            "ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                + "offset 0x40000000 size 0x1000"))
    }

    @Test func misalignedDataCluster() throws {
        let image = try MemoryImage()
        let host = image.allocate(0)
        image.setU64(image.l2EntryOffset(0), (host + 512) | L2Entry.copied)
        let report = image.check()
        #expect(report.exitCode == 2)
        #expect(report.diagnostics.contains(
            "ERROR offset=\(String(host + 512, radix: 16)): Data cluster is not properly aligned; L2 entry corrupted."))
    }

    @Test func reservedBits() throws {
        let image = try MemoryImage()
        let host = image.allocate(0)
        image.setU64(image.l2EntryOffset(0), host | L2Entry.copied | 0x100)
        let l1 = image.u64(image.layout.l1Offset)
        image.setU64(image.layout.l1Offset, l1 | 0x1)
        let report = image.check()
        #expect(report.exitCode == 2)
        #expect(report.final.corruptions == 2)
        #expect(report.diagnostics.contains("ERROR found L1 entry with reserved bits set: \(String(l1 | 1, radix: 16))"))
        #expect(report.diagnostics.contains(
            "ERROR found l2 entry with reserved bits set: \(String(host | L2Entry.copied | 0x100, radix: 16))"))
    }

    @Test func copiedFlagMismatch() throws {
        let image = try MemoryImage()
        let host = image.allocate(0)
        image.setU64(image.l2EntryOffset(0), host)   // refcount 1, COPIED clear
        let report = image.check()
        #expect(report.exitCode == 2)
        #expect(findings(report) == ["ERROR OFLAG_COPIED data cluster: l2_entry=\(String(host, radix: 16)) refcount=1"])
    }

    @Test func compressedClusterCountsOnEveryHostClusterItTouches() throws {
        let image = try MemoryImage()
        image.allocate(0)
        let a = image.appendCluster()
        _ = image.appendCluster()
        // 4 KiB clusters: offset bits 0..57, sector count above. Starts 1 KiB before the end of `a` and
        // runs 4 sectors: into the next cluster.
        let start = a + 3072
        let entry = L2Entry.compressedFlag | (UInt64(3) << 58) | start
        image.setU64(image.l2EntryOffset(8192), entry)
        image.setRefcount(a / 4096, 1)
        image.setRefcount(a / 4096 + 1, 1)
        var report = image.check()
        #expect(report.exitCode == 0, "\(report.diagnostics)")
        #expect(report.final.compressedClusters == 1)
        // Without the second cluster's refcount it is corruption: the compressed data spans it.
        image.setRefcount(a / 4096 + 1, 0)
        report = image.check()
        #expect(report.exitCode == 2)
        #expect(findings(report) == ["ERROR cluster \(a / 4096 + 1) refcount=0 reference=1"])
        // COPIED is never valid on a compressed entry.
        image.setRefcount(a / 4096 + 1, 1)
        image.setU64(image.l2EntryOffset(8192), entry | L2Entry.copied)
        report = image.check()
        #expect(report.exitCode == 2)
        #expect(report.final.corruptions == 1)
    }

    @Test func unalignedRefcountBlockCannotBeRead() throws {
        let image = try MemoryImage()
        image.setU64(image.layout.reftableOffset, image.layout.refblockOffsets[0] + 512)
        let report = image.check()
        #expect(report.exitCode == 1)   // refcounts could not be read: the check did not complete
        #expect(report.diagnostics.contains("ERROR refcount block 0 is not cluster aligned; refcount table entry corrupted"))
        #expect(report.final.checkErrors > 0)
    }

    @Test func rawImagesHaveNoCheck() {
        let report = ImageChecker.check(storage: MemoryStorage(bytes: [UInt8](repeating: 0, count: 4096)),
                                        name: "r.img", repair: nil)
        #expect(report.exitCode == 63)
    }

    @Test func truncatedHeaderDoesNotCheck() {
        let report = ImageChecker.check(storage: MemoryStorage(bytes: [0x51, 0x46, 0x49, 0xfb, 0, 0, 0, 3]),
                                        name: "t.qcow2", repair: nil)
        #expect(report.exitCode == 1)
        #expect(report.failure != nil)
    }

    @Test func jsonHasQemusKeys() throws {
        let image = try MemoryImage()
        image.allocate(0)
        let spare = image.appendCluster()
        image.setRefcount(spare / 4096, 1)
        let json = image.check().json.pretty()
        #expect(json.contains("\"leaks\": 1"))
        #expect(json.contains("\"check-errors\": 0"))
        #expect(json.contains("\"image-end-offset\": \(spare + 4096)"))
        #expect(!json.contains("corruptions"))   // zero counts are left out, as qemu-img does
    }
}

@Suite struct RepairTests {
    @Test func repairLeaks() throws {
        let image = try MemoryImage()
        image.allocate(0)
        let spare = image.appendCluster()
        image.setRefcount(spare / 4096, 2)
        let report = image.check(repair: .leaks)
        #expect(report.exitCode == 0)
        #expect(report.first.leaksFixed == 1)
        #expect(report.recheck != nil)
        #expect(report.diagnostics.contains("Repairing cluster \(spare / 4096) refcount=2 reference=0"))
        #expect(report.human.hasPrefix("The following inconsistencies were found and repaired:\n\n    1 leaked clusters\n"))
        #expect(image.refcount(spare / 4096) == 0)
        #expect(image.check().exitCode == 0)
    }

    @Test func repairLeaksLeavesCorruptionAlone() throws {
        let image = try MemoryImage()
        let host = image.allocate(0)
        image.setRefcount(host / 4096, 0)   // needs a rebuild in qemu's book: -r leaks refuses
        let before = image.storage.bytes
        let report = image.check(repair: .leaks)
        #expect(report.exitCode == 1)
        #expect(report.diagnostics.contains("ERROR need to rebuild refcount structures"))
        #expect(image.storage.bytes == before)
    }

    @Test func repairAllRaisesRefcounts() throws {
        let image = try MemoryImage()
        let host = image.allocate(0)
        let shared = image.allocate(4096)
        image.setU64(image.l2EntryOffset(8192), shared)   // a second reference, without COPIED
        image.setU64(image.l2EntryOffset(4096), shared)
        image.setRefcount(host / 4096, 0)
        let report = image.check(repair: .all)
        #expect(report.exitCode == 0, "\(report.diagnostics)")
        #expect(image.refcount(host / 4096) == 1)
        #expect(image.refcount(shared / 4096) == 2)
        #expect(image.check().exitCode == 0)
    }

    @Test func repairAllFixesCopiedFlags() throws {
        let image = try MemoryImage()
        let host = image.allocate(0)
        image.setU64(image.l2EntryOffset(0), host)
        let l1 = image.u64(image.layout.l1Offset)
        image.setU64(image.layout.l1Offset, l1 & ~L2Entry.copied)
        let report = image.check(repair: .all)
        #expect(report.exitCode == 0)
        #expect(report.first.corruptionsFixed == 2)
        #expect(image.u64(image.l2EntryOffset(0)) == host | L2Entry.copied)
        #expect(image.u64(image.layout.l1Offset) == l1)
    }

    @Test func repairClearsTheDirtyBit() throws {
        let image = try MemoryImage()
        image.allocate(0)
        let spare = image.appendCluster()
        image.setRefcount(spare / 4096, 1)
        image.setU64(Header.incompatibleFeaturesOffset, FeatureBit.dirty)
        #expect(image.check(repair: .leaks).exitCode == 0)
        #expect(image.u64(Header.incompatibleFeaturesOffset) == 0)
    }

    @Test func missingRefcountBlockAtTheEndIsRecreated() throws {
        // 512-byte clusters: one refcount block covers 256 clusters. Push data past cluster 256, then
        // drop that range's refcount block from the table.
        let image = try MemoryImage(clusterSize: 512, size: 1 << 20)
        for i in 0..<300 { image.allocate(UInt64(i) * 512) }
        let table = image.layout.reftableOffset
        // The image never had a second refcount block, as if its table entry had been lost: the clusters
        // past 255 are in use with refcount 0.
        #expect(image.u64(table + 8) == 0)
        var report = image.check()
        #expect(report.exitCode == 2)
        report = image.check(repair: .all)
        #expect(report.exitCode == 0, "\(report.diagnostics)")
        #expect(image.u64(table + 8) != 0)
        #expect(image.check().exitCode == 0)
    }

    @Test func misplacedRefcountBlockIsRefused() throws {
        let image = try MemoryImage()
        image.allocate(0)
        image.setU64(image.layout.reftableOffset, image.layout.refblockOffsets[0] + 512)
        let before = image.storage.bytes
        let report = image.check(repair: .all)
        #expect(report.exitCode == 1)
        #expect(report.diagnostics.contains("ERROR need to rebuild refcount structures"))
        #expect(image.storage.bytes == before)
    }
}
