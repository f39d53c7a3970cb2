// Reading where snapshots keep their metadata (the snapshot table, each snapshot's L1 table), which a
// writable open protects from the allocator and from data writes.

import Testing
@testable import QCow2

@Suite("Snapshot metadata extents")
struct SnapshotMetadataTests {
    /// One table entry: the 40-byte fixed part, extra data, id, name, then padding to 8 bytes.
    func entry(l1Offset: UInt64, l1Entries: UInt32, id: String, name: String, extra: Int = 16) -> [UInt8] {
        var e = [UInt8](repeating: 0, count: 40)
        for k in 0..<8 { e[k] = UInt8(truncatingIfNeeded: l1Offset >> (56 - 8 * UInt64(k))) }
        for k in 0..<4 { e[8 + k] = UInt8(truncatingIfNeeded: l1Entries >> (24 - 8 * UInt32(k))) }
        e[13] = UInt8(id.utf8.count)
        e[15] = UInt8(name.utf8.count)
        e[39] = UInt8(extra)
        e += [UInt8](repeating: 0, count: extra) + Array(id.utf8) + Array(name.utf8)
        while e.count % 8 != 0 { e.append(0) }
        return e
    }

    func header(count: UInt32, at offset: UInt64) -> Header {
        var h = goodHeader()
        h.snapshotCount = count
        h.snapshotsOffset = offset
        return h
    }

    @Test func extentsCoverEachL1TableAndTheWholeTable() throws {
        let table = entry(l1Offset: 0x50000, l1Entries: 2, id: "1", name: "first")
            + entry(l1Offset: 0x70000, l1Entries: 9000, id: "22", name: "second, longer")
        var file = [UInt8](repeating: 0, count: 0x90000)
        file.replaceSubrange(0x30000..<(0x30000 + table.count), with: table)
        let meta = try SnapshotMetadata(header: header(count: 2, at: 0x30000), fileSize: UInt64(file.count)) {
            (offset, count) throws(QCow2Error) in Array(file[Int(offset)..<Int(offset) + count])
        }
        #expect(meta.extents.map(\.offset) == [0x50000, 0x70000, 0x30000])
        #expect(meta.extents.map(\.byteCount) == [16, 72000, UInt64(table.count)])
        #expect(meta.extents[1].owner == "the L1 table of snapshot 1")
    }

    @Test func anL1TablePastTheEndOfTheFileIsRefused() {
        let table = entry(l1Offset: 0x80000, l1Entries: 8192, id: "1", name: "s")
        var file = [UInt8](repeating: 0, count: 0x81000)
        file.replaceSubrange(0x30000..<(0x30000 + table.count), with: table)
        #expect(throws: QCow2Error.self) {
            try SnapshotMetadata(header: header(count: 1, at: 0x30000), fileSize: UInt64(file.count)) {
                (offset, count) throws(QCow2Error) in Array(file[Int(offset)..<Int(offset) + count])
            }
        }
    }

    @Test func extraDataBeyondQemusLimitIsRefused() {
        let table = entry(l1Offset: 0x50000, l1Entries: 1, id: "1", name: "s", extra: 200)
        var bad = table
        bad[38] = 0x10          // extra data length 0x10C8: over 1024
        var file = [UInt8](repeating: 0, count: 0x60000)
        file.replaceSubrange(0x30000..<(0x30000 + bad.count), with: bad)
        #expect(throws: QCow2Error.self) {
            try SnapshotMetadata(header: header(count: 1, at: 0x30000), fileSize: UInt64(file.count)) {
                (offset, count) throws(QCow2Error) in Array(file[Int(offset)..<Int(offset) + count])
            }
        }
    }
}
