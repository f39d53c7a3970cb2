// QCow2Engine's read and block-status state machines, driven by the Shell test double, which holds
// every I/O action so each test decides what completes when.

import BlockDevice
import Foundation
import Testing
@testable import QCow2

/// 512-byte clusters: 64 entries per L2 table, so one table maps 32 KiB and table boundaries are cheap.
let cs = 512
let tableSpan = 32 * 1024

/// Checks a finished read against the image model.
func expectRead(_ shell: Shell, _ image: TestImage, _ tag: RequestTag, _ offset: Int, _ length: Int,
                backing: [UInt8]? = nil, sourceLocation: SourceLocation = #_sourceLocation) {
    guard let zeroRanges = shell.zeroRanges(tag) else {
        Issue.record("read \(tag) did not succeed: \(String(describing: shell.error(tag)))", sourceLocation: sourceLocation)
        return
    }
    let got = shell.bytes(tag)
    let want = image.guestBytes(offset, length, backing: backing)
    if got != want {
        let i = got.indices.first { got[$0] != want[$0] } ?? 0
        let text = "read \(tag) at \(offset)+\(length) differs first at byte \(i) (guest \(offset + i)): "
            + "got \(got[i]) want \(want[i])"
        Issue.record(Comment(rawValue: text), sourceLocation: sourceLocation)
    }
    // Zero ranges: sorted, disjoint, inside the read, and zeros there.
    var last: UInt64 = 0
    for r in zeroRanges {
        #expect(r.lowerBound >= last && r.upperBound <= UInt64(length) && !r.isEmpty, "\(zeroRanges)",
                sourceLocation: sourceLocation)
        last = r.upperBound
        #expect(got[Int(r.lowerBound)..<Int(r.upperBound)].allSatisfy { $0 == 0 }, "zero range \(r) holds data",
                sourceLocation: sourceLocation)
    }
}

@Suite("Engine: reads")
struct EngineReadTests {
    /// Table 0 with data in clusters 0...9 (each its own host cluster, appended in order, so contiguous).
    func tenClusters(size: Int = 4 * tableSpan) -> TestImage {
        var img = TestImage(size: UInt64(size))
        img.l2Table(0)
        for c in 0..<10 { img.mapData(c, patternBytes(UInt64(c), cs)) }
        return img
    }

    @Test func threeRequestsShareOneL2LoadAndWakeInFIFOOrder() throws {
        let img = tenClusters()
        let shell = try Shell(img)
        let table = img.l1[0] & L1Entry.offsetMask
        shell.read(1, 0, 4 * cs)          // clusters 0...3
        shell.read(2, 1000, 3000)         // clusters 1...7
        shell.read(3, 300, 200)           // inside cluster 0
        #expect(shell.held.count == 1)
        #expect(shell.fileReadCount(at: table) == 1)
        #expect(shell.fileReads.first?.count == cs)
        #expect(shell.engine.activeRequests == 3)
        #expect(shell.finished.isEmpty)

        shell.run(0)   // the table arrives: A, then B, then C resume and issue their data reads
        #expect(shell.fileReadCount(at: table) == 1)
        let owners = shell.held.map { action -> RequestTag in
            let base = action.destination!.baseAddress!
            return (1...3).first { tag in
                let b = shell.buffer(tag)
                return base >= b.baseAddress! && base < b.baseAddress! + b.count
            } ?? 0
        }
        #expect(owners == [1, 2, 3])
        // Contiguous host clusters: one read per request.
        #expect(shell.held.count == 3)
        shell.runAll(.lifo)
        #expect(shell.finished == [3, 2, 1])
        expectRead(shell, img, 1, 0, 4 * cs)
        expectRead(shell, img, 2, 1000, 3000)
        expectRead(shell, img, 3, 300, 200)
        #expect(shell.engine.activeRequests == 0)
    }

    @Test func parkedRequestsOnZeroClustersCompleteInFIFOOrder() throws {
        var img = TestImage(size: UInt64(tableSpan))
        img.mapZero(0)
        img.mapZero(1)
        let shell = try Shell(img)
        for tag in RequestTag(1)...5 { shell.read(tag, Int(tag) * 37, 600) }
        #expect(shell.held.count == 1)
        shell.run(0)
        #expect(shell.finished == [1, 2, 3, 4, 5])
        #expect(shell.held.isEmpty)
        for tag in RequestTag(1)...5 {
            expectRead(shell, img, tag, Int(tag) * 37, 600)
            #expect(shell.zeroRanges(tag) == [0..<600])
        }
    }

    @Test func dataReadsCompletingOutOfOrder() throws {
        var img = TestImage(size: UInt64(tableSpan))
        // Every cluster on a non-adjacent host cluster: one read each.
        for c in 0..<8 {
            img.appendCluster(patternBytes(1000, cs))   // a gap
            img.mapData(c, patternBytes(UInt64(50 + c), cs))
        }
        let shell = try Shell(img)
        shell.read(1, 100, 8 * cs - 200)
        shell.run(0)
        #expect(shell.held.count == 8)
        // Complete 2nd before 1st, last first, ...
        for i in [1, 6, 0, 4, 3, 0, 1, 0] {
            #expect(!shell.done(1))
            shell.run(i)
        }
        #expect(shell.done(1))
        expectRead(shell, img, 1, 100, 8 * cs - 200)
        #expect(shell.zeroRanges(1) == [])
    }

    @Test func readAcrossAnL2TableBoundary() throws {
        var img = TestImage(size: UInt64(3 * tableSpan))
        img.l2Table(0)
        img.l2Table(1)
        let last = tableSpan / cs - 1
        img.mapData(last - 1, patternBytes(1, cs))
        img.mapData(last, patternBytes(2, cs))
        img.mapData(last + 1, patternBytes(3, cs))    // host-contiguous with `last`, but in the next table
        img.mapData(last + 2, patternBytes(4, cs))
        let shell = try Shell(img)
        let t0 = img.l1[0] & L1Entry.offsetMask
        let t1 = img.l1[1] & L1Entry.offsetMask
        let offset = tableSpan - 2 * cs + 10
        shell.read(1, offset, 4 * cs - 20)
        #expect(shell.held.count == 1 && shell.heldFileRead(at: t0) != nil)
        shell.run(0)
        // Data of table 0 issued, then parked on table 1.
        #expect(shell.heldFileRead(at: t1) != nil)
        #expect(shell.held.count == 2)
        shell.run(shell.heldFileRead(at: t1)!)
        #expect(shell.held.count == 2)   // data of table 0, data of table 1: not merged across tables
        shell.runAll(.lifo)
        expectRead(shell, img, 1, offset, 4 * cs - 20)
        #expect(shell.fileReadCount(at: t0) == 1 && shell.fileReadCount(at: t1) == 1)
    }

    @Test func hostContiguousClustersMergeIntoOneRead() throws {
        var img = TestImage(size: UInt64(tableSpan))
        img.l2Table(0)
        let h0 = img.mapData(0, patternBytes(10, cs))
        img.mapData(1, patternBytes(11, cs))
        img.mapData(2, patternBytes(12, cs))
        img.mapData(3, patternBytes(13, cs))
        img.appendCluster()
        let h4 = img.mapData(4, patternBytes(14, cs))
        img.mapData(5, patternBytes(15, cs))
        // Cluster 6 points backwards: contiguous in the guest, not on the host.
        img.mapExisting(6, host: h0)
        img.mapData(7, patternBytes(17, cs))
        let shell = try Shell(img)
        shell.read(1, 0, 8 * cs)
        shell.run(0)
        let reads = shell.held.map { action -> (UInt64, Int) in
            guard case .readFile(_, let o, let b) = action else { return (0, 0) }
            return (o, b.count)
        }
        #expect(reads.map(\.0) == [h0, h4, h0, h4 + 2 * UInt64(cs)])
        #expect(reads.map(\.1) == [4 * cs, 2 * cs, cs, cs])
        shell.runAll(.random(3))
        expectRead(shell, img, 1, 0, 8 * cs)

        // Unaligned start and end inside the merged run.
        shell.read(2, 100, 3 * cs)
        #expect(shell.held.count == 1)
        guard case .readFile(_, let o, let b) = shell.held[0] else { Issue.record("no file read"); return }
        #expect(o == h0 + 100 && b.count == 3 * cs)
        shell.runAll()
        expectRead(shell, img, 2, 100, 3 * cs)
    }

    @Test func zeroAndUnallocatedRangesAreReported() throws {
        var img = TestImage(size: UInt64(2 * tableSpan))
        img.mapZero(1)
        img.mapZeroAllocated(2)
        img.mapData(3, patternBytes(3, cs))
        img.mapZero(5)
        // 0 unallocated, 1 zero, 2 zero-allocated, 3 data, 4 unallocated, 5 zero, 6... unallocated; table 1 absent.
        let shell = try Shell(img)
        shell.read(1, 0, 2 * tableSpan)
        shell.runAll()
        expectRead(shell, img, 1, 0, 2 * tableSpan)
        #expect(shell.zeroRanges(1) == [0..<UInt64(3 * cs), UInt64(4 * cs)..<UInt64(2 * tableSpan)])
        // Only the data cluster was read from the file, besides the table.
        #expect(shell.fileReads.count == 2)

        shell.read(2, 2 * cs + 7, 10)   // inside the zero-allocated cluster: no I/O at all
        #expect(shell.done(2) && shell.held.isEmpty)
        #expect(shell.zeroRanges(2) == [0..<10])
        expectRead(shell, img, 2, 2 * cs + 7, 10)
    }

    @Test func unallocatedWithBackingIsClippedAtTheBackingSize() throws {
        var img = TestImage(size: UInt64(2 * tableSpan), backingName: "base.raw")
        img.mapData(0, patternBytes(20, cs))
        img.mapZero(3)
        let backing = patternBytes(21, 1200)   // smaller than the overlay
        let shell = try Shell(img, backing: backing)
        shell.read(1, 0, 4 * cs)
        shell.run(0)
        let backingReads = shell.indices(\.isReadBacking)
        #expect(backingReads.count == 1)
        if case .readBacking(_, let offset, let into) = shell.held[backingReads[0]] {
            #expect(offset == UInt64(cs) && into.count == 1200 - cs)   // clusters 1-2, clipped at 1200
        }
        shell.runAll(.lifo)
        expectRead(shell, img, 1, 0, 4 * cs, backing: backing)
        #expect(shell.zeroRanges(1) == [1200..<UInt64(4 * cs)])

        // No L2 table at all (table 1): the backing is past its end, so pure zeros with no I/O.
        shell.read(2, tableSpan + 5, 3000)
        #expect(shell.done(2) && shell.held.isEmpty)
        #expect(shell.zeroRanges(2) == [0..<3000])

        // Straddling the backing's end without a table in the overlay.
        let big = patternBytes(22, tableSpan + 4000)
        let shell2 = try Shell(img, backing: big)
        shell2.read(3, tableSpan + 1000, 6000)
        #expect(shell2.indices(\.isReadBacking).count == 1)
        if case .readBacking(_, let offset, let into) = shell2.held[0] {
            #expect(offset == UInt64(tableSpan + 1000) && into.count == 3000)
        }
        shell2.runAll()
        expectRead(shell2, img, 3, tableSpan + 1000, 6000, backing: big)
        #expect(shell2.zeroRanges(3) == [3000..<6000])
    }

    @Test func l2LoadFailureFailsEveryParkedRequestThenRetries() throws {
        let img = tenClusters()
        let shell = try Shell(img)
        let table = img.l1[0] & L1Entry.offsetMask
        shell.read(1, 0, cs)
        shell.read(2, 700, 2000)
        shell.status(3, 0, 4 * cs)
        shell.read(4, tableSpan + 10, 100)   // table 1 is absent: zeros, unaffected
        #expect(shell.done(4))
        #expect(shell.held.count == 1)
        shell.run(0, fail: 61)   // ENODATA
        for tag: RequestTag in [1, 2, 3] {
            let e = shell.error(tag)
            #expect(e?.errno == 61, "request \(tag)")
            #expect(e?.message?.contains("L2 table at \(hex(table))") == true, "\(String(describing: e))")
        }
        #expect(shell.finished == [4, 1, 2, 3])
        #expect(shell.engine.activeRequests == 0)
        // A later read loads the table again, and succeeds.
        shell.read(5, 0, 10 * cs)
        #expect(shell.fileReadCount(at: table) == 2)
        shell.runAll()
        expectRead(shell, img, 5, 0, 10 * cs)
    }

    @Test func corruptL2EntryFailsOnlyThatRequest() throws {
        var img = TestImage(size: UInt64(tableSpan))
        img.mapData(0, patternBytes(1, cs))
        img.mapCompressed(1, payload: patternBytes(2, 100))
        img.mapData(2, patternBytes(3, cs))
        img.mapData(3, patternBytes(4, cs))
        img.mapData(4, patternBytes(5, cs))
        let at = img.l2EntryOffset(2)
        img.file.setBE64(img.file.be64(at) | 0x2, at: at)   // reserved bit 1 in cluster 2's entry
        let shell = try Shell(img)
        shell.read(1, 0, 3 * cs)          // clusters 0, 1 fine (I/O issued), 2 corrupt
        shell.read(2, 3 * cs, 2 * cs)     // clusters 3, 4
        shell.read(3, 2 * cs + 5, 5)      // only the corrupt cluster
        shell.run(0)
        // Request 3 fails at once; request 1 waits for the read it already issued for clusters 0-1.
        #expect(shell.done(3) && !shell.done(1))
        #expect(shell.error(3)?.errno == 5)
        #expect(shell.error(3)?.message?.contains("L2 entry 2") == true, "\(String(describing: shell.error(3)))")
        #expect(shell.error(3)?.message?.contains("reserved") == true)
        shell.runAll(.lifo)
        #expect(shell.error(1)?.errno == 5)
        #expect(shell.error(1)?.message?.contains("L2 entry 2") == true)
        #expect(shell.finished == [3, 2, 1])
        expectRead(shell, img, 2, 3 * cs, 2 * cs)
        #expect(shell.engine.activeRequests == 0)
        // Later reads of healthy clusters still work from the cached table.
        shell.read(4, 0, 2 * cs)
        shell.runAll()
        expectRead(shell, img, 4, 0, 2 * cs)
        #expect(shell.fileReadCount(at: img.l1[0] & L1Entry.offsetMask) == 1)
    }

    @Test func dataOutsideTheFileIsEIO() throws {
        var img = TestImage(size: UInt64(tableSpan))
        img.mapData(0, patternBytes(1, cs))
        img.setL2(1, UInt64(64 << 20) | L2Entry.copied)   // far past the end of the file
        let shell = try Shell(img)
        shell.read(1, 0, 2 * cs)
        shell.runAll()
        #expect(shell.error(1)?.errno == 5)
        #expect(shell.error(1)?.message?.contains("outside the image file") == true)
    }

    @Test func readErrorsCarryTheirErrno() throws {
        let img = tenClusters()
        let shell = try Shell(img)
        shell.read(1, 0, cs)
        shell.run(0)
        shell.run(0, fail: 28)
        #expect(shell.error(1)?.errno == 28)
    }

    @Test func l1EntryPastTheFileIsRefusedAtOpen() {
        var img = TestImage(size: UInt64(2 * tableSpan))
        img.file.setBE64(UInt64(1 << 30), at: Int(img.header.l1TableOffset) + 8)
        expectQCow2Error("L1 entry 1", ["outside the image file"]) { _ = try Shell(img) }
        img.file.setBE64(UInt64(cs) | 1 << 62, at: Int(img.header.l1TableOffset) + 8)
        expectQCow2Error("L1 entry 1", ["reserved"]) { _ = try Shell(img) }
    }

    @Test func compressedClusters() throws {
        var img = TestImage(size: UInt64(tableSpan))
        img.mapData(0, patternBytes(30, cs))
        let c1 = img.mapCompressed(1, payload: patternBytes(31, 100), skew: 77)
        let c2 = img.mapCompressed(2, payload: patternBytes(32, 480), skew: 200, trailing: 300)   // spans two sectors
        let c3 = img.mapCompressed(3, payload: patternBytes(33, 5), skew: 3)   // last in the file: descriptor claims past EOF
        let shell = try Shell(img)
        shell.read(1, 0, 4 * cs)
        shell.run(0)
        let compressedReads = shell.held.compactMap { action -> (UInt64, Int)? in
            guard case .readFile(_, let o, let b) = action, o != img.l1[0] & L1Entry.offsetMask else { return nil }
            return (o, b.count)
        }
        #expect(compressedReads.count == 4)
        #expect(compressedReads[1] == (c1.host, c1.byteCount))
        #expect(compressedReads[2] == (c2.host, c2.byteCount))
        // Clipped at the end of the file (rounded up to a cluster; the rest reads as zeros).
        let roundedEnd = (img.file.count + cs - 1) / cs * cs
        #expect(c3.byteCount >= roundedEnd - Int(c3.host))
        #expect(compressedReads[3] == (c3.host, roundedEnd - Int(c3.host)))
        // Whole-cluster reads inflate straight into the caller's buffer.
        let fileIndex = shell.heldFileRead(at: c1.host)!
        shell.run(fileIndex)
        let inflate = shell.indices(\.isDecompress)
        #expect(inflate.count == 1)
        #expect(shell.held[inflate[0]].destination?.baseAddress == shell.buffer(1).baseAddress! + cs)
        shell.runAll(.random(9))
        expectRead(shell, img, 1, 0, 4 * cs)

        // Partial reads go through scratch and copy only the asked bytes.
        for (tag, offset, length) in [(RequestTag(2), cs + 100, 50), (3, 2 * cs + 400, 300), (4, 3 * cs + 511, 1)] {
            shell.read(tag, offset, length)
            shell.runAll(.lifo)
            expectRead(shell, img, tag, offset, length)
        }
    }

    @Test func decompressionFailureIsEIO() throws {
        var img = TestImage(size: UInt64(tableSpan))
        let c = img.mapCompressed(0, payload: patternBytes(40, 64))
        img.file[Int(c.host)] = 0xff   // claims a payload longer than the descriptor
        let shell = try Shell(img)
        shell.read(1, 0, 1000)
        shell.runAll()
        #expect(shell.error(1)?.errno == 5)
        #expect(shell.error(1)?.message?.contains("decompress") == true)
        // Failing the compressed data read itself passes its errno on.
        shell.read(2, 0, 100)
        shell.run(0, fail: 61)
        #expect(shell.error(2)?.errno == 61)
    }

    @Test func extendedL2Subclusters() throws {
        // 16 KiB clusters, 512-byte subclusters.
        var img = TestImage(clusterBits: 14, size: 4 << 20, extendedL2: true, backingName: "b.raw")
        let sub = 512
        img.mapSubclusters(0, alloc: 0b0000_1111, zero: 0b0011_0000, contents: patternBytes(50, 16384))
        img.mapSubclusters(1, alloc: 0, zero: 0xffff_ffff, contents: [])
        img.mapSubclusters(2, alloc: 0x8000_0001, zero: 0x0000_0002, contents: patternBytes(51, 16384))
        img.mapData(3, patternBytes(52, 16384))
        let backing = patternBytes(53, 3 << 20)
        let shell = try Shell(img, backing: backing)
        shell.read(1, 0, 5 * 16384)
        shell.runAll(.random(5))
        expectRead(shell, img, 1, 0, 5 * 16384, backing: backing)
        shell.read(2, 3 * sub + 100, 16384 * 2 + 600)
        shell.runAll(.lifo)
        expectRead(shell, img, 2, 3 * sub + 100, 16384 * 2 + 600, backing: backing)
        // Zero subclusters are reported as zero ranges.
        shell.read(3, 4 * sub, 2 * sub)
        shell.runAll()
        #expect(shell.zeroRanges(3) == [0..<UInt64(2 * sub)])
    }

    @Test func corruptSubclusterBitmapIsEIO() throws {
        var img = TestImage(clusterBits: 14, size: 1 << 20, extendedL2: true)
        img.setL2(0, 0, bitmap: 1)   // subcluster 0 allocated without a host cluster
        let shell = try Shell(img)
        shell.read(1, 0, 512)
        shell.runAll()
        #expect(shell.error(1)?.errno == 5)
        #expect(shell.error(1)?.message?.contains("L2 entry 0") == true)
    }
}

@Suite("Engine: L2 cache under a tiny budget")
struct EngineCacheTests {
    /// Eight tables, each with data in its first two clusters.
    func eightTables() -> TestImage {
        var img = TestImage(size: UInt64(8 * tableSpan))
        for t in 0..<8 {
            img.mapData(t * 64, patternBytes(UInt64(100 + t), cs))
            img.mapData(t * 64 + 1, patternBytes(UInt64(200 + t), cs))
        }
        return img
    }

    func tableOffset(_ img: TestImage, _ t: Int) -> UInt64 { img.l1[t] & L1Entry.offsetMask }

    @Test func everySlotLoadingOverflowsWithoutEvictingOrCrashing() throws {
        let img = eightTables()
        let shell = try Shell(img, cacheBytes: 1)   // the minimum: 4 slots
        for t in 0..<6 { shell.read(RequestTag(t), t * tableSpan + 100, 2 * cs) }
        // Six loads in flight: each table read exactly once, nothing evicted.
        #expect(shell.held.count == 6)
        for t in 0..<6 { #expect(shell.fileReadCount(at: tableOffset(img, t)) == 1) }
        // Another request on a loading table joins its queue rather than reloading it.
        shell.read(10, 3 * tableSpan, 10)
        #expect(shell.held.count == 6)
        for t in [5, 3, 1, 0, 2, 4] {
            shell.run(shell.heldFileRead(at: tableOffset(img, t))!)
        }
        shell.runAll(.random(11))
        for t in 0..<6 { expectRead(shell, img, RequestTag(t), t * tableSpan + 100, 2 * cs) }
        expectRead(shell, img, 10, 3 * tableSpan, 10)
        for t in 0..<6 { #expect(shell.fileReadCount(at: tableOffset(img, t)) == 1) }

        // Least recently used, by wake-up order: 5, 3, 1, 0, 2, 4. Loading table 6 brings the
        // overflowing cache back to its budget, so table 3 (second oldest) is gone as well.
        shell.read(20, 6 * tableSpan, cs)
        shell.runAll()
        shell.read(21, 3 * tableSpan, cs)
        shell.runAll()
        #expect(shell.fileReadCount(at: tableOffset(img, 3)) == 2)
        // The most recently used survive.
        shell.read(22, 4 * tableSpan, cs)
        shell.read(23, 6 * tableSpan, cs)
        shell.runAll()
        #expect(shell.fileReadCount(at: tableOffset(img, 4)) == 1)
        #expect(shell.fileReadCount(at: tableOffset(img, 6)) == 1)
        for tag: RequestTag in [20, 21, 22, 23] { #expect(shell.zeroRanges(tag) != nil) }
    }

    @Test func sequentialReadsEvictLeastRecentlyUsed() throws {
        let img = eightTables()
        let shell = try Shell(img, cacheBytes: 4 * cs)
        var tag: RequestTag = 0
        for pass in 0..<2 {
            for t in 0..<8 {
                tag += 1
                shell.read(tag, t * tableSpan, 2 * cs)
                shell.runAll()
                expectRead(shell, img, tag, t * tableSpan, 2 * cs)
                #expect(shell.fileReadCount(at: tableOffset(img, t)) == pass + 1)
            }
        }
        // The last four are cached.
        for t in 4..<8 {
            tag += 1
            shell.read(tag, t * tableSpan, cs)
            shell.runAll()
            #expect(shell.fileReadCount(at: tableOffset(img, t)) == 2)
        }
    }

    @Test func aWakingTableIsNotEvictedBeforeItsWaitersRun() throws {
        let img = eightTables()
        let shell = try Shell(img, cacheBytes: 1)   // 4 slots
        // Three tables loading (0, 1, 2) and table 3 loading with two requests that go on into table 4.
        shell.read(1, 0, 10)
        shell.read(2, tableSpan, 10)
        shell.read(3, 2 * tableSpan, 10)
        shell.read(4, 4 * tableSpan - cs, 2 * cs)
        shell.read(5, 4 * tableSpan - cs + 10, 2 * cs)
        #expect(shell.held.count == 4)
        shell.run(shell.heldFileRead(at: tableOffset(img, 3))!)
        // Request 4 moved on to table 4 (loading it); request 5 still found table 3 in memory.
        #expect(shell.fileReadCount(at: tableOffset(img, 3)) == 1)
        #expect(shell.fileReadCount(at: tableOffset(img, 4)) == 1)
        shell.runAll(.random(4))
        for (tag, offset) in [(RequestTag(1), 0), (2, tableSpan), (3, 2 * tableSpan)] { expectRead(shell, img, tag, offset, 10) }
        expectRead(shell, img, 4, 4 * tableSpan - cs, 2 * cs)
        expectRead(shell, img, 5, 4 * tableSpan - cs + 10, 2 * cs)
        #expect(shell.fileReadCount(at: tableOffset(img, 3)) == 1)
    }
}

@Suite("Engine: block status")
struct EngineStatusTests {
    /// Table 0: 0 unallocated, 1 zero, 2 zero-allocated, 3 data, 4 compressed, 5 unallocated,
    /// 6 data, 7... unallocated. Table 1 absent.
    func kinds(backing: Bool) -> TestImage {
        var img = TestImage(size: UInt64(2 * tableSpan), backingName: backing ? "b.raw" : nil)
        img.mapZero(1)
        img.mapZeroAllocated(2)
        img.mapData(3, patternBytes(3, cs))
        img.mapCompressed(4, payload: [1, 2, 3])
        img.mapData(6, patternBytes(6, cs))
        return img
    }

    func ext(_ length: Int, _ flags: ExtentFlags, _ depth: UInt32) -> Extent {
        Extent(length: UInt64(length), flags: flags, depth: depth)
    }

    @Test func flagsAndDepthsWithoutBacking() throws {
        let shell = try Shell(kinds(backing: false))
        shell.status(1, 0, 2 * tableSpan)
        #expect(shell.held.count == 1)
        shell.runAll()
        // One table's worth at most, and no reads besides the table.
        #expect(shell.extents(1) == [
            ext(cs, [.hole, .zero], 0), ext(cs, [.hole, .zero], 1), ext(cs, [.zero], 1), ext(2 * cs, [], 1),
            ext(cs, [.hole, .zero], 0), ext(cs, [], 1), ext(tableSpan - 7 * cs, [.hole, .zero], 0),
        ])
        #expect(shell.fileReads.count == 1)
        // The absent table: unallocated, no I/O.
        shell.status(2, tableSpan + 100, 1000)
        #expect(shell.extents(2) == [ext(1000, [.hole, .zero], 0)])
        // Unaligned start and a short range.
        shell.status(3, 2 * cs + 3, cs)
        #expect(shell.extents(3) == [ext(cs - 3, [.zero], 1), ext(3, [], 1)])
    }

    @Test func backingAnswersAreOneLevelDeeper() throws {
        let shell = try Shell(kinds(backing: true), backing: patternBytes(1, 20 * 1024))
        var asked: [(UInt64, UInt64)] = []
        shell.backingStatus = { offset, length in
            asked.append((offset, length))
            // data, then a hole that is nowhere, then a zero cluster of the backing's own.
            return [Extent(length: 100, flags: [], depth: 1), Extent(length: 200, flags: [.hole, .zero], depth: 0),
                    Extent(length: 1 << 30, flags: [.hole, .zero], depth: 1)]
        }
        // Cluster 0 is unallocated and first: the backing is asked about it (only it: cluster 1 is zero).
        shell.status(1, 0, tableSpan)
        shell.runAll()
        #expect(asked.count == 1 && asked[0] == (0, UInt64(cs)))
        #expect(shell.extents(1) == [ext(100, [], 2), ext(200, [.hole, .zero], 0), ext(cs - 300, [.hole, .zero], 2)])
        // From cluster 1 the reply stops where the backing would be needed again (cluster 5).
        shell.status(2, cs, tableSpan - cs)
        #expect(shell.extents(2) == [ext(cs, [.hole, .zero], 1), ext(cs, [.zero], 1), ext(2 * cs, [], 1)])
        #expect(asked.count == 1)
        // From cluster 7: one question for the whole unallocated run, up to the backing's end.
        shell.status(3, 7 * cs, tableSpan)
        shell.runAll()
        #expect(asked.count == 2 && asked[1] == (UInt64(7 * cs), UInt64(20 * 1024 - 7 * cs)))   // clipped at its end
        // Past the backing's end (20 KiB): zeros from nowhere, without asking.
        shell.status(4, tableSpan + 10, 5000)
        #expect(shell.extents(4) == [ext(5000, [.hole, .zero], 0)])
        #expect(asked.count == 2)
        // A range straddling the backing's end asks only about the part inside it.
        shell.status(5, 20 * 1024 - 700, 2000)
        shell.runAll()
        #expect(asked.count == 3 && asked[2] == (UInt64(20 * 1024 - 700), 700))
        #expect(shell.extents(5).map { $0.reduce(0) { $0 + $1.length } } == 700)
    }

    @Test func backingStatusFailureFailsTheQuery() throws {
        let shell = try Shell(kinds(backing: true), backing: zeros(4096))
        shell.status(1, 0, 100)
        shell.run(0)
        #expect(shell.indices(\.isBackingStatus).count == 1)
        shell.run(0, fail: 5)
        #expect(shell.error(1)?.errno == 5)
        #expect(shell.engine.activeRequests == 0)
    }

    @Test func extendedL2Subclusters() throws {
        var img = TestImage(clusterBits: 14, size: 1 << 20, extendedL2: true)
        img.mapSubclusters(0, alloc: 0b1111, zero: 0b11_0000, contents: patternBytes(1, 16384))
        img.mapSubclusters(1, alloc: 0, zero: 0xffff_ffff, contents: [])
        img.mapSubclusters(2, alloc: 0, zero: 0x0000_0001, contents: [])
        let shell = try Shell(img)
        shell.status(1, 0, 1 << 20)
        shell.runAll()
        #expect(shell.extents(1) == [
            ext(4 * 512, [], 1), ext(2 * 512, [.zero], 1), ext(26 * 512, [.hole, .zero], 0),
            ext(16384 + 512, [.hole, .zero], 1), ext((1 << 20) - 2 * 16384 - 512, [.hole, .zero], 0),
        ])
    }

    @Test func corruptEntryFailsTheQuery() throws {
        var img = kinds(backing: false)
        let at = img.l2EntryOffset(3)
        img.file.setBE64(img.file.be64(at) | 1 << 60, at: at)
        let shell = try Shell(img)
        shell.status(1, 0, tableSpan)
        shell.runAll()
        #expect(shell.error(1)?.errno == 5)
        #expect(shell.error(1)?.message?.contains("L2 entry 3") == true)
    }
}

@Suite("Engine: randomized against a model")
struct EngineRandomTests {
    @Test(arguments: [UInt64(1), 2, 3, 4])
    func randomImagesRandomOrder(seed: UInt64) throws {
        var rng = SeededRandom(seed: seed)
        let tables = 6
        var img = TestImage(size: UInt64(tables * tableSpan - 300), backingName: seed % 2 == 0 ? "b.raw" : nil)
        let backing: [UInt8]? = seed % 2 == 0 ? patternBytes(seed, tableSpan * 3 + 123) : nil
        var lastHost: UInt64 = 0
        for c in 0..<(tables * 64) where c / 64 != 4 {   // table 4 stays absent
            switch Int.random(in: 0..<10, using: &rng) {
            case 0, 1: break   // unallocated
            case 2: img.mapZero(c)
            case 3: img.mapZeroAllocated(c)
            case 4: img.mapCompressed(c, payload: patternBytes(UInt64(c), Int.random(in: 1...480, using: &rng)),
                                      skew: Int.random(in: 0..<600, using: &rng))
            case 5 where lastHost != 0:
                img.mapExisting(c, host: lastHost)   // shared with an earlier cluster
            default: lastHost = img.mapData(c, patternBytes(seed << 20 | UInt64(c), cs))
            }
        }
        let shell = try Shell(img, backing: backing, cacheBytes: 1)
        var live: [(RequestTag, Int, Int)] = []
        var tag: RequestTag = 0
        var checked = 0
        for _ in 0..<400 {
            if live.count < 12 && (shell.held.isEmpty || Bool.random(using: &rng)) {
                tag += 1
                let offset = Int.random(in: 0..<Int(img.header.size) - 1, using: &rng)
                let length = min(Int.random(in: 1...3 * tableSpan / 2, using: &rng), Int(img.header.size) - offset)
                shell.read(tag, offset, length)
                live.append((tag, offset, length))
            } else if !shell.held.isEmpty {
                shell.run(Int.random(in: 0..<shell.held.count, using: &rng))
            }
            for (i, r) in live.enumerated().reversed() where shell.done(r.0) {
                expectRead(shell, img, r.0, r.1, r.2, backing: backing)
                live.remove(at: i)
                checked += 1
            }
        }
        shell.runAll(.random(seed))
        for r in live { expectRead(shell, img, r.0, r.1, r.2, backing: backing); checked += 1 }
        #expect(shell.engine.activeRequests == 0)
        #expect(checked == Int(tag))
    }
}

@Suite("Engine: images made by qemu-img and qemu-io")
struct EngineQemuImageTests {
    static let cases: [(String, [String])] = [
        ("v3 64k", ["-o", "cluster_size=64k"]),
        ("v2 512", ["-o", "compat=0.10,cluster_size=512"]),
        ("v3 4k refcount 1", ["-o", "cluster_size=4k,refcount_bits=1"]),
        ("extended L2 64k", ["-o", "extended_l2=on,cluster_size=64k"]),
        ("2M clusters", ["-o", "cluster_size=2M"]),
    ]

    /// qemu-io commands: patterns at unaligned offsets, zeroes, a discard, across L2 tables for 512 B clusters.
    static let writes = [
        "write -P 0x11 0 70k", "write -P 0x22 123457 9999", "write -z 200k 130k", "write -P 0x33 1m 64k",
        "write -P 0x44 1000k 3k", "discard 1m 64k", "write -P 0x55 3m 5555", "write -z 3m 512",
        "write -P 0x66 5m 2m", "write -z -u 6m 128k",
    ]

    @Test(.enabled(if: Qemu.available), arguments: cases)
    func wholeDiskMatchesQemu(_ name: String, _ options: [String]) throws {
        let dir = try Qemu.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        try Qemu.run("qemu-img", ["create", "-q", "-f", "raw", "base.raw", "6M"], in: dir)
        try Qemu.run("qemu-io", ["-f", "raw", "-c", "write -P 0x77 0 6M", "base.raw"], in: dir)
        try Qemu.run("qemu-img", ["create", "-q", "-f", "qcow2"] + options + ["-b", "base.raw", "-F", "raw", "img.qcow2", "8M"], in: dir)
        try Qemu.run("qemu-io", ["-f", "qcow2"] + Self.writes.flatMap { ["-c", $0] } + ["img.qcow2"], in: dir)
        try Qemu.run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", "img.qcow2", "want.raw"], in: dir)
        let file = try Qemu.bytes(dir.appendingPathComponent("img.qcow2"))
        let backing = try Qemu.bytes(dir.appendingPathComponent("base.raw"))
        let want = try Qemu.bytes(dir.appendingPathComponent("want.raw"))
        let clusterBytes = Header.bytesNeeded(prefix: Array(file.prefix(104)))
        let header = try Header.parse(Array(file.prefix(clusterBytes)))
        try header.validate(fileSize: UInt64(file.count), writable: false)
        let l1 = (0..<Int(header.l1Size)).map { file.be64(Int(header.l1TableOffset) + 8 * $0) }
        let engine = try QCow2Engine(header: header, l1: l1, fileSize: UInt64(file.count),
                                     backingSize: UInt64(backing.count), cacheBytes: 1)
        #expect(want.count == 8 << 20)

        // Many reads in flight, completions in random order.
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: want.count, alignment: 16)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0xee)
        var rng = SeededRandom(seed: 77)
        var held: [IOAction] = []
        var done = 0
        var offset = 0
        var requests = 0
        func pull() {
            for a in engine.takeActions() {
                if case .complete(_, let outcome) = a {
                    done += 1
                    if case .failed(let e) = outcome { Issue.record("read failed: \(e)") }
                } else {
                    held.append(a)
                }
            }
        }
        while offset < want.count {
            let length = min(Int.random(in: 1...300_000, using: &rng), want.count - offset)
            engine.read(tag: RequestTag(requests), offset: UInt64(offset),
                        into: UnsafeMutableRawBufferPointer(rebasing: buffer[offset..<offset + length]))
            requests += 1
            offset += length
            pull()
            while held.count > 20 || (offset == want.count && !held.isEmpty) {
                let action = held.remove(at: Int.random(in: 0..<held.count, using: &rng))
                switch action {
                case .readFile(let token, let o, let into):
                    for i in 0..<into.count { into[i] = Int(o) + i < file.count ? file[Int(o) + i] : 0 }
                    engine.completed(token, result: .success)
                case .readBacking(let token, let o, let into):
                    for i in 0..<into.count { into[i] = Int(o) + i < backing.count ? backing[Int(o) + i] : 0 }
                    engine.completed(token, result: .success)
                default:
                    Issue.record("unexpected action \(action)")
                    return
                }
                pull()
            }
        }
        #expect(done == requests)
        let got = Array(buffer)
        if got != want {
            let i = got.indices.first { got[$0] != want[$0] }!
            Issue.record("\(name): differs from qemu-img convert first at byte \(i)")
        }
    }
}
