// Header.parse / validate / encodeNew: real images made by qemu-img, hand-built ones, and every
// corruption the driver must refuse with an error that names the structure at fault.

import Foundation
import Testing
@testable import QCow2

/// A valid v3 header with 64 KiB clusters for a 1 GiB disk: header@0, reftable@1, refblock@2, L1@3.
func goodHeader(clusterBits: UInt32 = 16, size: UInt64 = 1 << 30, version: UInt32 = 3) -> Header {
    let cs = UInt64(1) << UInt64(clusterBits)
    let coverage = cs * (cs / 8)
    return Header(
        version: version, backingFileOffset: 0, backingFileSize: 0, clusterBits: clusterBits, size: size,
        cryptMethod: 0, l1Size: UInt32((size + coverage - 1) / coverage), l1TableOffset: 3 * cs,
        refcountTableOffset: cs, refcountTableClusters: 1, snapshotCount: 0, snapshotsOffset: 0,
        incompatibleFeatures: 0, compatibleFeatures: 0, autoclearFeatures: 0, refcountOrder: 4,
        headerLength: version == 3 ? 112 : 72, compressionType: 0, extensions: [], backingFileName: nil)
}

/// A feature name table entry.
func featureEntry(type: UInt8, bit: UInt8, _ name: String) -> [UInt8] {
    var e = [type, bit] + Array(name.utf8)
    e += zeros(48 - e.count)
    return e
}

/// Expects `body` to throw a QCow2Error about `structure` whose text contains every fragment.
func expectQCow2Error(_ structure: String, _ fragments: [String] = [], corrupt: Bool? = nil,
                      sourceLocation: SourceLocation = #_sourceLocation,
                      _ body: () throws -> Void) {
    do {
        try body()
        Issue.record("expected a QCow2Error about \(structure), but nothing was thrown", sourceLocation: sourceLocation)
    } catch let error as QCow2Error {
        #expect(error.structure == structure, "\(error)", sourceLocation: sourceLocation)
        #expect(error.description.hasPrefix("qcow2 \(structure): "), sourceLocation: sourceLocation)
        for f in fragments {
            #expect(error.description.contains(f), "\"\(error)\" should mention \"\(f)\"", sourceLocation: sourceLocation)
        }
        if let corrupt { #expect(error.corrupt == corrupt, "\(error)", sourceLocation: sourceLocation) }
    } catch {
        Issue.record("expected a QCow2Error about \(structure), got \(error)", sourceLocation: sourceLocation)
    }
}

@Suite("Header: images made by qemu-img")
struct QemuHeaderTests {
    struct Kind: CustomTestStringConvertible, Sendable {
        let options: String
        let version: UInt32
        let clusterBits: UInt32
        let refcountOrder: UInt32
        let extendedL2: Bool
        let compressionType: UInt8
        var testDescription: String { options.isEmpty ? "defaults" : options }
    }

    static let kinds: [Kind] = [
        Kind(options: "", version: 3, clusterBits: 16, refcountOrder: 4, extendedL2: false, compressionType: 0),
        Kind(options: "compat=0.10", version: 2, clusterBits: 16, refcountOrder: 4, extendedL2: false, compressionType: 0),
        Kind(options: "compat=0.10,cluster_size=512", version: 2, clusterBits: 9, refcountOrder: 4, extendedL2: false, compressionType: 0),
        Kind(options: "cluster_size=512", version: 3, clusterBits: 9, refcountOrder: 4, extendedL2: false, compressionType: 0),
        Kind(options: "cluster_size=4k", version: 3, clusterBits: 12, refcountOrder: 4, extendedL2: false, compressionType: 0),
        Kind(options: "cluster_size=2M", version: 3, clusterBits: 21, refcountOrder: 4, extendedL2: false, compressionType: 0),
        Kind(options: "refcount_bits=1", version: 3, clusterBits: 16, refcountOrder: 0, extendedL2: false, compressionType: 0),
        Kind(options: "refcount_bits=64", version: 3, clusterBits: 16, refcountOrder: 6, extendedL2: false, compressionType: 0),
        Kind(options: "extended_l2=on", version: 3, clusterBits: 16, refcountOrder: 4, extendedL2: true, compressionType: 0),
        Kind(options: "extended_l2=on,cluster_size=16k", version: 3, clusterBits: 14, refcountOrder: 4, extendedL2: true, compressionType: 0),
        Kind(options: "compression_type=zstd", version: 3, clusterBits: 16, refcountOrder: 4, extendedL2: false, compressionType: 1),
        Kind(options: "lazy_refcounts=on", version: 3, clusterBits: 16, refcountOrder: 4, extendedL2: false, compressionType: 0),
    ]

    @Test(.enabled(if: Qemu.available), arguments: kinds)
    func parsesAndValidates(_ kind: Kind) throws {
        let dir = try Qemu.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        var args = ["create", "-q", "-f", "qcow2"]
        if !kind.options.isEmpty { args += ["-o", kind.options] }
        try Qemu.run("qemu-img", args + ["img.qcow2", "100M"], in: dir)
        let bytes = try Qemu.bytes(dir.appendingPathComponent("img.qcow2"))
        let h = try Header.parse(Array(bytes.prefix(Header.bytesNeeded(prefix: Array(bytes.prefix(104))))))
        #expect(Header.bytesNeeded(prefix: Array(bytes.prefix(104))) == 1 << Int(kind.clusterBits))
        #expect(h.version == kind.version)
        #expect(h.clusterBits == kind.clusterBits)
        #expect(h.size == 100 << 20)
        #expect(h.refcountOrder == kind.refcountOrder)
        #expect(h.extendedL2 == kind.extendedL2)
        #expect(h.compressionType == kind.compressionType)
        #expect(h.headerLength == (kind.version == 2 ? 72 : 112))
        #expect(h.backingFileName == nil)
        #expect(h.lazyRefcounts == kind.options.contains("lazy"))
        #expect(!h.isDirty && !h.isCorrupt)
        try h.validate(fileSize: UInt64(bytes.count), writable: false)
        try h.validate(fileSize: UInt64(bytes.count), writable: true)
        if kind.version == 3 && kind.clusterBits >= 16 {   // qemu leaves the name table out of small clusters
            #expect(h.featureName(type: 0, bit: 4) == "extended L2 entries")
            #expect(h.featureName(type: 1, bit: 0) == "lazy refcounts")
            #expect(h.featureName(type: 0, bit: 9) == nil)
        }
        let g = Geometry(header: h)
        let l1Coverage = UInt64(h.l1Size) * g.l2Coverage
        #expect(l1Coverage >= h.size)
    }

    @Test(.enabled(if: Qemu.available))
    func backingNameAndFormat() throws {
        let dir = try Qemu.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        try Qemu.run("qemu-img", ["create", "-q", "-f", "raw", "base.raw", "10M"], in: dir)
        try Qemu.run("qemu-img", ["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2", "20M"], in: dir)
        try Qemu.run("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "compat=0.10", "-b", "top.qcow2", "-F", "qcow2", "v2.qcow2"], in: dir)
        let top = try Header.parse(Array(try Qemu.bytes(dir.appendingPathComponent("top.qcow2")).prefix(65536)))
        #expect(top.backingFileName == "base.raw")
        #expect(top.backingFormat == "raw")
        #expect(top.backingFileOffset > UInt64(top.headerLength))
        let v2 = try Header.parse(Array(try Qemu.bytes(dir.appendingPathComponent("v2.qcow2")).prefix(65536)))
        #expect(v2.version == 2)
        #expect(v2.backingFileName == "top.qcow2")
        #expect(v2.backingFormat == "qcow2")
        #expect(v2.size == 20 << 20)
    }

    @Test(.enabled(if: Qemu.available))
    func internalSnapshot() throws {
        let dir = try Qemu.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        try Qemu.run("qemu-img", ["create", "-q", "-f", "qcow2", "s.qcow2", "16M"], in: dir)
        try Qemu.run("qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 1M", "s.qcow2"], in: dir)
        try Qemu.run("qemu-img", ["snapshot", "-c", "s1", "s.qcow2"], in: dir)
        let bytes = try Qemu.bytes(dir.appendingPathComponent("s.qcow2"))
        let h = try Header.parse(Array(bytes.prefix(65536)))
        #expect(h.snapshotCount == 1)
        #expect(h.snapshotsOffset % h.clusterSize == 0 && h.snapshotsOffset != 0)
        try h.validate(fileSize: UInt64(bytes.count), writable: false)
    }
}

@Suite("Header: encodeNew and parse")
struct HeaderRoundTripTests {
    @Test(arguments: [UInt32(2), 3])
    func roundTrip(version: UInt32) throws {
        var h = goodHeader(clusterBits: 12, size: 5 << 30, version: version)
        h.backingFileName = "../base images/b.qcow2"
        h.extensions = [HeaderExtension(type: HeaderExtensionType.backingFormat, data: Array("qcow2".utf8)),
                        HeaderExtension(type: 0x1234_5678, data: [1, 2, 3])]   // unknown: kept byte for byte
        if version == 3 { h.compatibleFeatures = FeatureBit.lazyRefcounts; h.autoclearFeatures = 1 << 7 }
        let bytes = h.encodeNew()
        #expect(bytes.count == 4096)
        let p = try Header.parse(bytes)
        #expect(p.backingFileName == h.backingFileName)
        #expect(p.backingFormat == "qcow2")
        #expect(p.extensions == h.extensions)
        var q = p
        q.backingFileOffset = 0
        q.backingFileSize = 0
        h.backingFileSize = 0
        #expect(q == h)
        try p.validate(fileSize: 1 << 20, writable: true)
    }

    @Test func zstdRoundTrip() throws {
        var h = goodHeader()
        h.incompatibleFeatures = FeatureBit.compressionType
        h.compressionType = 1
        let p = try Header.parse(h.encodeNew())
        #expect(p.compressionType == 1)
        try p.validate(fileSize: 1 << 20, writable: false)
    }

    @Test func shortPrefixNeedsNothing() {
        #expect(Header.bytesNeeded(prefix: Array("not a qcow2 image at all, plainly".utf8)) == 0)
        #expect(Header.bytesNeeded(prefix: Array(goodHeader(clusterBits: 9).encodeNew().prefix(104))) == 512)
    }
}

@Suite("Header: corruption and unsupported features")
struct HeaderCorruptionTests {
    let fileSize: UInt64 = 1 << 20

    @Test func badMagic() {
        var b = goodHeader().encodeNew()
        b[3] = 0xfc
        expectQCow2Error("header", ["magic"]) { _ = try Header.parse(b) }
    }

    @Test func truncatedFile() {
        expectQCow2Error("header", ["shorter"]) { _ = try Header.parse(Array(goodHeader().encodeNew().prefix(40))) }
    }

    @Test func version4() {
        var b = goodHeader().encodeNew()
        b.setBE32(4, at: 4)
        expectQCow2Error("header", ["version 4"], corrupt: false) { _ = try Header.parse(b) }
    }

    @Test(arguments: [UInt32(8), 22, 0, 63])
    func clusterBitsOutOfRange(_ bits: UInt32) {
        var b = goodHeader().encodeNew()
        b.setBE32(bits, at: 20)
        expectQCow2Error("header", ["cluster_bits \(bits)"]) { _ = try Header.parse(b) }
        #expect(Header.bytesNeeded(prefix: Array(b.prefix(104))) == 0)
    }

    @Test(arguments: [UInt32(100), 105, 1 << 20])
    func badHeaderLength(_ length: UInt32) {
        var b = goodHeader().encodeNew()
        b.setBE32(length, at: 100)
        expectQCow2Error("header", ["header_length"]) { _ = try Header.parse(b) }
    }

    @Test func l1PastEndOfFile() {
        var h = goodHeader()
        h.l1TableOffset = fileSize   // both entries past the end of a 1 MiB file
        expectQCow2Error("L1 table", ["past the end of the file"]) { try h.validate(fileSize: fileSize, writable: false) }
        h.l1TableOffset = fileSize - 65536   // fits exactly
        #expect(throws: Never.self) { try h.validate(fileSize: fileSize, writable: false) }
    }

    @Test func l1TooSmallForSize() {
        var h = goodHeader()   // 1 GiB needs 2 entries with 64 KiB clusters
        h.l1Size = 1
        expectQCow2Error("L1 table", ["1 entries", "needs 2"]) { try h.validate(fileSize: fileSize, writable: false) }
        h.l1Size = 2
        h.size += 1
        expectQCow2Error("L1 table", ["needs 3"]) { try h.validate(fileSize: fileSize, writable: false) }
    }

    @Test func l1Unaligned() {
        var h = goodHeader()
        h.l1TableOffset = 3 * 65536 + 512
        expectQCow2Error("L1 table", ["not cluster aligned"]) { try h.validate(fileSize: fileSize, writable: false) }
    }

    /// qemu refuses a table whose end does not fit a signed 64-bit offset; before, `qnbd check` trapped
    /// reading such an L1 or refcount table (fuzz corpus: regress-*-offset-overflow).
    @Test func tablesBeyondAnyFileAreRefusedAtOpen() {
        var h = goodHeader()
        h.l1TableOffset = 0xffff_ffff_ffff_fe00 & ~(h.clusterSize - 1)
        expectQCow2Error("L1 table", ["beyond any file"]) { try h.validateOpenable() }
        h = goodHeader()
        h.refcountTableOffset = 0xffff_ffff_ffff_0000
        expectQCow2Error("refcount table", ["beyond any file"]) { try h.validateOpenable() }
        h = goodHeader()
        h.snapshotCount = 1
        h.snapshotsOffset = 0xffff_ffff_ffff_0000
        expectQCow2Error("snapshot table", ["beyond any file"]) { try h.validateOpenable() }
    }

    @Test func l1OverlapsHeader() {
        var h = goodHeader()
        h.l1TableOffset = 0
        expectQCow2Error("L1 table") { try h.validate(fileSize: fileSize, writable: false) }
    }

    @Test func refcountTableOverlappingHeader() {
        var h = goodHeader()
        h.refcountTableOffset = 0
        expectQCow2Error("refcount table") { try h.validate(fileSize: fileSize, writable: false) }
    }

    @Test func refcountTableBadShape() {
        var h = goodHeader()
        h.refcountTableOffset = 65536 + 4096
        expectQCow2Error("refcount table", ["not a cluster-aligned"]) { try h.validate(fileSize: fileSize, writable: false) }
        h = goodHeader()
        h.refcountTableClusters = 0
        expectQCow2Error("refcount table") { try h.validate(fileSize: fileSize, writable: false) }
        h.refcountTableClusters = 129   // > 8 MiB
        expectQCow2Error("refcount table", ["8 MiB"]) { try h.validate(fileSize: 64 << 20, writable: false) }
        h = goodHeader()
        h.refcountTableOffset = 2 * fileSize
        expectQCow2Error("refcount table", ["past the end"]) { try h.validate(fileSize: fileSize, writable: false) }
    }

    @Test func l1OverlappingRefcountTable() {
        var h = goodHeader()
        h.refcountTableClusters = 4   // clusters 1...4 now cover the L1 at cluster 3
        expectQCow2Error("L1 table", ["overlaps the refcount table"]) { try h.validate(fileSize: fileSize, writable: false) }
        h = goodHeader()
        h.l1TableOffset = h.refcountTableOffset
        expectQCow2Error("L1 table", ["overlaps the refcount table"]) { try h.validate(fileSize: fileSize, writable: false) }
    }

    @Test func unknownIncompatibleBitNamedFromFeatureTable() throws {
        var h = goodHeader()
        h.incompatibleFeatures = 1 << 5
        h.extensions = [HeaderExtension(type: HeaderExtensionType.featureNameTable,
                                        data: featureEntry(type: 0, bit: 4, "extended L2 entries")
                                            + featureEntry(type: 1, bit: 5, "a compatible thing")
                                            + featureEntry(type: 0, bit: 5, "frobnicated clusters"))]
        let parsed = try Header.parse(h.encodeNew())
        #expect(parsed.featureName(type: 0, bit: 5) == "frobnicated clusters")
        expectQCow2Error("header", ["incompatible feature bit 5", "frobnicated clusters"], corrupt: false) {
            try parsed.validate(fileSize: fileSize, writable: false)
        }
        // Without a name table the bit is still named by number.
        h.extensions = []
        h.incompatibleFeatures = 1 << 40
        let bare = try Header.parse(h.encodeNew())
        expectQCow2Error("header", ["incompatible feature bit 40"]) { try bare.validate(fileSize: fileSize, writable: false) }
    }

    @Test(arguments: [UInt32(1), 2])
    func encrypted(_ method: UInt32) {
        var h = goodHeader()
        h.cryptMethod = method
        expectQCow2Error("header", ["encrypted", "crypt_method \(method)"], corrupt: false) {
            try h.validate(fileSize: fileSize, writable: false)
        }
    }

    @Test func externalDataFile() {
        var h = goodHeader()
        h.incompatibleFeatures = FeatureBit.externalDataFile
        expectQCow2Error("header", ["external data file"], corrupt: false) { try h.validate(fileSize: fileSize, writable: false) }
    }

    @Test func version2WithRefcountOrder5() throws {
        var h = goodHeader(version: 2)
        h.refcountOrder = 5
        expectQCow2Error("header", ["version 2", "refcount_order 5"]) { try h.validate(fileSize: fileSize, writable: false) }
        // A v2 header on disk has no refcount_order field: parse implies 16-bit refcounts.
        #expect(try Header.parse(h.encodeNew()).refcountOrder == 4)
    }

    @Test func refcountOrder7() {
        var h = goodHeader()
        h.refcountOrder = 7
        expectQCow2Error("header", ["refcount_order 7"]) { try h.validate(fileSize: fileSize, writable: false) }
    }

    @Test func zstdBitTypeMismatch() throws {
        var h = goodHeader()
        h.incompatibleFeatures = FeatureBit.compressionType   // bit set, type 0
        expectQCow2Error("header", ["compression_type 0"]) { try h.validate(fileSize: fileSize, writable: false) }
        h.incompatibleFeatures = 0
        h.compressionType = 1                                   // type set, bit clear
        expectQCow2Error("header", ["compression_type 1"]) { try h.validate(fileSize: fileSize, writable: false) }
        // The same through the bytes on disk.
        let parsed = try Header.parse(h.encodeNew())
        expectQCow2Error("header", ["compression type feature bit"]) { try parsed.validate(fileSize: fileSize, writable: false) }
        h.incompatibleFeatures = FeatureBit.compressionType
        h.compressionType = 2
        expectQCow2Error("header", ["compression type 2"], corrupt: false) { try h.validate(fileSize: fileSize, writable: false) }
    }

    @Test func extendedL2With4KClusters() {
        var h = goodHeader(clusterBits: 12, size: 1 << 30)
        h.incompatibleFeatures = FeatureBit.extendedL2
        h.l1Size = 1024
        expectQCow2Error("header", ["extended L2", "16 KiB"]) { try h.validate(fileSize: fileSize, writable: false) }
        var ok = goodHeader(clusterBits: 14, size: 1 << 30)
        ok.incompatibleFeatures = FeatureBit.extendedL2
        ok.l1Size = 1024
        #expect(throws: Never.self) { try ok.validate(fileSize: fileSize, writable: false) }
    }

    @Test func extendedL2NeedsTwiceTheL1() {
        var h = goodHeader()   // 2 entries map 1 GiB with 8-byte L2 entries, not with 16-byte ones
        h.incompatibleFeatures = FeatureBit.extendedL2
        expectQCow2Error("L1 table", ["needs 4"]) { try h.validate(fileSize: fileSize, writable: false) }
    }

    @Test func backingNameOutsideClusterZero() {
        var h = goodHeader(clusterBits: 9, size: 1 << 20)
        h.backingFileName = "base.raw"
        var b = h.encodeNew()
        b.setBE64(512 - 4, at: 8)   // 8 bytes starting 4 bytes before the end of cluster 0
        expectQCow2Error("header", ["backing file name", "not inside the first cluster"]) { _ = try Header.parse(b) }
        b.setBE64(1 << 40, at: 8)
        expectQCow2Error("header", ["backing file name"]) { _ = try Header.parse(b) }
        b.setBE64(200, at: 8)
        b.setBE32(1024, at: 16)   // longer than the spec's 1023
        expectQCow2Error("header", ["backing file name"]) { _ = try Header.parse(b) }
    }

    @Test func extensionRunningPastClusterZero() {
        var b = goodHeader(clusterBits: 9, size: 1 << 20).encodeNew()
        b.setBE32(0x1234_5678, at: 112)
        b.setBE32(4096, at: 116)
        expectQCow2Error("header extension 0x12345678", ["past the first cluster"]) { _ = try Header.parse(b) }
    }

    @Test func duplicateExtension() {
        var h = goodHeader()
        h.extensions = [HeaderExtension(type: 0x1234_5678, data: [1]), HeaderExtension(type: 0x1234_5678, data: [2])]
        expectQCow2Error("header extension 0x12345678", ["twice"]) { _ = try Header.parse(h.encodeNew()) }
    }

    @Test func corruptBitIsReadOnly() {
        var h = goodHeader()
        h.incompatibleFeatures = FeatureBit.corrupt
        #expect(throws: Never.self) { try h.validate(fileSize: fileSize, writable: false) }
        expectQCow2Error("header", ["marked corrupt"]) { try h.validate(fileSize: fileSize, writable: true) }
    }

    @Test func badSnapshotTable() {
        var h = goodHeader()
        h.snapshotCount = 1
        h.snapshotsOffset = 0
        expectQCow2Error("snapshot table") { try h.validate(fileSize: fileSize, writable: false) }
        h.snapshotsOffset = 2 * fileSize
        expectQCow2Error("snapshot table") { try h.validate(fileSize: fileSize, writable: false) }
    }
}
