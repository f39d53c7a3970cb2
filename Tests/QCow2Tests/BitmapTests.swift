// The bitmaps extension in the format layer: the directory and tables of images qemu made, read back
// bit for bit (BitmapReader), and hostile directories refused with the structure named.

import Foundation
import Testing
@testable import QCow2

@Suite("Bitmaps: directory, validation, reader")
struct BitmapTests {
    /// An image qemu made: `qemu-img create`, `qemu-img bitmap --add`, then writes through qemu-io.
    func qemuImage(size: String, clusterSize: Int, granularity: Int?, extraBitmaps: [String] = [],
                   writes: [(Int, Int)]) throws -> [UInt8] {
        let dir = try Qemu.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        try Qemu.run("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)", "a.qcow2", size], in: dir)
        try Qemu.run("qemu-img", ["bitmap", "--add"] + (granularity.map { ["-g", "\($0)"] } ?? []) + ["a.qcow2", "b"], in: dir)
        for name in extraBitmaps { try Qemu.run("qemu-img", ["bitmap", "--add", "a.qcow2", name], in: dir) }
        if !writes.isEmpty {
            try Qemu.run("qemu-io", writes.flatMap { ["-c", "write \($0.0) \($0.1)"] } + ["a.qcow2"], in: dir)
        }
        return try Qemu.bytes(dir.appendingPathComponent("a.qcow2"))
    }

    func open(_ bytes: [UInt8]) throws -> ImageMetadata { try ImageMetadata(file: MemoryFile(bytes)) }

    /// The dirty granules `writes` cover, as runs over the whole disk.
    func expectedRuns(size: UInt64, granularity: UInt64, writes: [(Int, Int)]) -> [BitmapRun] {
        let granules = Int((size + granularity - 1) / granularity)
        var dirty = [Bool](repeating: false, count: granules)
        for (offset, length) in writes {
            for g in (UInt64(offset) / granularity)...((UInt64(offset + length) - 1) / granularity) { dirty[Int(g)] = true }
        }
        var runs: [BitmapRun] = []
        for (g, d) in dirty.enumerated() {
            let start = UInt64(g) * granularity
            let length = min(granularity, size - start)
            if let last = runs.last, last.dirty == d { runs[runs.count - 1].length += length } else {
                runs.append(BitmapRun(offset: start, length: length, dirty: d))
            }
        }
        return runs
    }

    @Test("bitmaps qemu dirtied read back as the writes", .enabled(if: Qemu.available),
          arguments: [(65536, 65536), (65536, 4096), (512, 512), (512, 4096), (65536, 1 << 20)])
    func qemuDirtied(clusterSize: Int, granularity: Int) throws {
        let writes = [(0, 65536), (1 << 20, 200 * 1024), (3000, 1), (5 << 20, 512)]
        let bytes = try qemuImage(size: "8M", clusterSize: clusterSize, granularity: granularity, writes: writes)
        let image = try open(bytes)
        let bitmaps = try image.bitmaps()
        #expect(bitmaps.map(\.name) == ["b"])
        #expect(bitmaps[0].granularity == UInt64(granularity))
        #expect(bitmaps[0].isEnabled && !bitmaps[0].isInUse)
        let reader = try image.bitmapReader(bitmaps[0])
        let expected = expectedRuns(size: 8 << 20, granularity: UInt64(granularity), writes: writes)
        #expect(try reader.runs(offset: 0, length: 8 << 20) == expected)
        // A range that starts and ends inside granules: runs are clipped to it.
        let clipped = try reader.runs(offset: 100, length: 1 << 20)
        #expect(clipped.first?.offset == 100)
        #expect(clipped.reduce(0) { $0 + $1.length } == 1 << 20)
    }

    @Test("a bitmap never dirtied is one clean run; table entries all zeros", .enabled(if: Qemu.available))
    func clean() throws {
        let image = try open(try qemuImage(size: "3M", clusterSize: 512, granularity: 512, writes: []))
        let b = try image.bitmaps()[0]
        #expect(b.tableSize == 2)   // 6144 bits: 768 bytes, two 512-byte clusters
        let reader = try image.bitmapReader(b)
        #expect(try reader.runs(offset: 0, length: 3 << 20) == [BitmapRun(offset: 0, length: 3 << 20, dirty: false)])
    }

    /// The directory entry of bitmap `index` in `bytes` (offset of its fixed part).
    func entryOffset(_ bytes: [UInt8], index: Int = 0) throws -> Int {
        let header = try Header.parse(Array(bytes.prefix(65536)))
        let dir = try #require(try BitmapDirectory(header: header))
        var position = Int(dir.offset)
        for _ in 0..<index {
            let length = 24 + Int(bytes.be32(position + 20)) + Int(bytes.be16(position + 18))
            position += (length + 7) & ~7
        }
        return position
    }

    func refusal(_ bytes: [UInt8]) -> QCow2Error? {
        do {
            let image = try open(bytes)
            for b in try image.bitmaps() { _ = try image.bitmapReader(b) }
            return nil
        } catch let error as QCow2Error {
            return error
        } catch {
            return nil
        }
    }

    @Test("hostile directories are refused, naming the structure", .enabled(if: Qemu.available))
    func hostile() throws {
        let good = try qemuImage(size: "8M", clusterSize: 65536, granularity: 65536, extraBitmaps: ["c"], writes: [(0, 4096)])
        #expect(refusal(good) == nil)
        let e = try entryOffset(good)
        let header = try Header.parse(Array(good.prefix(65536)))

        var beyond = good
        beyond.setBE64((UInt64(good.count) + 65536 * 16) & ~0xffff, at: e)
        #expect(refusal(beyond)?.description.contains("runs past the end of the file") == true, "\(String(describing: refusal(beyond)))")

        var intoL1 = good
        intoL1.setBE64(header.l1TableOffset, at: e)
        #expect(refusal(intoL1)?.description.contains("overlaps the L1 table") == true)

        var granularity = good
        granularity[e + 17] = 40
        #expect(refusal(granularity)?.description.contains("granularity_bits 40") == true)

        var duplicate = good
        let second = try entryOffset(good, index: 1)
        duplicate[second + 24] = UInt8(ascii: "b")
        #expect(refusal(duplicate)?.description.contains("two bitmaps are named 'b'") == true)

        var flag = good
        flag.setBE32(BitmapEntry.auto | 1 << 5, at: e + 12)
        let flagError = refusal(flag)
        #expect(flagError?.description.contains("unknown flags") == true)
        #expect(flagError?.corrupt == false)

        var type = good
        type[e + 16] = 2
        #expect(refusal(type)?.description.contains("unknown bitmap type 2") == true)

        var size = good
        size.setBE32(2, at: e + 8)
        #expect(refusal(size)?.description.contains("table has 2 entries") == true)

        // A table entry pointing at the refcount table, or with reserved bits.
        let tableOffset = Int(good.be64(e))
        var intoReftable = good
        intoReftable.setBE64(header.refcountTableOffset, at: tableOffset)
        #expect(refusal(intoReftable)?.description.contains("points into the refcount table") == true)
        var reserved = good
        reserved.setBE64(good.be64(tableOffset) | 0x2, at: tableOffset)
        #expect(refusal(reserved)?.description.contains("table entry 0") == true)

        var inUse = good
        inUse.setBE32(BitmapEntry.auto | BitmapEntry.inUse, at: e + 12)
        #expect(refusal(inUse)?.description.contains("inconsistent") == true)
        #expect(try open(inUse).bitmaps()[0].isInUse)
    }

    /// Found by scripts/fuzz qcow2-bitmaps: a data cluster of a bitmap with refcount 0 was handed out for
    /// the new bitmap data and overwritten before the header switched; the free after the switch then
    /// failed, leaving the image half stored.
    @Test("a store refuses, writing nothing, when a bitmap's cluster has refcount 0", .enabled(if: Qemu.available),
          arguments: [512, 65536])
    func storeRefusesUnreferencedBitmapClusters(clusterSize: Int) throws {
        let bytes = try qemuImage(size: "8M", clusterSize: clusterSize, granularity: 512, extraBitmaps: ["c"],
                                  writes: [(0, 4096), (3 << 20, 65536)])
        let probe = try open(bytes)
        let entries = try probe.bitmaps()
        let table = try BitmapValidation.table(of: entries[0], clusterSize: probe.clusterSize, fileSize: probe.fileLength,
                                               regions: MetadataRegions(header: probe.header), read: probe.loader.read)
        let cs = UInt64(clusterSize)
        let dataCluster = try #require(table.compactMap { kind -> UInt64? in
            if case .data(let offset) = kind { return offset / cs } else { return nil }
        }.first)
        // 16-bit refcounts; the first refcount block covers every cluster of this small image.
        let block = try probe.reftable()[0] & RefcountTableEntry.offsetMask
        var damaged = bytes
        damaged.setBE16(0, at: Int(block) + Int(dataCluster) * 2)
        let file = MemoryFile(damaged)
        let image = try ImageMetadata(file: file)
        var stored: [StoredBitmap] = []
        for entry in try image.bitmaps() {
            let bitCount = BitmapEntry.bitCount(virtualSize: image.header.size, granularityBits: entry.granularityBits)
            stored.append(StoredBitmap(entry: entry, bits: [UInt8](repeating: 0xff, count: Int((bitCount + 7) / 8)),
                                       onDisk: try BitmapStore.ownedClusters(entry, image: image)))
        }
        #expect(throws: QCow2Error.self) { try BitmapStore.store(stored, removed: [], image: image) }
        let changed = zip(file.bytes, damaged).filter { $0 != $1 }.count + abs(file.bytes.count - damaged.count)
        #expect(changed == 0, "a refused store must not write")
    }

    @Test("an all-ones table entry reads as dirty; entries encode as they parse")
    func allOnesAndEncoding() throws {
        var header = Header(version: 3, clusterBits: 9, size: 1 << 20)
        header.l1Size = 1
        header.l1TableOffset = 512
        header.refcountTableOffset = 1024
        header.refcountTableClusters = 1
        var bytes = [UInt8](repeating: 0, count: 8 * 512)
        // 1 MiB at 512-byte granularity: 2048 bits, 256 bytes: one table entry.
        bytes.setBE64(BitmapTableEntry.allOnes, at: 2048)
        let entry = BitmapEntry(name: "all", tableOffset: 2048, tableSize: 1, flags: 0, granularityBits: 9)
        let reader = try BitmapReader(entry: entry, header: header, fileSize: UInt64(bytes.count)) { (o, c) throws(QCow2Error) in
            Array(bytes[Int(o)..<(Int(o) + c)])
        }
        #expect(try reader.runs(offset: 512, length: 4096) == [BitmapRun(offset: 512, length: 4096, dirty: true)])
        let encoded = entry.encoded()
        #expect(encoded.count == 32)
        #expect(encoded.be32(8) == 1 && encoded[16] == 1 && encoded[17] == 9 && encoded.be16(18) == 3)
    }
}
