// A FaultInjector installed in a RawDriver by the test itself (no environment): the operations its
// rules pick complete with the rule's errno and never reach the file; the others are issued as usual.

import BlockDevice
import Glibc
import RawDriver
import Testing
import UVCore

/// The errno a request failed with, or nil if it did not fail.
private func failure(_ outcome: BlockOutcome?) -> Int32? {
    if case .failed(let error) = outcome { return error.errno }
    return nil
}

@Suite struct RawDriverFaultTests {
    @Test func installedRulesFailTheOperationsTheyPick() throws {
        let file = ScratchFile(size: 1 << 20)
        defer { file.remove() }
        let loop = try EventLoop()
        let faults = try FaultInjector(rules: "write,errno=ENOSPC,offset=0x10000+0x1000; sync,errno=EIO,nth=1; read,errno=EDQUOT,nth=2")
        let driver = try RawDriver(path: file.path, readOnly: false, io: FileIO(loop: loop), faults: faults)
        let log = Outcomes()
        let data = pattern(4096, seed: 4)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: data.count, alignment: 4096)
        defer { buffer.deallocate() }
        buffer.copyBytes(from: data)
        driver.write(offset: 0, from: UnsafeRawBufferPointer(buffer), fua: false, tag: 1, handler: log)
        driver.write(offset: 0x10800, from: UnsafeRawBufferPointer(buffer), fua: false, tag: 2, handler: log)
        driver.flush(tag: 3, handler: log)
        driver.flush(tag: 4, handler: log)
        drain(loop)
        #expect(log.isDone(1), "a write outside the rule's range is issued")
        #expect(failure(log.byTag[2]) == ENOSPC, "\(String(describing: log.byTag[2]))")
        #expect(failure(log.byTag[3]) == EIO, "the first sync fails")
        #expect(log.isDone(4), "the second sync is issued")
        #expect(file.bytes(at: 0, count: data.count) == data)
        #expect(file.bytes(at: 0x10800, count: data.count) == [UInt8](repeating: 0, count: data.count),
                "a faulted write never reaches the file")

        let into = UnsafeMutableRawBufferPointer.allocate(byteCount: data.count, alignment: 4096)
        defer { into.deallocate() }
        for tag: UInt64 in 5...7 {
            driver.read(offset: 0, into: into, tag: tag, handler: log)
            drain(loop)
        }
        guard case .read = log.byTag[5], case .read = log.byTag[7] else {
            Issue.record("reads 1 and 3: \(String(describing: log.byTag[5])), \(String(describing: log.byTag[7]))")
            return
        }
        #expect(failure(log.byTag[6]) == EDQUOT, "the second read fails")
        let readBack = Array(into) == data
        #expect(readBack, "the third read returns the data")
    }

    /// The rules count one driver's operations: a fresh copy installed in a second driver starts from
    /// nothing, as each image the server opens gets its own.
    @Test func eachDriverCountsItsOwnOperations() throws {
        let file = ScratchFile(size: 1 << 20, contents: pattern(8192, seed: 2))
        defer { file.remove() }
        let loop = try EventLoop()
        let rules = try FaultInjector(rules: "read,errno=EIO,nth=1")
        let first = try RawDriver(path: file.path, readOnly: true, io: FileIO(loop: loop), faults: rules.fresh())
        let second = try RawDriver(path: file.path, readOnly: true, io: FileIO(loop: loop), faults: rules.fresh())
        let log = Outcomes()
        let into = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { into.deallocate() }
        first.read(offset: 0, into: into, tag: 1, handler: log)
        first.read(offset: 0, into: into, tag: 2, handler: log)
        second.read(offset: 0, into: into, tag: 3, handler: log)
        drain(loop)
        #expect(failure(log.byTag[1]) == EIO)
        guard case .read = log.byTag[2] else {
            Issue.record("the first driver's second read: \(String(describing: log.byTag[2]))")
            return
        }
        #expect(failure(log.byTag[3]) == EIO, "the second driver's first read is its own 1st")
    }
}
