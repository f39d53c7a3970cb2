// RawDriver over real files in /tmp on a real event loop: what the BlockDevice contract promises for
// raw images — data round trips (page-cache hits answered inline and misses through the pool), zeroing
// with and without holes, trimming, block status from SEEK_DATA/SEEK_HOLE, effects in submission
// order, read-only opens, and refusals at open.

import BlockDevice
import Glibc
import RawDriver
import Testing
import UVCore

/// Collects outcomes by tag; the loop runs until every expected tag has one.
final class Outcomes: BlockIOHandler {
    var byTag: [UInt64: BlockOutcome] = [:]
    var order: [UInt64] = []
    func blockIOCompleted(tag: UInt64, outcome: BlockOutcome) {
        precondition(byTag[tag] == nil, "tag \(tag) completed twice")
        byTag[tag] = outcome
        order.append(tag)
    }

    func isDone(_ tag: UInt64) -> Bool {
        if case .done = byTag[tag] { return true }
        return false
    }

    func extents(_ tag: UInt64) -> [Extent] {
        if case .extents(let e) = byTag[tag] { return e }
        return []
    }
}

/// A temporary file, removed when the test ends.
struct ScratchFile {
    let path: String
    init(size: Int, contents: [UInt8] = []) {
        path = "/tmp/rawdriver-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).img"
        let fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        precondition(fd >= 0)
        if !contents.isEmpty {
            precondition(contents.withUnsafeBytes { pwrite(fd, $0.baseAddress, contents.count, 0) } == contents.count)
        }
        precondition(ftruncate(fd, off_t(size)) == 0)
        close(fd)
    }
    func remove() { unlink(path) }
    func bytes(at offset: Int, count: Int) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        defer { close(fd) }
        var out = [UInt8](repeating: 0xEE, count: count)
        let n = out.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        return Array(out[0..<max(n, 0)])
    }
    var allocatedBytes: Int {
        var st = stat()
        precondition(stat(path, &st) == 0)
        return Int(st.st_blocks) * 512
    }
    func dropFromPageCache() {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        fdatasync(fd)
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
        close(fd)
    }
}

/// Runs the loop until it has nothing left to do, with a watchdog so a lost completion fails the test
/// instead of hanging it.
func drain(_ loop: EventLoop, sourceLocation: SourceLocation = #_sourceLocation) {
    let watchdog = LoopTimer(loop: loop)
    var fired = false
    watchdog.start(afterMilliseconds: 30_000) {
        fired = true
        loop.stop()
    }
    watchdog.unref()
    loop.run()
    if fired { Issue.record("a completion never arrived", sourceLocation: sourceLocation) }
    watchdog.close()
    loop.run()
}

func pattern(_ count: Int, seed: Int) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: ($0 &* 131) &+ ($0 >> 9) &+ seed) }
}

@Suite struct RawDriverTests {
    @Test func writesReadBackFromThePageCacheAndFromDisk() throws {
        let file = ScratchFile(size: 4 << 20)
        defer { file.remove() }
        let loop = try EventLoop()
        let io = FileIO(loop: loop)
        let driver = try RawDriver(path: file.path, readOnly: false, io: io)
        #expect(driver.size == 4 << 20)
        let log = Outcomes()
        let data = pattern(300_000, seed: 3)
        // Unaligned on purpose: raw serves any byte range.
        data.withUnsafeBytes { driver.write(offset: 12_345, from: $0, fua: false, tag: 1, handler: log) }
        drain(loop)
        #expect(log.isDone(1))
        #expect(file.bytes(at: 12_345, count: data.count) == data)

        for dropCache in [false, true] {
            if dropCache { file.dropFromPageCache() }
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: data.count, alignment: 4096)
            defer { buffer.deallocate() }
            let tag: UInt64 = dropCache ? 3 : 2
            driver.read(offset: 12_345, into: buffer, tag: tag, handler: log)
            drain(loop)
            guard case .read = log.byTag[tag] else {
                Issue.record("read \(tag): \(String(describing: log.byTag[tag]))")
                continue
            }
            #expect(Array(buffer) == data, "read with the page cache \(dropCache ? "dropped" : "warm")")
        }
        #expect(io.statistics.inlineReads >= 1, "a cached read is answered on the loop")
        #expect(io.statistics.pooledReads >= 1, "an uncached read goes to the pool")
    }

    @Test func fuaWriteAndFlushComplete() throws {
        let file = ScratchFile(size: 1 << 20)
        defer { file.remove() }
        let loop = try EventLoop()
        let driver = try RawDriver(path: file.path, readOnly: false, io: FileIO(loop: loop))
        let log = Outcomes()
        let data = pattern(8192, seed: 9)
        data.withUnsafeBytes { driver.write(offset: 4096, from: $0, fua: true, tag: 1, handler: log) }
        driver.flush(tag: 2, handler: log)
        drain(loop)
        #expect(log.isDone(1) && log.isDone(2))
        #expect(file.bytes(at: 4096, count: 8192) == data)
    }

    @Test func zeroingPunchesAHoleUnlessNoHoleIsAsked() throws {
        let size = 8 << 20
        let file = ScratchFile(size: size, contents: pattern(size, seed: 1))
        defer { file.remove() }
        let loop = try EventLoop()
        let driver = try RawDriver(path: file.path, readOnly: false, io: FileIO(loop: loop))
        #expect(driver.capabilities.canTrim && driver.capabilities.canFastZero, "ext4 and tmpfs punch holes")
        let log = Outcomes()
        let allocatedBefore = file.allocatedBytes
        driver.writeZeroes(offset: 1 << 20, length: 1 << 20, options: [], tag: 1, handler: log)
        driver.writeZeroes(offset: 4 << 20, length: 1 << 20, options: [.noHole], tag: 2, handler: log)
        driver.writeZeroes(offset: 6 << 20, length: 4096, options: [.fastZero, .fua], tag: 3, handler: log)
        drain(loop)
        #expect(log.isDone(1) && log.isDone(2) && log.isDone(3))
        for offset in [1 << 20, 4 << 20, 6 << 20] {
            #expect(file.bytes(at: offset, count: 4096) == [UInt8](repeating: 0, count: 4096))
        }
        let original = pattern(size, seed: 1)
        let justBefore = (1 << 20) - 16
        let untouched = Array(original[justBefore..<(1 << 20)])
        #expect(file.bytes(at: justBefore, count: 16) == untouched, "bytes outside the range are untouched")
        // The punched megabyte is gone from the file; the NO_HOLE one still holds its blocks.
        #expect(file.allocatedBytes <= allocatedBefore - (1 << 20) + 8192)
        driver.blockStatus(offset: 0, length: UInt64(size), tag: 4, handler: log)
        drain(loop)
        let holes = log.extents(4).reduce(into: (offset: UInt64(0), holes: [Range<UInt64>]())) { acc, e in
            if e.flags.contains(.hole) { acc.holes.append(acc.offset..<acc.offset + e.length) }
            acc.offset += e.length
        }.holes
        #expect(holes.contains { $0.contains(1 << 20) }, "the punched range is a hole: \(holes)")
        #expect(!holes.contains { $0.contains(4 << 20) }, "the NO_HOLE range stays allocated: \(holes)")
    }

    @Test func trimReadsAsZerosAndFreesSpace() throws {
        let size = 4 << 20
        let file = ScratchFile(size: size, contents: pattern(size, seed: 5))
        defer { file.remove() }
        let loop = try EventLoop()
        let driver = try RawDriver(path: file.path, readOnly: false, io: FileIO(loop: loop))
        let log = Outcomes()
        let before = file.allocatedBytes
        driver.trim(offset: 0, length: 2 << 20, fua: true, tag: 1, handler: log)
        drain(loop)
        #expect(log.isDone(1))
        #expect(file.bytes(at: 0, count: 2 << 20) == [UInt8](repeating: 0, count: 2 << 20))
        #expect(file.allocatedBytes <= before - (2 << 20) + 8192)
        #expect(file.bytes(at: 2 << 20, count: 16) == Array(pattern(size, seed: 5)[(2 << 20)..<((2 << 20) + 16)]))
    }

    @Test func blockStatusFollowsTheFilesHolesExactly() throws {
        let size = 16 << 20
        let file = ScratchFile(size: size)
        defer { file.remove() }
        // Data at [1 MiB, 2 MiB) and [8 MiB, 8 MiB + 64 KiB); the rest never written.
        let fd = open(file.path, O_RDWR | O_CLOEXEC)
        for (offset, count) in [(1 << 20, 1 << 20), (8 << 20, 64 << 10)] {
            let bytes = pattern(count, seed: 2)
            #expect(bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, count, off_t(offset)) } == count)
        }
        close(fd)
        let loop = try EventLoop()
        let driver = try RawDriver(path: file.path, readOnly: true, io: FileIO(loop: loop))
        let log = Outcomes()
        driver.blockStatus(offset: 0, length: UInt64(size), tag: 1, handler: log)
        drain(loop)
        var runs: [(Range<UInt64>, Bool)] = []
        var position: UInt64 = 0
        for e in log.extents(1) {
            runs.append((position..<position + e.length, e.flags.contains(.hole)))
            #expect(e.flags.contains(.hole) == e.flags.contains(.zero), "a hole reads as zeros, data is not promised zero")
            position += e.length
        }
        #expect(position == UInt64(size))
        let data = runs.filter { !$0.1 }.map(\.0)
        let mib: UInt64 = 1 << 20
        let expected: [Range<UInt64>] = [mib..<2 * mib, 8 * mib..<(8 * mib + 65536)]
        #expect(data == expected, "\(runs)")
    }

    @Test func effectsLandInSubmissionOrder() throws {
        // A write, a zeroing of the same range and a second write, pipelined: the file ends as the client
        // sent them, even though zeroing runs as a pool job and writes may complete inline.
        let file = ScratchFile(size: 1 << 20)
        defer { file.remove() }
        let loop = try EventLoop()
        let driver = try RawDriver(path: file.path, readOnly: false, io: FileIO(loop: loop))
        let log = Outcomes()
        let first = pattern(65536, seed: 11)
        let last = pattern(4096, seed: 12)
        first.withUnsafeBytes { driver.write(offset: 0, from: $0, fua: false, tag: 1, handler: log) }
        driver.writeZeroes(offset: 0, length: 65536, options: [], tag: 2, handler: log)
        last.withUnsafeBytes { driver.write(offset: 8192, from: $0, fua: false, tag: 3, handler: log) }
        drain(loop)
        #expect(log.isDone(1) && log.isDone(2) && log.isDone(3))
        var expected = [UInt8](repeating: 0, count: 65536)
        expected.replaceSubrange(8192..<(8192 + 4096), with: last)
        #expect(file.bytes(at: 0, count: 65536) == expected)
    }

    @Test func readOnlyOpensAdvertiseNoWrites() throws {
        let file = ScratchFile(size: 1 << 20)
        defer { file.remove() }
        let loop = try EventLoop()
        let driver = try RawDriver(path: file.path, readOnly: true, io: FileIO(loop: loop))
        #expect(!driver.capabilities.writable)
        #expect(!driver.capabilities.canTrim && !driver.capabilities.canFastZero)
    }

    @Test func anOddSizedFileIsServedInWholeSectorsReadingZerosPastItsEnd() throws {
        // qemu-img info and qemu-nbd round a raw file up to 512 bytes; the tail reads as zeros.
        let file = ScratchFile(size: 1_000_003, contents: pattern(1_000_003, seed: 4))
        defer { file.remove() }
        let loop = try EventLoop()
        let driver = try RawDriver(path: file.path, readOnly: true, io: FileIO(loop: loop))
        #expect(driver.size == 1_000_448)
        let log = Outcomes()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 448, alignment: 8)
        defer { buffer.deallocate() }
        driver.read(offset: 1_000_000, into: buffer, tag: 1, handler: log)
        drain(loop)
        let expected = Array(pattern(1_000_003, seed: 4)[1_000_000...]) + [UInt8](repeating: 0, count: 445)
        #expect(Array(buffer) == expected)
    }

    @Test func whatCannotBeServedIsRefusedAtOpen() throws {
        let loop = try EventLoop()
        let io = FileIO(loop: loop)
        #expect(throws: BlockError.self) { try RawDriver(path: "/tmp", readOnly: true, io: io) }
        #expect(throws: BlockError.self) {
            try RawDriver(path: "/nonexistent/\(getpid()).img", readOnly: true, io: io)
        }
    }
}
