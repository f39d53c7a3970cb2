// The test taps installed in a QCow2Driver by the test itself (no environment): a FaultInjector fails
// the top image's file operations its rules pick and leaves the backing chain alone, and a WriteLog
// records a writable image's changes from the open on.

import BlockDevice
import Foundation
import QCow2Driver
import Testing
import UVCore

@Suite struct QCow2DriverTapTests {
    @Test func faultsApplyToTheTopImageOnly() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let base = scratch.path("base.raw")
        let overlay = scratch.path("overlay.qcow2")
        let baseData = bytes(2 << 20, seed: 11)
        _ = FileManager.default.createFile(atPath: base, contents: Data(baseData))
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", overlay]).status == 0)

        let loop = try EventLoop()
        let driver = try QCow2Driver(path: overlay, readOnly: false, io: FileIO(loop: loop),
                                     faults: try FaultInjector(rules: "read,errno=EIO"))
        let log = Outcomes()
        let into = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 4096)
        defer { into.deallocate() }
        // Unallocated in the overlay: read from the base, which has no injector.
        driver.read(offset: 0, into: into, tag: 1, handler: log)
        drain(loop)
        #expect(log.failures.isEmpty, "\(log.failures)")
        let readTheBase = Array(into) == Array(baseData[0..<65536])
        #expect(readTheBase, "the read returns the base's bytes")

        // A partial-cluster write copies the rest of its cluster from the base (not faulted), then a
        // read of it goes to the overlay's file and fails with the rule's errno.
        let patch = bytes(4096, seed: 12)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: patch.count, alignment: 4096)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: patch)
        driver.write(offset: 1 << 20, from: UnsafeRawBufferPointer(buffer), fua: false, tag: 2, handler: log)
        drain(loop)
        #expect(log.failures.isEmpty, "\(log.failures)")
        driver.read(offset: 1 << 20, into: into, tag: 3, handler: log)
        drain(loop)
        guard case .failed(let error) = log.byTag[3] else {
            Issue.record("a read of the overlay's own cluster was issued: \(String(describing: log.byTag[3]))")
            return
        }
        #expect(error.errno == EIO)
    }

    @Test func aWriteLogRecordsAWritableImageFromTheOpen() throws {
        let scratch = Scratch()
        defer { scratch.remove() }
        let image = scratch.path("disk.qcow2")
        let logPath = scratch.path("writes.log")
        #expect(try qemuImg(["create", "-q", "-f", "qcow2", image, "1M"]).status == 0)
        let fileSize = try #require(try FileManager.default.attributesOfItem(atPath: image)[.size] as? UInt64)
        let loop = try EventLoop()

        // Read-only: nothing changes, so nothing is logged and no log is made.
        _ = try QCow2Driver(path: image, readOnly: true, io: FileIO(loop: loop), writeLog: WriteLog(path: logPath))
        #expect(!FileManager.default.fileExists(atPath: logPath))

        let driver = try QCow2Driver(path: image, readOnly: false, io: FileIO(loop: loop), writeLog: WriteLog(path: logPath))
        let opened = try Array(Data(contentsOf: URL(fileURLWithPath: logPath)))
        // The magic, then the open record (kind 1) carrying the file's size at open.
        #expect(opened.count == 8 + 32)
        #expect(Array(opened.prefix(8)) == Array("QNBDWLG1".utf8))
        #expect(opened.count > 8 && opened[8] == 1)
        if opened.count >= 24 {
            let size = (0..<8).reduce(UInt64(0)) { $0 | UInt64(opened[16 + $1]) << (8 * UInt64($1)) }
            #expect(size == fileSize)
        }

        let log = Outcomes()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: bytes(4096, seed: 13))
        driver.write(offset: 0, from: UnsafeRawBufferPointer(buffer), fua: false, tag: 1, handler: log)
        driver.flush(tag: 2, handler: log)
        drain(loop)
        #expect(log.failures.isEmpty, "\(log.failures)")
        let written = try Array(Data(contentsOf: URL(fileURLWithPath: logPath)))
        // At least the data write's issue record and its 4096 bytes, and a sync.
        #expect(written.count >= opened.count + 32 + 4096 + 32)
    }
}
