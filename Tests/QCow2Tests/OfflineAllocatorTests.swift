// The offline allocator (`qnbd bitmap`'s clusters): first fit over the refcounts, new refcount blocks
// where the file grows past the existing ones, and every change visible to the check after `commit`.

import Foundation
import Testing
@testable import QCow2

@Suite("Offline allocator")
struct OfflineAllocatorTests {
    func qemuImage(clusterSize: Int) throws -> [UInt8] {
        let dir = try Qemu.tempDir()
        defer { try? FileManager.default.removeItem(at: dir) }
        try Qemu.run("qemu-img", ["create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)", "a.qcow2", "8M"], in: dir)
        try Qemu.run("qemu-io", ["-c", "write 0 64k", "a.qcow2"], in: dir)
        return try Qemu.bytes(dir.appendingPathComponent("a.qcow2"))
    }

    @Test("allocations past the refcount blocks' coverage create blocks; the check sees leaks, then none after free",
          .enabled(if: Qemu.available), arguments: [512, 65536])
    func allocateAndFree(clusterSize: Int) throws {
        let file = MemoryFile(try qemuImage(clusterSize: clusterSize))
        let image = try ImageMetadata(file: file)
        let allocator = try OfflineAllocator(image: image)
        // 512-byte clusters with 16-bit refcounts: one block covers 256 clusters, so 600 single
        // clusters and a run of 300 need new blocks.
        var taken: [(UInt64, UInt64)] = []
        for _ in 0..<600 { taken.append((try allocator.allocate(clusters: 1), 1)) }
        taken.append((try allocator.allocate(clusters: 300), 300))
        var seen = Set<UInt64>()
        for (offset, count) in taken {
            #expect(offset % UInt64(clusterSize) == 0)
            for c in 0..<count { #expect(seen.insert(offset / UInt64(clusterSize) + c).inserted, "cluster handed out twice") }
            // The clusters are written so the file covers them, as the callers do.
            file.write([UInt8](repeating: 0xaa, count: Int(count) * clusterSize), at: offset)
        }
        try allocator.commit()
        let leaked = QCow2Check.run(file: file, name: "a", repair: nil).first
        #expect(leaked.corruptions == 0)
        #expect(leaked.leaks == 900)
        for (offset, count) in taken { try allocator.free(offset, clusters: count) }
        try allocator.commit()
        let clean = QCow2Check.run(file: file, name: "a", repair: nil).first
        #expect(clean.corruptions == 0 && clean.leaks == 0, "\(clean)")
        // Freed clusters are found again first.
        let again = try OfflineAllocator(image: try ImageMetadata(file: file)).allocate(clusters: 1)
        #expect(again == taken.map(\.0).min())
    }
}
