// The in-place overwrite fast path (QCow2Engine+InPlace) through QCow2Driver on real images qemu made:
// taken for an overwrite of a cached, COPIED, normal cluster inside one cluster, and not taken for
// everything else (the first write of a table, a snapshot-shared cluster, a write spanning two clusters,
// compressed, zero and unallocated clusters, FUA, a read-only image). The data must come out the same
// whichever path wrote it (qemu-img compare), a fast-path write marks the bitmaps, and an I/O error on
// one fails only that request, as on the general path.

import BlockDevice
import Foundation
@testable import QCow2Driver
import Testing
import UVCore

private func qemuIO(_ image: String, _ commands: [String]) throws {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-io")
    process.arguments = ["-f", "qcow2"] + commands.flatMap { ["-c", $0] } + [image]
    process.standardOutput = FileHandle.nullDevice
    try process.run()
    process.waitUntilExit()
    #expect(process.terminationStatus == 0, "qemu-io \(commands)")
}

private func succeeded(_ outcome: BlockOutcome?) -> Bool {
    if case .done = outcome { return true }
    return false
}

/// A driver over `image` on its own loop, with a model of the guest disk to compare against.
private final class Harness {
    let loop: EventLoop
    let driver: QCow2Driver
    let log = Outcomes()
    var model: [UInt8]
    private var buffers: [UnsafeMutableRawBufferPointer] = []
    private var nextTag: UInt64 = 1

    init(_ image: String, readOnly: Bool = false, model: [UInt8]) throws {
        loop = try EventLoop()
        driver = try QCow2Driver(path: image, readOnly: readOnly, io: FileIO(loop: loop))
        self.model = model
    }

    deinit { buffers.forEach { $0.deallocate() } }

    /// Writes `count` bytes at `offset` and waits for the answer; returns it.
    @discardableResult
    func write(_ offset: Int, _ count: Int, fua: Bool = false) -> BlockOutcome? {
        let data = bytes(count, seed: nextTag &* 31 &+ UInt64(offset))
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
        buffer.copyBytes(from: data)
        buffers.append(buffer)
        let tag = nextTag
        nextTag += 1
        driver.write(offset: UInt64(offset), from: UnsafeRawBufferPointer(buffer), fua: fua, tag: tag, handler: log)
        drain(loop)
        if case .done = log.byTag[tag] { model.replaceSubrange(offset..<offset + count, with: data) }
        return log.byTag[tag]
    }

    func flush() -> BlockOutcome? {
        let tag = nextTag
        nextTag += 1
        driver.flush(tag: tag, handler: log)
        drain(loop)
        return log.byTag[tag]
    }

    func read(_ offset: Int, _ count: Int) -> [UInt8] {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: count, alignment: 4096)
        defer { buffer.deallocate() }
        let tag = nextTag
        nextTag += 1
        driver.read(offset: UInt64(offset), into: buffer, tag: tag, handler: log)
        drain(loop)
        return Array(buffer)
    }

    /// Closes the driver and has qemu check the image and compare it with the model.
    func closeAndCompare(_ image: String, _ scratch: Scratch, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let tag = nextTag
        nextTag += 1
        driver.close(tag: tag, handler: log)
        drain(loop)
        #expect(succeeded(log.byTag[tag]), sourceLocation: sourceLocation)
        let check = try qemuImg(["check", "-f", "qcow2", image])
        #expect(check.status == 0, "qemu-img check: \(check.output)", sourceLocation: sourceLocation)
        let twin = scratch.path("model.raw")
        _ = FileManager.default.createFile(atPath: twin, contents: Data(model))
        let compare = try qemuImg(["compare", "-f", "raw", "-F", "qcow2", twin, image])
        #expect(compare.status == 0, "qemu-img compare: \(compare.output)", sourceLocation: sourceLocation)
    }
}

private let cluster = 65536
private let size = 4 << 20

/// A 4 MiB image with 64 KiB clusters whose first MiB qemu wrote with 0x5a.
private func writtenImage(_ scratch: Scratch, options: [String] = []) throws -> (String, [UInt8]) {
    let image = scratch.path("disk.qcow2")
    #expect(try qemuImg(["create", "-q", "-f", "qcow2"] + options + [image, "\(size)"]).status == 0)
    try qemuIO(image, ["write -P 0x5a 0 1M"])
    var model = [UInt8](repeating: 0, count: size)
    model.replaceSubrange(0..<(1 << 20), with: repeatElement(0x5a, count: 1 << 20))
    return (image, model)
}

@Suite struct InPlaceFastPathTests {
    @Test func overwritesOfCachedOwnedClustersTakeTheFastPath() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let (image, model) = try writtenImage(scratch)
        let h = try Harness(image, model: model)
        // The first write finds the L2 table uncached: it loads the table on the general path.
        #expect(succeeded(h.write(4096, 4096)))
        #expect(h.driver.fastPathWrites == 0)
        #expect(succeeded(h.write(8192, 4096)))
        #expect(succeeded(h.write(cluster * 3 + 100, 4000)))
        #expect(succeeded(h.write(cluster * 15, cluster)))   // a whole cluster is still one cluster
        #expect(h.driver.fastPathWrites == 3)
        #expect(h.read(0, 1 << 20) == Array(h.model[0..<(1 << 20)]))
        #expect(succeeded(h.flush()))
        try h.closeAndCompare(image, scratch)
    }

    @Test func everyOtherWriteTakesTheGeneralPath() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let (image, model) = try writtenImage(scratch)
        // Cluster 8 becomes a plain zero entry, cluster 9 a zero entry keeping its allocation; clusters
        // past 1 MiB are unallocated.
        try qemuIO(image, ["write -z -u 512k 64k", "write -z 576k 64k"])
        let h = try Harness(image, model: model)
        h.model.replaceSubrange(8 * cluster..<10 * cluster, with: repeatElement(0, count: 2 * cluster))
        #expect(h.read(0, 4096).count == 4096)   // caches the L2 table
        var expected = 0
        #expect(succeeded(h.write(cluster - 2048, 4096)))                 // spans clusters 0 and 1
        #expect(succeeded(h.write(5 * cluster, 4096, fua: true)))          // FUA waits for a flush
        #expect(succeeded(h.write(8 * cluster, 4096)))                     // zero entry
        #expect(succeeded(h.write(9 * cluster + 512, 4096)))               // zero entry, allocated
        #expect(succeeded(h.write(2 << 20, 4096)))                         // unallocated
        #expect(h.driver.fastPathWrites == expected)
        // Each of those clusters is now a normal COPIED one: the same writes again are fast.
        #expect(succeeded(h.write(cluster - 2048, 2048)))
        #expect(succeeded(h.write(5 * cluster, 4096)))
        #expect(succeeded(h.write(8 * cluster, 4096)))
        #expect(succeeded(h.write(9 * cluster + 512, 4096)))
        #expect(succeeded(h.write(2 << 20, 4096)))
        expected += 5
        #expect(h.driver.fastPathWrites == expected)
        try h.closeAndCompare(image, scratch)
    }

    @Test func snapshotSharedClustersAreCopiedFirst() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let (image, model) = try writtenImage(scratch)
        #expect(try qemuImg(["snapshot", "-c", "before", image]).status == 0)
        let h = try Harness(image, model: model)
        #expect(h.read(0, 4096).count == 4096)
        // The table and the cluster are shared with the snapshot (COPIED clear): copied on write.
        #expect(succeeded(h.write(2 * cluster, 4096)))
        #expect(succeeded(h.write(3 * cluster, 4096)))
        #expect(h.driver.fastPathWrites == 0)
        #expect(succeeded(h.write(2 * cluster + 4096, 4096)))   // now a private copy
        #expect(h.driver.fastPathWrites == 1)
        try h.closeAndCompare(image, scratch)
        // The snapshot still holds what qemu wrote.
        let shot = scratch.path("snapshot.raw")
        #expect(try qemuImg(["convert", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=before", image, shot]).status == 0)
        #expect([UInt8](try Data(contentsOf: URL(fileURLWithPath: shot))) == model)
    }

    @Test func compressedClustersAreRewrittenOnTheGeneralPath() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let (plain, model) = try writtenImage(scratch)
        let image = scratch.path("compressed.qcow2")
        #expect(try qemuImg(["convert", "-c", "-f", "qcow2", "-O", "qcow2", plain, image]).status == 0)
        let h = try Harness(image, model: model)
        #expect(h.read(0, 4096).count == 4096)
        #expect(succeeded(h.write(4 * cluster, 4096)))
        #expect(h.driver.fastPathWrites == 0)
        #expect(succeeded(h.write(4 * cluster + 8192, 4096)))
        #expect(h.driver.fastPathWrites == 1)
        try h.closeAndCompare(image, scratch)
    }

    @Test func aReadOnlyImageRefusesWithoutTheFastPath() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let (image, model) = try writtenImage(scratch)
        let h = try Harness(image, readOnly: true, model: model)
        #expect(h.read(0, 4096).count == 4096)
        guard case .failed(let error) = h.write(4096, 4096) else {
            Issue.record("a write to a read-only image succeeded")
            return
        }
        #expect(error.errno == EROFS)
        #expect(h.driver.fastPathWrites == 0)
    }

    @Test func writesMarkTheDirtyBitmaps() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let (image, model) = try writtenImage(scratch)
        #expect(try qemuImg(["bitmap", "--add", "-f", "qcow2", image, "b0"]).status == 0)
        let h = try Harness(image, model: model)
        #expect(h.read(0, 4096).count == 4096)
        #expect(succeeded(h.write(7 * cluster + 10, 100)))
        #expect(h.driver.fastPathWrites == 1)
        let bitmap = try #require(h.driver.engine.bitmaps.first)
        let granule = UInt64(7 * cluster) >> UInt64(bitmap.granularityBits)
        #expect(bitmap.isDirty(granule: granule))
        #expect(!bitmap.isDirty(granule: granule + 1))
        try h.closeAndCompare(image, scratch)
    }

    /// As on the general path: the request fails with the errno, the image stays writable, and later
    /// writes and flushes go on.
    @Test func anIOErrorFailsOnlyThatWrite() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let (image, model) = try writtenImage(scratch)
        let h = try Harness(image, model: model)
        #expect(h.read(0, 4096).count == 4096)
        h.driver.faults = try FaultInjector(rules: "write,errno=EIO,nth=1")
        guard case .failed(let error) = h.write(3 * cluster, 4096) else {
            Issue.record("the failed write succeeded")
            return
        }
        #expect(error.errno == EIO)
        #expect(h.driver.fastPathWrites == 1)
        #expect(h.driver.engine.failure == nil)
        #expect(succeeded(h.write(3 * cluster, 4096)))
        #expect(h.driver.fastPathWrites == 2)
        #expect(succeeded(h.flush()))
        try h.closeAndCompare(image, scratch)
    }
}
