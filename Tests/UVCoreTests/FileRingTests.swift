// FileIO's io_uring backend beyond what FileIOTests runs on every backend: more requests than the
// ring holds, ENOSPC from a device, zeroing a range, the fallback when no ring can be made, and the
// `--aio` names.

import Glibc
import Testing
@testable import UVCore

@Suite struct FileRingTests {
    /// A ring of 4 entries (8 completions) gets 300 reads and 300 writes at once: the excess waits in
    /// FileIO and everything completes with the right bytes.
    @Test(arguments: TestBackend.allCases) func moreRequestsThanTheRingHolds(backend: TestBackend) throws {
        let loop = try EventLoop()
        let count = 300
        let file = TempFile(size: count * 4096)
        defer { close(file.fd) }
        let io = try backend.make(loop, ringEntries: 4)
        io.inlineReadLimit = 0
        let log = CompletionLog()
        let reads = UnsafeMutableRawBufferPointer.allocate(byteCount: count * 4096, alignment: 4096)
        let writes = UnsafeMutableRawBufferPointer.allocate(byteCount: count * 4096, alignment: 4096)
        defer { reads.deallocate(); writes.deallocate() }
        let newContents = pattern(count * 4096, seed: 3)
        writes.copyBytes(from: newContents)
        for i in 0..<count {
            let block = i * 4096
            #expect(isQueued(io.read(fd: file.fd, into: UnsafeMutableRawBufferPointer(rebasing: reads[block..<(block + 4096)]),
                                     offset: UInt64(block), context: UInt64(i), completion: log)))
        }
        runLoop(loop)
        #expect(log.results.count == count && log.results.values.allSatisfy { $0 == 4096 })
        #expect(Array(reads) == file.contents)

        // Writes to a second file region (past the first), so no read above could see them.
        let base = count * 4096
        for i in 0..<count {
            let block = i * 4096
            _ = io.write(fd: file.fd, from: UnsafeRawBufferPointer(rebasing: writes[block..<(block + 4096)]),
                         offset: UInt64(base + block), dsync: false, context: UInt64(1000 + i), completion: log)
        }
        runLoop(loop)
        #expect(log.results.count == 2 * count && log.results.values.allSatisfy { $0 == 4096 })
        #expect(file.read(offset: base, count: count * 4096) == newContents)
        if backend != .threads { #expect(io.ringSubmissions >= (backend == .ringWrites ? 2 : 1) * count) }
        io.close()
        try loop.close()
    }

    /// /dev/full refuses every write with ENOSPC and reads as zeros, on either backend.
    @Test(arguments: TestBackend.allCases) func devFullGivesENOSPC(backend: TestBackend) throws {
        let loop = try EventLoop()
        let fd = open("/dev/full", O_RDWR | O_CLOEXEC)
        try #require(fd >= 0)
        defer { close(fd) }
        let io = try backend.make(loop)
        io.inlineReadLimit = 0
        let log = CompletionLog()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 8192, alignment: 4096)
        defer { buffer.deallocate() }
        buffer.initializeMemory(as: UInt8.self, repeating: 0xAA)
        _ = io.write(fd: fd, from: UnsafeRawBufferPointer(buffer), offset: 0, dsync: false, context: 1, completion: log)
        _ = io.write(fd: fd, from: UnsafeRawBufferPointer(buffer), offset: 0, dsync: true, context: 2, completion: log)
        _ = io.read(fd: fd, into: buffer, offset: 0, context: 3, completion: log)
        runLoop(loop)
        #expect(log.results == [1: -Int(ENOSPC), 2: -Int(ENOSPC), 3: 8192])
        #expect(buffer.allSatisfy { $0 == 0 })
        io.close()
        try loop.close()
    }

    /// FALLOC_FL_ZERO_RANGE through fallocate, ordered after the write it overlaps.
    @Test(arguments: TestBackend.allCases) func zeroRangeAfterAnOverlappingWrite(backend: TestBackend) throws {
        let loop = try EventLoop()
        let file = TempFile(size: 1 << 20)
        defer { close(file.fd) }
        let io = try backend.make(loop)
        let log = CompletionLog()
        let data = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 4096)
        defer { data.deallocate() }
        data.initializeMemory(as: UInt8.self, repeating: 0x5A)
        _ = io.write(fd: file.fd, from: UnsafeRawBufferPointer(data), offset: 65536, dsync: false, context: 1, completion: log)
        io.fallocate(fd: file.fd, mode: FallocateMode.zeroRange | FallocateMode.keepSize, offset: 69632, length: 8192,
                     context: 2, completion: log)
        _ = io.write(fd: file.fd, from: UnsafeRawBufferPointer(rebasing: data[0..<4096]), offset: 73728, dsync: false,
                     context: 3, completion: log)
        runLoop(loop)
        #expect(log.results == [1: 65536, 2: 0, 3: 4096])
        #expect(log.order == [1, 2, 3])
        #expect(file.read(offset: 65536, count: 4096).allSatisfy { $0 == 0x5A })
        #expect(file.read(offset: 69632, count: 4096).allSatisfy { $0 == 0 })
        #expect(file.read(offset: 73728, count: 4096).allSatisfy { $0 == 0x5A })
        #expect(file.read(offset: 77824, count: 4096).allSatisfy { $0 == 0x5A })
        io.close()
        try loop.close()
    }

    /// Writes to different blocks are not held back by each other; overlapping ones run one at a time.
    @Test func nonOverlappingWritesShareTheRing() throws {
        let loop = try EventLoop()
        let file = TempFile(size: 1 << 20)
        defer { close(file.fd) }
        let io = try TestBackend.ringWrites.make(loop)
        let log = CompletionLog()
        let data = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { data.deallocate() }
        for i in 0..<8 {
            _ = io.write(fd: file.fd, from: UnsafeRawBufferPointer(data), offset: UInt64(i * 4096), dsync: false,
                         context: UInt64(i), completion: log)
        }
        // All 8 went to the ring in this turn; a ninth overlapping the first must wait for it.
        #expect(io.ringWritesAccepted == 8)
        _ = io.write(fd: file.fd, from: UnsafeRawBufferPointer(data), offset: 2048, dsync: false, context: 8, completion: log)
        #expect(io.ringWritesAccepted == 8)
        runLoop(loop)
        #expect(io.ringSubmissions == 9)
        #expect(log.results.count == 9)
        io.close()
        try loop.close()
    }

    /// No ring (here: a ring of 0 entries, which io_uring_queue_init refuses with EINVAL): an explicit
    /// io_uring choice fails, the default falls back to the pool with a reason, and the pool works.
    @Test func fallbackWhenNoRingCanBeMade() throws {
        let loop = try EventLoop()
        #expect(throws: FileRingUnavailable.self) { try FileIO(loop: loop, backend: .ioUring, ringEntries: 0) }
        #expect(throws: FileRingUnavailable.self) { try FileIO.preferred(loop: loop, backend: .ioUring, ringEntries: 0) }
        let (io, note) = try FileIO.preferred(loop: loop, backend: nil, ringEntries: 0)
        #expect(io.backend == .threads)
        #expect(note?.contains("io_uring is not available") == true)
        #expect(note?.contains("Invalid argument") == true)
        let (ringIO, ringNote) = try FileIO.preferred(loop: loop, backend: nil)
        #expect(ringIO.backend == .ioUring)
        #expect(ringNote == nil)
        ringIO.close()

        let file = TempFile(size: 8192)
        defer { close(file.fd) }
        io.inlineReadLimit = 0
        let log = CompletionLog()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 8192, alignment: 4096)
        defer { buffer.deallocate() }
        #expect(isQueued(io.read(fd: file.fd, into: buffer, offset: 0, context: 1, completion: log)))
        runLoop(loop)
        #expect(log.results == [1: 8192])
        #expect(Array(buffer) == file.contents)
        io.close()
        try loop.close()
    }

    /// A server that stops before any I/O closes its ring after `run()` returned; the loop must still
    /// close (the ring's poll handle finishes closing in close()), or the loop leaks at exit.
    @Test(arguments: TestBackend.allCases) func loopClosesAfterAnUnusedBackendIsClosed(backend: TestBackend) throws {
        let loop = try EventLoop()
        let io = try backend.make(loop)
        loop.run()
        io.close()
        try loop.close()
    }

    @Test func aioNames() throws {
        #expect(try FileIOBackend.parse(aio: "io_uring").get() == .ioUring)
        #expect(try FileIOBackend.parse(aio: "threads").get() == .threads)
        guard case .failure(let native) = FileIOBackend.parse(aio: "native") else { Issue.record("native accepted"); return }
        #expect(native.description.contains("not supported"))
        guard case .failure(let other) = FileIOBackend.parse(aio: "posix") else { Issue.record("posix accepted"); return }
        #expect(other.description.contains("unknown"))
    }
}

@Suite struct FileRingChainTests {
    /// A turn's writes go as one chain; a member that fails (EFAULT: an unmapped buffer) reports on
    /// its own without breaking the chain, and the silent members come back as full successes.
    @Test func aChainWithAFailingMember() throws {
        let loop = try EventLoop()
        let file = TempFile(size: 1 << 20)
        defer { close(file.fd) }
        let io = try TestBackend.ringWrites.make(loop)
        let log = CompletionLog()
        let data = UnsafeMutableRawBufferPointer.allocate(byteCount: 8 * 4096, alignment: 4096)
        defer { data.deallocate() }
        data.copyBytes(from: pattern(8 * 4096, seed: 11))
        // An address no mapping covers: the kernel's copy faults.
        let unmapped = mmap(nil, 4096, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)!
        defer { munmap(unmapped, 4096) }
        for i in 0..<8 {
            let source = i == 3 ? UnsafeRawBufferPointer(start: unmapped, count: 4096)
                                : UnsafeRawBufferPointer(rebasing: data[(i * 4096)..<((i + 1) * 4096)])
            _ = io.write(fd: file.fd, from: source, offset: UInt64(i * 4096), dsync: false, context: UInt64(i), completion: log)
        }
        #expect(io.ringSubmissions == 0, "chains are built at the turn's end")
        runLoop(loop)
        #expect(io.ringSubmissions == 8)
        var expected: [UInt64: Int] = [:]
        for i in 0..<8 { expected[UInt64(i)] = i == 3 ? -Int(EFAULT) : 4096 }
        #expect(log.results == expected)
        for i in 0..<8 where i != 3 {
            #expect(file.read(offset: i * 4096, count: 4096) == Array(data[(i * 4096)..<((i + 1) * 4096)]))
        }
        io.close()
        try loop.close()
    }

    /// Every member failing (/dev/full) still ends the chain and finishes every request.
    @Test func aChainWhoseMembersAllFail() throws {
        let loop = try EventLoop()
        let fd = open("/dev/full", O_RDWR | O_CLOEXEC)
        try #require(fd >= 0)
        defer { close(fd) }
        let io = try TestBackend.ringWrites.make(loop)
        let log = CompletionLog()
        let data = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { data.deallocate() }
        for i in 0..<40 {
            _ = io.write(fd: fd, from: UnsafeRawBufferPointer(data), offset: UInt64(i * 4096), dsync: false,
                         context: UInt64(i), completion: log)
        }
        runLoop(loop)
        #expect(log.results.count == 40)
        #expect(log.results.values.allSatisfy { $0 == -Int(ENOSPC) })
        io.close()
        try loop.close()
    }
}

/// The FileIO configurations the tests run on: the thread pool, the ring (ordered requests on the
/// pool's lane, the default), and the ring with writes on it too.
enum TestBackend: CaseIterable, Sendable {
    case threads, ring, ringWrites

    func make(_ loop: EventLoop, ringEntries: UInt32 = 128) throws -> FileIO {
        switch self {
        case .threads: return FileIO(loop: loop)
        case .ring: return try FileIO(loop: loop, backend: .ioUring, ringEntries: ringEntries)
        case .ringWrites: return try FileIO(loop: loop, backend: .ioUring, ringEntries: ringEntries, ringWrites: true)
        }
    }
}
