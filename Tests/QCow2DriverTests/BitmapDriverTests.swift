// Persistent dirty bitmaps through QCow2Driver, with qemu as the referee: bitmaps qemu made and dirtied
// (qemu-io writes mark enabled bitmaps) are listed and answered from memory; a writable open sets
// in_use before serving; writes, zeroes and trims mark enabled bitmaps; a clean close stores them so
// that qemu-img check is clean and qemu-img info lists them unchanged in flags; an unclosed image leaves
// them in use (inconsistent).

import BlockDevice
import Foundation
import QCow2Driver
import Testing
import UVCore

private func run(_ tool: String, _ arguments: [String]) throws -> (status: Int32, output: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: tool)
    process.arguments = arguments
    let pipe = Pipe()
    process.standardOutput = pipe
    process.standardError = pipe
    try process.run()
    let data = pipe.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: data, as: UTF8.self))
}

/// The bitmaps qemu-img info lists: name -> (granularity, flags).
private func qemuBitmaps(_ image: String) throws -> [String: (Int, [String])] {
    let info = try run("/usr/bin/qemu-img", ["info", "--output=json", "-U", image])
    let json = try JSONSerialization.jsonObject(with: Data(info.output.utf8)) as? [String: Any]
    let data = (json?["format-specific"] as? [String: Any])?["data"] as? [String: Any]
    var out: [String: (Int, [String])] = [:]
    for bitmap in data?["bitmaps"] as? [[String: Any]] ?? [] {
        out[bitmap["name"] as! String] = (bitmap["granularity"] as! Int, bitmap["flags"] as! [String])
    }
    return out
}

/// Every dirty range of bitmap `name`, asking until the disk is covered.
private func dirtyRanges(_ driver: QCow2Driver, _ name: String, _ loop: EventLoop) -> [Range<UInt64>]? {
    let log = Outcomes()
    var position: UInt64 = 0
    var tag: UInt64 = 0
    var dirty: [Range<UInt64>] = []
    while position < driver.size {
        driver.dirtyBitmapStatus(name: name, offset: position, length: driver.size - position, tag: tag, handler: log)
        drain(loop)
        guard case .extents(let extents) = log.byTag[tag], !extents.isEmpty else { return nil }
        for e in extents {
            if e.flags.rawValue == 1 {
                if let last = dirty.last, last.upperBound == position {
                    dirty[dirty.count - 1] = last.lowerBound..<(position + e.length)
                } else {
                    dirty.append(position..<(position + e.length))
                }
            }
            #expect(e.depth == 0)
            position += e.length
        }
        tag += 1
    }
    return dirty
}

@Suite struct BitmapDriverTests {
    /// An 8 MiB image with enabled bitmap "a" (64 KiB granules) and disabled "d" (512 B), both dirty
    /// at 1 MiB + 4 KiB from a qemu-io write.
    private func makeImage(_ scratch: Scratch, clusterSize: Int = 65536) throws -> String {
        let image = scratch.path("disk.qcow2")
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-o", "cluster_size=\(clusterSize)", image, "8M"]).status == 0)
        #expect(try qemuImg(["bitmap", "--add", "-g", "65536", image, "a"]).status == 0)
        #expect(try qemuImg(["bitmap", "--add", "-g", "512", image, "d"]).status == 0)
        #expect(try run("/usr/bin/qemu-io", ["-f", "qcow2", "-c", "write 1052672 4096", image]).status == 0)
        #expect(try qemuImg(["bitmap", "--disable", image, "d"]).status == 0)
        return image
    }

    @Test func qemuMadeBitmapsAreListedAndAnswered() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let image = try makeImage(scratch)
        let loop = try EventLoop()
        let driver = try QCow2Driver(path: image, readOnly: true, io: FileIO(loop: loop))
        #expect(driver.dirtyBitmaps == [
            DirtyBitmapInfo(name: "a", granularity: 65536, enabled: true, inconsistent: false),
            DirtyBitmapInfo(name: "d", granularity: 512, enabled: false, inconsistent: false),
        ])
        #expect(dirtyRanges(driver, "a", loop) == [1048576..<1114112])
        #expect(dirtyRanges(driver, "d", loop) == [1052672..<1056768])
        let log = Outcomes()
        driver.dirtyBitmapStatus(name: "nope", offset: 0, length: 512, tag: 1, handler: log)
        guard case .failed(let error) = log.byTag[1] else { Issue.record("unknown bitmap answered"); return }
        #expect(error.errno == BlockError.invalid.errno)
    }

    @Test(arguments: [65536, 512])
    func writesAreMarkedAndStoredAtClose(clusterSize: Int) throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let image = try makeImage(scratch, clusterSize: clusterSize)
        let loop = try EventLoop()
        var driver: QCow2Driver? = try QCow2Driver(path: image, readOnly: false, io: FileIO(loop: loop))
        // Serving started: the enabled bitmap is in use on disk, the disabled one untouched.
        let during = try qemuBitmaps(image)
        #expect(during["a"]?.1 == ["in-use", "auto"])
        #expect(during["d"]?.1 == [])
        let log = Outcomes()
        let data = [UInt8](repeating: 7, count: 100)
        data.withUnsafeBytes { driver!.write(offset: 3 << 20, from: $0, fua: false, tag: 1, handler: log) }
        driver!.writeZeroes(offset: 5 << 20, length: 70000, options: [], tag: 2, handler: log)
        driver!.trim(offset: 7 << 20, length: 65536, fua: false, tag: 3, handler: log)
        // Marked at the request's entry: reflected before the writes complete.
        #expect(dirtyRanges(driver!, "a", loop) == [1048576..<1114112, 3145728..<3211264, 5242880..<5373952, 7340032..<7405568])
        drain(loop)
        #expect(log.failures.isEmpty, "\(log.failures)")
        #expect(dirtyRanges(driver!, "d", loop) == [1052672..<1056768], "a disabled bitmap does not record")
        driver!.close(tag: 9, handler: log)
        drain(loop)
        #expect(log.failures.isEmpty, "\(log.failures)")
        driver = nil

        let check = try qemuImg(["check", image])
        #expect(check.status == 0, "\(check.output)")
        let after = try qemuBitmaps(image)
        #expect(after["a"]?.0 == 65536 && after["a"]?.1 == ["auto"], "\(after)")
        #expect(after["d"]?.0 == 512 && after["d"]?.1 == [], "\(after)")
        let again = try QCow2Driver(path: image, readOnly: true, io: FileIO(loop: loop))
        #expect(dirtyRanges(again, "a", loop) == [1048576..<1114112, 3145728..<3211264, 5242880..<5373952, 7340032..<7405568])
        #expect(dirtyRanges(again, "d", loop) == [1052672..<1056768])
    }

    /// A writable image dropped without a close (a crash, as far as the file knows) keeps in_use set:
    /// the bitmap is inconsistent at the next open and not answered; qemu-img check stays clean.
    @Test func unclosedImageLeavesBitmapsInUse() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let image = try makeImage(scratch)
        let loop = try EventLoop()
        var driver: QCow2Driver? = try QCow2Driver(path: image, readOnly: false, io: FileIO(loop: loop))
        let log = Outcomes()
        let data = [UInt8](repeating: 7, count: 4096)
        data.withUnsafeBytes { driver!.write(offset: 0, from: $0, fua: true, tag: 1, handler: log) }
        drain(loop)
        driver = nil
        #expect(try qemuBitmaps(image)["a"]?.1 == ["in-use", "auto"])
        let again = try QCow2Driver(path: image, readOnly: false, io: FileIO(loop: loop))
        #expect(again.dirtyBitmaps.first { $0.name == "a" }?.inconsistent == true)
        #expect(again.dirtyBitmaps.first { $0.name == "d" }?.inconsistent == false)
        again.dirtyBitmapStatus(name: "a", offset: 0, length: 512, tag: 2, handler: log)
        guard case .failed = log.byTag[2] else { Issue.record("an inconsistent bitmap was answered"); return }
        again.close(tag: 3, handler: log)
        drain(loop)
        #expect(try qemuBitmaps(image)["a"]?.1 == ["in-use", "auto"], "an inconsistent bitmap stays in use")
        #expect(try qemuBitmaps(image)["d"]?.1 == [])
    }

    /// A bitmap with a flag qnbd does not know: the image is served read-only, and never written.
    @Test func unknownBitmapFlagServesReadOnly() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let image = try makeImage(scratch)
        let before = try Data(contentsOf: URL(fileURLWithPath: image))
        // The first directory entry's flags (offset 12 of the entry): set an unknown bit.
        let info = try run("/usr/bin/qemu-img", ["info", "--output=json", image])
        #expect(info.status == 0)
        var bytes = before
        let directory = bitmapDirectoryOffset(bytes)
        bytes[directory + 12 + 3] |= 0x80
        try bytes.write(to: URL(fileURLWithPath: image))
        let loop = try EventLoop()
        let driver = try QCow2Driver(path: image, readOnly: false, io: FileIO(loop: loop))
        #expect(!driver.capabilities.writable)
        #expect(driver.summary.contains("unknown flags"), "\(driver.summary)")
        #expect(driver.dirtyBitmaps.isEmpty)
        let log = Outcomes()
        driver.close(tag: 1, handler: log)
        drain(loop)
        #expect(try Data(contentsOf: URL(fileURLWithPath: image)) == bytes, "a read-only open never writes")
    }
}

/// The bitmap directory's offset, from the header extension (type 0x23852875) after the 104-byte v3 header.
private func bitmapDirectoryOffset(_ bytes: Data) -> Int {
    func be(_ at: Int, _ n: Int) -> Int { (0..<n).reduce(0) { $0 << 8 | Int(bytes[at + $1]) } }
    var p = be(100, 4)
    while be(p, 4) != 0 {
        if be(p, 4) == 0x2385_2875 { return be(p + 8 + 16, 8) }
        p += 8 + (be(p + 4, 4) + 7) / 8 * 8
    }
    return 0
}
