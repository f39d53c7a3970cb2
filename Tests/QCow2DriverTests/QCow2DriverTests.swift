// QCow2Driver over real image files on a real event loop, with qemu as the referee: images are made
// by qemu-img, written through the driver with many requests in flight, closed, and then must pass
// `qemu-img check` with no leaks and compare equal to an in-memory model. Also backing chains (reads,
// COW of partial clusters, allocation depth) and compressed clusters made by qemu-img.
//
// The engine's own tests (QCow2Tests) complete I/O in orders a test chooses; these prove the shell
// runs those actions on FileIO correctly.

import BlockDevice
import Foundation
import QCow2Driver
import Testing
import UVCore

/// Collects outcomes by tag.
final class Outcomes: BlockIOHandler {
    var byTag: [UInt64: BlockOutcome] = [:]
    func blockIOCompleted(tag: UInt64, outcome: BlockOutcome) {
        precondition(byTag[tag] == nil, "tag \(tag) completed twice")
        byTag[tag] = outcome
    }

    var failures: [String] {
        byTag.compactMap { tag, outcome in
            if case .failed(let e) = outcome { return "tag \(tag): \(e)" }
            return nil
        }
    }
}

/// A folder in /tmp for one test, removed at the end.
struct Scratch {
    let dir: String
    init() {
        dir = NSTemporaryDirectory() + "qcow2driver-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try! FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
    }
    func path(_ name: String) -> String { dir + "/" + name }
    func remove() { try? FileManager.default.removeItem(atPath: dir) }
}

/// Runs qemu-img; returns its exit status and output.
@discardableResult
func qemuImg(_ arguments: [String]) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-img")
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    try process.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: data, as: UTF8.self))
}

func drain(_ loop: EventLoop, sourceLocation: SourceLocation = #_sourceLocation) {
    let watchdog = LoopTimer(loop: loop)
    var fired = false
    watchdog.start(afterMilliseconds: 60_000) {
        fired = true
        loop.stop()
    }
    watchdog.unref()
    loop.run()
    if fired { Issue.record("a completion never arrived", sourceLocation: sourceLocation) }
    watchdog.close()
    loop.run()
}

/// A deterministic generator, so a failure can be replayed.
struct Generator {
    var state: UInt64
    mutating func next() -> UInt64 {
        state = state &* 6364136223846793005 &+ 1442695040888963407
        return state >> 33
    }
    mutating func below(_ n: UInt64) -> UInt64 { next() % n }
}

func bytes(_ count: Int, seed: UInt64) -> [UInt8] {
    var g = Generator(state: seed | 1)
    return (0..<count).map { _ in UInt8(truncatingIfNeeded: g.next()) }
}

@Suite struct QCow2DriverTests {
    /// Many writes, zeroes and trims in flight at once on a fresh image, closed, then checked by qemu.
    @Test(arguments: [65536, 512])
    func concurrentWritesLeaveAnImageQemuAccepts(clusterSize: Int) throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let image = scratch.path("disk.qcow2")
        let size = 16 << 20
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)", image, "\(size)"]).status == 0)

        let loop = try EventLoop()
        let driver = try QCow2Driver(path: image, readOnly: false, io: FileIO(loop: loop))
        let log = Outcomes()
        var model = [UInt8](repeating: 0, count: size)
        var buffers: [UnsafeMutableRawBufferPointer] = []
        defer { buffers.forEach { $0.deallocate() } }
        var g = Generator(state: UInt64(clusterSize))
        // Non-overlapping ranges, so the outcome is the same whatever order the engine completes them in.
        let slots = 128
        let slot = size / slots
        for i in 0..<slots {
            let base = i * slot
            let offset = base + Int(g.below(UInt64(slot / 2)))
            let length = 1 + Int(g.below(UInt64(slot / 2)))
            let tag = UInt64(i)
            switch g.below(5) {
            case 0:
                driver.writeZeroes(offset: UInt64(offset), length: UInt64(length), options: [], tag: tag, handler: log)
                model.replaceSubrange(offset..<offset + length, with: repeatElement(0, count: length))
            case 1:
                driver.trim(offset: UInt64(offset), length: UInt64(length), fua: false, tag: tag, handler: log)
                model.replaceSubrange(offset..<offset + length, with: repeatElement(0, count: length))
            default:
                let data = bytes(length, seed: tag &+ 77)
                let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 4096)
                buffer.copyBytes(from: data)
                buffers.append(buffer)
                driver.write(offset: UInt64(offset), from: UnsafeRawBufferPointer(buffer), fua: g.below(8) == 0,
                             tag: tag, handler: log)
                model.replaceSubrange(offset..<offset + length, with: data)
            }
        }
        drain(loop)
        #expect(log.failures.isEmpty, "\(log.failures)")
        #expect(log.byTag.count == slots)

        // Read everything back through the driver before closing.
        let whole = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
        defer { whole.deallocate() }
        driver.read(offset: 0, into: whole, tag: 1000, handler: log)
        driver.close(tag: 1001, handler: log)
        drain(loop)
        #expect(log.failures.isEmpty, "\(log.failures)")
        #expect(Array(whole) == model, "data read back through the driver")

        let check = try qemuImg(["check", "-f", "qcow2", image])
        #expect(check.status == 0, "qemu-img check: \(check.output)")
        let twin = scratch.path("model.raw")
        _ = FileManager.default.createFile(atPath: twin, contents: Data(model))
        let compare = try qemuImg(["compare", "-f", "raw", "-F", "qcow2", twin, image])
        #expect(compare.status == 0, "qemu-img compare: \(compare.output)")
    }

    /// A qcow2 overlay on a raw base: unwritten clusters read the base, a partial write keeps the rest of
    /// its cluster from the base (COW), and block status reports where each byte comes from.
    @Test func backingChainReadsCopiesAndReportsDepth() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let base = scratch.path("base.raw")
        let overlay = scratch.path("overlay.qcow2")
        let size = 4 << 20
        // The base's last megabyte is a hole: still the base's bytes (zeros) for allocation depth.
        var baseData = bytes(size - (1 << 20), seed: 5)
        _ = FileManager.default.createFile(atPath: base, contents: Data(baseData))
        #expect(truncate(base, off_t(size)) == 0)
        baseData += [UInt8](repeating: 0, count: 1 << 20)
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", overlay]).status == 0)

        let loop = try EventLoop()
        let driver = try QCow2Driver(path: overlay, readOnly: false, io: FileIO(loop: loop))
        #expect(driver.capabilities.knowsAllocationDepth)
        let log = Outcomes()
        let patch = bytes(1000, seed: 6)
        let patchOffset = 65536 + 3000
        patch.withUnsafeBytes { driver.write(offset: UInt64(patchOffset), from: $0, fua: false, tag: 1, handler: log) }
        drain(loop)
        let whole = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
        defer { whole.deallocate() }
        driver.read(offset: 0, into: whole, tag: 2, handler: log)
        drain(loop)
        var expected = baseData
        expected.replaceSubrange(patchOffset..<patchOffset + patch.count, with: patch)
        #expect(Array(whole) == expected)
        // Block status answers a prefix of the range each time, as NBD allows; ask until it is covered.
        var depths: [(Range<Int>, UInt32)] = []
        var position = 0
        var tag: UInt64 = 100
        while position < size {
            driver.blockStatus(offset: UInt64(position), length: UInt64(size - position), tag: tag, handler: log)
            drain(loop)
            guard case .extents(let extents) = log.byTag[tag], !extents.isEmpty else {
                Issue.record("block status at \(position): \(String(describing: log.byTag[tag]))")
                return
            }
            for e in extents {
                depths.append((position..<position + Int(e.length), e.depth))
                position += Int(e.length)
            }
            tag += 1
        }
        // The written cluster is this image's (depth 1); everything else comes from the base (depth 2).
        let own = depths.filter { $0.1 == 1 }.map(\.0)
        #expect(own == [65536..<131072], "\(depths)")
        #expect(depths.allSatisfy { $0.1 == 1 || $0.1 == 2 }, "a raw base's hole is the base's, not nowhere: \(depths)")
        driver.close(tag: 4, handler: log)
        drain(loop)
        #expect(log.failures.isEmpty, "\(log.failures)")
        #expect(try qemuImg(["check", "-q", "-f", "qcow2", overlay]).status == 0)
    }

    /// Clusters qemu-img compressed read back as the data they hold, and overwriting part of one keeps
    /// the rest (the compressed data is the COW source).
    @Test func compressedClustersReadAndOverwrite() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let raw = scratch.path("source.raw")
        let image = scratch.path("compressed.qcow2")
        let size = 2 << 20
        // Compressible but not trivial: a short pattern repeated with a twist every 4 KiB.
        let data = (0..<size).map { UInt8(truncatingIfNeeded: ($0 % 251) ^ ($0 >> 12)) }
        _ = FileManager.default.createFile(atPath: raw, contents: Data(data))
        #expect(try qemuImg(["convert", "-q", "-c", "-f", "raw", "-O", "qcow2", raw, image]).status == 0)

        let loop = try EventLoop()
        let driver = try QCow2Driver(path: image, readOnly: false, io: FileIO(loop: loop))
        let log = Outcomes()
        let whole = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
        defer { whole.deallocate() }
        driver.read(offset: 0, into: whole, tag: 1, handler: log)
        drain(loop)
        #expect(Array(whole) == data, "compressed clusters inflate to the original data")

        let patch = bytes(512, seed: 8)
        patch.withUnsafeBytes { driver.write(offset: 70_000, from: $0, fua: false, tag: 2, handler: log) }
        drain(loop)
        driver.read(offset: 0, into: whole, tag: 3, handler: log)
        driver.close(tag: 4, handler: log)
        drain(loop)
        var expected = data
        expected.replaceSubrange(70_000..<70_512, with: patch)
        #expect(Array(whole) == expected)
        #expect(log.failures.isEmpty, "\(log.failures)")
        let check = try qemuImg(["check", "-f", "qcow2", image])
        #expect(check.status == 0, "qemu-img check: \(check.output)")
    }

    @Test func aDirtyImageIsNotOpenedWritable() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let image = scratch.path("lazy.qcow2")
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", image, "1M"]).status == 0)
        // Set the dirty bit (incompatible feature bit 0, the last byte of the 8-byte field at 72).
        let handle = try #require(FileHandle(forUpdatingAtPath: image))
        try handle.seek(toOffset: 79)
        try handle.write(contentsOf: Data([1]))
        try handle.close()
        let loop = try EventLoop()
        do {
            _ = try QCow2Driver(path: image, readOnly: false, io: FileIO(loop: loop))
            Issue.record("a dirty image was opened writable")
        } catch {
            #expect(error.description.contains("dirty"), "\(error)")
        }
        _ = try QCow2Driver(path: image, readOnly: true, io: FileIO(loop: loop))
    }
}
