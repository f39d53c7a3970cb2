// Writable images whose metadata points into itself, found by scripts/fuzz/QCow2WriteFuzz.swift: each
// must be refused at open with the structure named, or fail only the affected requests with EIO and
// set the corrupt bit; nothing may be written into the header, a table or a refcount block.

import BlockDevice
import Foundation
import Testing
@testable import QCow2

@Suite("Engine: hostile writable images")
struct HostileWriteTests {
    let u = UInt64(cs)

    /// The allocator took cluster 1 (the refcount table) for new data because its block said it was free.
    @Test func aTableClusterCountedFreeIsRefusedAtOpen() {
        var img = writableImage { $0.mapData(0, patternBytes(1, cs)) }
        setRefcount(&img, cluster: 1, to: 0)
        #expect(throws: QCow2Error.self) { try WriteShell(img) }
        do {
            _ = try WriteShell(img)
        } catch {
            #expect(error.structure == "refcount table")
            #expect(error.message.contains("refcount 0"))
        }
    }

    @Test func anL2TableOnTheRefcountBlockIsRefusedAtOpen() {
        var img = writableImage()
        img.file.setBE64(2 * u | L2Entry.copied, at: Int(img.header.l1TableOffset))
        img.countReferences()
        do {
            _ = try WriteShell(img)
            Issue.record("an L2 table sharing the refcount block's cluster was accepted")
        } catch {
            #expect(error.structure == "L1 entry 0")
            #expect(error.message.contains("refcount block 0"))
        }
    }

    @Test func aDataClusterOnTheL1TableFailsTheWriteAndSetsTheCorruptBit() throws {
        let img = writableImage { $0.mapExisting(0, host: $0.header.l1TableOffset) }
        let shell = try WriteShell(img)
        let l1Before = Array(img.file[Int(img.header.l1TableOffset)..<Int(img.header.l1TableOffset) + cs])
        shell.write(1, 16, patternBytes(2, 64))
        shell.runAll()
        #expect(shell.error(1)?.errno == 5)
        #expect(Array(shell.file[Int(img.header.l1TableOffset)..<Int(img.header.l1TableOffset) + cs]) == l1Before)
        #expect(shell.file.be64(Int(Header.incompatibleFeaturesOffset)) & FeatureBit.corrupt != 0)
    }

    /// A trimmed entry that pointed at the refcount block (counted once) would have freed and punched it.
    @Test func unlinkingADataEntryOnMetadataNeverFreesTheMetadata() throws {
        var img = writableImage { $0.mapExisting(0, host: 2 * UInt64($0.cs)) }
        setRefcount(&img, cluster: 2, to: 1)
        let shell = try WriteShell(img)
        shell.trim(1, 0, cs)
        shell.runAll()
        shell.flush(2)
        shell.runAll()
        #expect(!shell.log.contains { if case .punch = $0.op { true } else { false } })
        #expect(shell.engine.writableState!.refcounts.refcount(ofCluster: 2) == 1)
        #expect(shell.engine.failure != nil)
    }

    /// The first write reserved the cluster and then found its COW source invalid: it and the write
    /// parked behind its reservation used to wait forever.
    @Test func anInvalidCOWSourceFailsItsWritesInsteadOfHangingThem() throws {
        let img = writableImage { img in
            let x = img.geometry.compressedOffsetBits
            img.setL2(0, L2Entry.compressedFlag | (UInt64(1) << UInt64(x - 1)))
        }
        let shell = try WriteShell(img)
        shell.write(1, 10, patternBytes(3, 100))
        shell.write(2, 300, patternBytes(4, 50))
        shell.runAll()
        #expect(shell.error(1)?.errno == 5)
        #expect(shell.error(2)?.errno == 5)
        #expect(shell.engine.activeRequests == 0)
        #expect(shell.engine.writableState!.reservations.isEmpty)
    }

    private func setRefcount(_ img: inout TestImage, cluster: Int, to value: UInt64) {
        let block = Int(img.file.be64(Int(img.header.refcountTableOffset)))
        let order = img.geometry.refcountOrder
        let cs = img.cs
        img.file.withUnsafeMutableBytes { bytes in
            RefcountEntry.set(UnsafeMutableRawBufferPointer(rebasing: bytes[block..<block + cs]), index: cluster,
                              order: order, value: value)
        }
    }
}
