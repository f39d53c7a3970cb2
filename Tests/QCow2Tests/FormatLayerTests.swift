// The format layer's shared pieces, on bytes in memory: probing, the metadata loader, and the check
// that `qnbd check` and the repair at open both run (QCow2Check), which must classify entries the way
// serving does.

import Testing
@testable import QCow2

/// An image file in memory, as the offline format code reads and writes it.
final class MemoryFile: MetadataFile {
    var bytes: [UInt8]
    private(set) var syncs = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    func length() -> UInt64 { UInt64(bytes.count) }

    func read(at offset: UInt64, count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        guard offset < UInt64(bytes.count) else { return out }
        let n = min(count, bytes.count - Int(offset))
        out.replaceSubrange(0..<n, with: bytes[Int(offset)..<(Int(offset) + n)])
        return out
    }

    func write(_ data: [UInt8], at offset: UInt64) {
        let end = Int(offset) + data.count
        if end > bytes.count { bytes += [UInt8](repeating: 0, count: end - bytes.count) }
        bytes.replaceSubrange(Int(offset)..<end, with: data)
    }

    func sync() { syncs += 1 }
}

@Suite("Format layer: probe, loader, check")
struct FormatLayerTests {
    func prefix(_ text: String, at offset: Int = 0) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 512)
        b.replaceSubrange(offset..<(offset + text.utf8.count), with: Array(text.utf8))
        return b
    }

    @Test func probeNamesEachSignature() {
        var qcow2 = [UInt8](repeating: 0, count: 512)
        qcow2.setBE32(Header.magic, at: 0)
        qcow2.setBE32(3, at: 4)
        #expect(ImageProbe.probe(qcow2) == .qcow2)
        qcow2.setBE32(1, at: 4)
        #expect(ImageProbe.probe(qcow2) == .foreign("qcow"))
        #expect(ImageProbe.probe(prefix("conectix")) == .foreign("vpc"))
        #expect(ImageProbe.probe(prefix("vhdxfile")) == .foreign("vhdx"))
        #expect(ImageProbe.probe(prefix("KDMV")) == .foreign("vmdk"))
        #expect(ImageProbe.probe(prefix("# Disk DescriptorFile\n")) == .foreign("vmdk"))
        #expect(ImageProbe.probe(prefix("WithoutFreeSpace")) == .foreign("parallels"))
        #expect(ImageProbe.probe(prefix("WithouFreSpacExt")) == .foreign("parallels"))
        #expect(ImageProbe.probe(prefix("QED\0")) == .foreign("qed"))
        var vdi = prefix("<<< Oracle VM VirtualBox Disk Image >>>\n")
        vdi.replaceSubrange(64..<68, with: [0x7f, 0x10, 0xda, 0xbe])
        #expect(ImageProbe.probe(vdi) == .foreign("vdi"))
        #expect(ImageProbe.probe([UInt8](repeating: 0, count: 512)) == .raw)
        #expect(ImageProbe.probe(Array("conec".utf8)) == .raw)      // a file shorter than any signature
        #expect(ImageProbe.probe([]) == .raw)
        let message = ImageProbe.refusal(path: "d.vhd", format: "vpc")
        #expect(message.contains("vpc") && message.contains("-f raw") && message.contains("qemu-img convert"))
    }

    @Test func loaderReadsWhatTheImageHolds() throws {
        var img = TestImage(clusterBits: 12, size: 1 << 20)
        img.mapData(3, patternBytes(1, 4096))
        let file = MemoryFile(img.file)
        let loader = MetadataLoader(file: file)
        #expect(try loader.probe() == .qcow2)
        let header = try loader.header(fileSize: file.length())
        #expect(header == img.header)
        #expect(try loader.l1Table(header) == img.l1)
        let table = try loader.refcountTable(header)
        #expect(table.count == 4096 / 8 && table[0] == 2 * 4096)
        let blocks = try loader.refcountBlocks(table: table, geometry: img.geometry, fileSize: file.length(),
                                               maximumBytes: 1 << 20)
        #expect(Array(blocks.keys) == [0])
        #expect(throws: QCow2Error.self) {
            try loader.refcountBlocks(table: table, geometry: img.geometry, fileSize: file.length(), maximumBytes: 0)
        }
    }

    /// The check classifies through L2Entry.clusterType, as serving does: COPIED on an entry without a
    /// host offset is an unallocated cluster to both, and qemu-img check calls it clean.
    @Test func checkAgreesWithServingOnCopiedWithoutHost() throws {
        var img = TestImage(clusterBits: 12, size: 1 << 20)
        let host = img.mapData(3, patternBytes(1, 4096))
        img.setL2(3, host | L2Entry.copied)
        img.setL2(5, L2Entry.copied)
        img.countReferences()
        let clean = QCow2Check.run(file: MemoryFile(img.file), name: "mem", repair: nil)
        #expect(clean.failure == nil)
        #expect(clean.final.corruptions == 0 && clean.final.leaks == 0, "\(clean.final.messages)")
        #expect(try L2Entry.decode(L2Entry.copied, geometry: img.geometry, index: 5) == .unallocated)

        // A leak, then its repair through the same entry point the opener uses.
        var leaky = img
        leaky.setL2(3, 0)
        let file = MemoryFile(leaky.file)
        let found = QCow2Check.run(file: file, name: "mem", repair: nil)
        #expect(found.final.leaks == 1 && found.final.corruptions == 0)
        let repaired = QCow2Check.run(file: file, name: "mem", repair: .leaks)
        #expect(repaired.failure == nil && repaired.recheck != nil)
        #expect(repaired.final.leaksFixed == 1 && repaired.final.leaks == 0)
        #expect(file.syncs > 0)
    }

    @Test func hexSpellsQemusStyles() {
        #expect(hex(0x1f000) == "0x1f000" && hex(0) == "0x0")
        #expect(hex(0x1f000, .bare) == "1f000")
        #expect(hex(0x1f000, .alternate) == "0x1f000" && hex(0, .alternate) == "0")
    }
}
