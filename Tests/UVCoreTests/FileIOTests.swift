// FileIO tests on a temporary file in /tmp (ext4 here), each on both backends (the thread pool and
// io_uring): inline and queued reads, zero-fill past end of file, writes, FUA writes, fdatasync,
// punching a hole, arbitrary pool jobs, ordering, and errors coming back as -errno.

import Glibc
import Testing
@testable import UVCore

/// Records every completion, in order.
final class CompletionLog: FileIOCompletion {
    var results: [UInt64: Int] = [:]
    var order: [UInt64] = []
    func fileIOCompleted(context: UInt64, result: Int) {
        results[context] = result
        order.append(context)
    }
}

/// A temporary file filled with a known pattern, flushed to disk.
struct TempFile {
    let fd: Int32
    let contents: [UInt8]
    init(size: Int) {
        let path = temporaryPath("fileio")
        fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        precondition(fd >= 0)
        unlink(path)
        contents = pattern(size, seed: 7)
        let written = contents.withUnsafeBytes { pwrite(fd, $0.baseAddress, size, 0) }
        precondition(written == size)
    }
    func dropFromPageCache() {
        fdatasync(fd)
        posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)
    }
    func read(offset: Int, count: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0xEE, count: count)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, count, off_t(offset)) }
        return Array(bytes[0..<max(n, 0)])
    }
}

func isDone(_ outcome: FileIOOutcome, _ value: Int) -> Bool {
    if case .done(let n) = outcome { return n == value }
    return false
}

func isQueued(_ outcome: FileIOOutcome) -> Bool {
    if case .queued = outcome { return true }
    return false
}

@Suite struct FileIOTests {
    @Test(arguments: TestBackend.allCases) func inlineReadOfCachedData(backend: TestBackend) throws {
        let loop = try EventLoop()
        let file = TempFile(size: 1 << 20)
        defer { close(file.fd) }
        let io = try backend.make(loop)
        let log = CompletionLog()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 4096)
        defer { buffer.deallocate() }

        let outcome = io.read(fd: file.fd, into: buffer, offset: 4096, context: 1, completion: log)
        #expect(isDone(outcome, 65536))
        #expect(Array(buffer) == Array(file.contents[4096..<(4096 + 65536)]))

        // Entirely past end of file: zeros, still inline (preadv2 returns 0).
        buffer.initializeMemory(as: UInt8.self, repeating: 0xAA)
        #expect(isDone(io.read(fd: file.fd, into: buffer, offset: 8 << 20, context: 2, completion: log), 65536))
        #expect(buffer.allSatisfy { $0 == 0 })

        runLoop(loop)
        #expect(log.order.isEmpty)
        #expect(io.statistics.inlineReads == 2)
        #expect(io.statistics.pooledReads == 0)
        io.close()
        try loop.close()
    }

    @Test(arguments: TestBackend.allCases) func pooledReadsZeroFillPastEndOfFile(backend: TestBackend) throws {
        let loop = try EventLoop()
        let size = 100_000
        let file = TempFile(size: size)
        defer { close(file.fd) }
        let io = try backend.make(loop)
        io.inlineReadLimit = 0
        let log = CompletionLog()
        let whole = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
        let straddle = UnsafeMutableRawBufferPointer.allocate(byteCount: 8192, alignment: 4096)
        let beyond = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { whole.deallocate(); straddle.deallocate(); beyond.deallocate() }
        straddle.initializeMemory(as: UInt8.self, repeating: 0xAA)
        beyond.initializeMemory(as: UInt8.self, repeating: 0xAA)

        #expect(isQueued(io.read(fd: file.fd, into: whole, offset: 0, context: 1, completion: log)))
        #expect(isQueued(io.read(fd: file.fd, into: straddle, offset: UInt64(size - 100), context: 2, completion: log)))
        #expect(isQueued(io.read(fd: file.fd, into: beyond, offset: 1 << 30, context: 3, completion: log)))
        runLoop(loop)

        #expect(log.results == [1: size, 2: 8192, 3: 4096])
        #expect(Array(whole) == file.contents)
        #expect(Array(straddle[0..<100]) == Array(file.contents[(size - 100)...]))
        #expect(straddle[100...].allSatisfy { $0 == 0 })
        #expect(beyond.allSatisfy { $0 == 0 })
        #expect(io.statistics.pooledReads == 3)
        #expect(io.statistics.inlineReads == 0)
        io.close()
        try loop.close()
    }

    @Test(arguments: TestBackend.allCases) func uncachedReadGoesToThePool(backend: TestBackend) throws {
        let loop = try EventLoop()
        let size = 1 << 20
        let file = TempFile(size: size)
        defer { close(file.fd) }
        file.dropFromPageCache()
        let io = try backend.make(loop)
        let log = CompletionLog()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
        defer { buffer.deallocate() }

        // Not in the page cache: preadv2(RWF_NOWAIT) says EAGAIN, so the pool reads it.
        #expect(isQueued(io.read(fd: file.fd, into: buffer, offset: 0, context: 9, completion: log)))
        runLoop(loop)
        #expect(log.results == [9: size])
        #expect(Array(buffer) == file.contents)
        #expect(io.statistics.pooledReads == 1)

        // Now it is cached: the same read is served inline.
        #expect(isDone(io.read(fd: file.fd, into: buffer, offset: 0, context: 10, completion: log), size))
        #expect(io.statistics.inlineReads == 1)
        runLoop(loop)
        io.close()
        try loop.close()
    }

    @Test(arguments: TestBackend.allCases) func writesFlushPunchAndRun(backend: TestBackend) throws {
        let loop = try EventLoop()
        let size = 1 << 20
        let file = TempFile(size: size)
        defer { close(file.fd) }
        let io = try backend.make(loop)
        let log = CompletionLog()
        let data = UnsafeMutableRawBufferPointer.allocate(byteCount: 65536, alignment: 4096)
        defer { data.deallocate() }
        data.copyBytes(from: pattern(65536, seed: 99))

        // Buffered NOWAIT writes: ext4 answers EOPNOTSUPP, so this goes to the pool and
        // FileIO stops trying inline; a filesystem that accepts them finishes inline.
        let plain = io.write(fd: file.fd, from: UnsafeRawBufferPointer(data), offset: 0, dsync: false, context: 1, completion: log)
        let second = io.write(fd: file.fd, from: UnsafeRawBufferPointer(data), offset: UInt64(size), dsync: false, context: 2, completion: log)
        let fua = io.write(fd: file.fd, from: UnsafeRawBufferPointer(data), offset: 131072, dsync: true, context: 3, completion: log)
        #expect(isQueued(fua))
        io.fdatasync(fd: file.fd, context: 4, completion: log)
        let loopThread = pthread_self()
        io.run(context: 5, completion: log) {
            pthread_equal(pthread_self(), loopThread) == 0 ? 1234 : -1
        }
        runLoop(loop)

        var expectedResults: [UInt64: Int] = [3: 65536, 4: 0, 5: 1234]
        if isQueued(plain) { expectedResults[1] = 65536 } else { #expect(isDone(plain, 65536)) }
        if isQueued(second) { expectedResults[2] = 65536 } else { #expect(isDone(second, 65536)) }
        #expect(log.results == expectedResults)
        if isQueued(plain) && backend == .threads {
            #expect(!io.triesInlineWrites)
            #expect(isQueued(second))
        }
        #expect(io.statistics.inlineWrites + io.statistics.pooledWrites == 3)
        #expect(file.read(offset: 0, count: 65536) == Array(data))
        #expect(file.read(offset: size, count: 65536) == Array(data))
        #expect(file.read(offset: 131072, count: 65536) == Array(data))

        // Punch a 256 KiB hole: it reads as zeros and the file keeps its size.
        var before = stat()
        fstat(file.fd, &before)
        io.fallocate(fd: file.fd, mode: FallocateMode.punchHole | FallocateMode.keepSize,
                     offset: 262144, length: 262144, context: 6, completion: log)
        runLoop(loop)
        #expect(log.results[6] == 0)
        var after = stat()
        fstat(file.fd, &after)
        #expect(after.st_size == before.st_size)
        #expect(after.st_blocks < before.st_blocks)
        #expect(file.read(offset: 262144, count: 262144).allSatisfy { $0 == 0 })
        #expect(lseek(file.fd, 262144, SeekWhence.data) == 524288)
        #expect(lseek(file.fd, 0, SeekWhence.hole) == 262144)
        io.close()
        try loop.close()
    }

    @Test(arguments: TestBackend.allCases) func orderedLaneAppliesChangesInSubmissionOrder(backend: TestBackend) throws {
        let loop = try EventLoop()
        let file = TempFile(size: 1 << 20)
        defer { close(file.fd) }
        let io = try backend.make(loop)
        let log = CompletionLog()
        let count = 40
        let buffers = (0..<count).map { i -> UnsafeMutableRawBufferPointer in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
            buffer.initializeMemory(as: UInt8.self, repeating: UInt8(i + 1))
            return buffer
        }
        defer { for buffer in buffers { buffer.deallocate() } }
        let fd = file.fd

        // Writes to one block, an ordered job that reads it back in the middle, FUA writes, and an
        // ordered zeroing of the block at the end: each must see everything submitted before it.
        func write(_ i: Int, fua: Bool = false) {
            _ = io.write(fd: fd, from: UnsafeRawBufferPointer(buffers[i]), offset: 8192, dsync: fua,
                         context: UInt64(i), completion: log)
        }
        for i in 0..<20 { write(i) }
        io.run(context: 100, completion: log, ordered: true) {
            var byte: UInt8 = 0
            return pread(fd, &byte, 1, 8192) == 1 ? Int(byte) : -1
        }
        for i in 20..<30 { write(i, fua: i % 3 == 0) }
        runLoop(loop)
        // A second round, submitted from a completion while a batch may still be running.
        final class Next: FileIOCompletion {
            let action: () -> Void
            init(_ action: @escaping () -> Void) { self.action = action }
            func fileIOCompleted(context: UInt64, result: Int) { action() }
        }
        let next = Next {
            for i in 30..<count { write(i) }
            io.run(context: 101, completion: log, ordered: true) {
                withUnsafeTemporaryAllocation(byteCount: 4096, alignment: 4096) { zeros in
                    zeros.initializeMemory(as: UInt8.self, repeating: 0)
                    return pwrite(fd, zeros.baseAddress, 4096, 8192) == 4096 ? 0 : -1
                }
            }
        }
        _ = io.write(fd: fd, from: UnsafeRawBufferPointer(buffers[0]), offset: 0, dsync: false, context: 200, completion: next)
        runLoop(loop)

        #expect(log.results[100] == 20)   // the 20th write's byte
        #expect(log.results[101] == 0)
        let expectedOrder = Array(0..<20).map(UInt64.init) + [100] + Array(20..<count).map(UInt64.init) + [101]
        #expect(log.order == expectedOrder)
        #expect((0..<count).allSatisfy { log.results[UInt64($0)] == 4096 })
        #expect(file.read(offset: 8192, count: 4096).allSatisfy { $0 == 0 })
        io.close()
        try loop.close()
    }

    @Test(arguments: TestBackend.allCases) func bigLaneWritesArePipelinedInOrder(backend: TestBackend) throws {
        let loop = try EventLoop()
        let file = TempFile(size: 4 << 20)
        defer { close(file.fd) }
        let io = try backend.make(loop)
        let log = CompletionLog()
        // Each big write is a full lane batch on its own, so several are on the pool at once and the
        // turnstile must run them in order; small ones and ordered jobs are mixed in. Completions
        // may then arrive out of order (a batch's thread posts its result after letting the next
        // one run), but every effect lands in submission order.
        let size = 512 << 10
        let count = 12
        let buffers = (0..<count).map { i -> UnsafeMutableRawBufferPointer in
            let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 4096)
            buffer.initializeMemory(as: UInt8.self, repeating: UInt8(i + 1))
            return buffer
        }
        defer { for buffer in buffers { buffer.deallocate() } }
        let fd = file.fd
        var expectedOrder: [UInt64] = []
        for i in 0..<count {
            let length = i % 3 == 2 ? 4096 : size
            _ = io.write(fd: fd, from: UnsafeRawBufferPointer(rebasing: buffers[i][0..<length]), offset: 0, dsync: false,
                         context: UInt64(i), completion: log)
            expectedOrder.append(UInt64(i))
            if i == 6 {
                io.run(context: 100, completion: log, ordered: true) {
                    var byte: UInt8 = 0
                    return pread(fd, &byte, 1, 0) == 1 ? Int(byte) : -1
                }
                expectedOrder.append(100)
            }
        }
        io.run(context: 101, completion: log, ordered: true) {
            var first: UInt8 = 0, later: UInt8 = 0
            guard pread(fd, &first, 1, 0) == 1, pread(fd, &later, 1, 8192) == 1 else { return -1 }
            return Int(first) << 8 | Int(later)
        }
        expectedOrder.append(101)
        runLoop(loop)
        #expect(log.order.sorted() == expectedOrder.sorted())
        #expect(log.results[100] == 7)   // write 6, the last before it
        // The last small write (11, byte 12) covers the first 4 KiB, the last big one (10, byte 11) the rest.
        #expect(log.results[101] == 12 << 8 | 11)
        #expect(file.read(offset: 0, count: 4096).allSatisfy { $0 == 12 })
        #expect(file.read(offset: 4096, count: size - 4096).allSatisfy { $0 == 11 })
        #expect((0..<count).allSatisfy { log.results[UInt64($0)] == ($0 % 3 == 2 ? 4096 : size) })
        io.close()
        try loop.close()
    }

    @Test(arguments: TestBackend.allCases) func errorsComeBackAsNegativeErrno(backend: TestBackend) throws {
        let loop = try EventLoop()
        let io = try backend.make(loop)
        let log = CompletionLog()
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 4096)
        defer { buffer.deallocate() }
        #expect(isQueued(io.read(fd: -1, into: buffer, offset: 0, context: 1, completion: log)))
        #expect(isQueued(io.write(fd: -1, from: UnsafeRawBufferPointer(buffer), offset: 0, dsync: false, context: 2, completion: log)))
        io.fdatasync(fd: -1, context: 3, completion: log)
        io.fallocate(fd: -1, mode: 0, offset: 0, length: 4096, context: 4, completion: log)
        runLoop(loop)
        let ebadf = -Int(EBADF)
        #expect(log.results == [1: ebadf, 2: ebadf, 3: ebadf, 4: ebadf])
        io.close()
        try loop.close()
    }

    @Test(arguments: TestBackend.allCases) func completionMayQueueAgainAndFileIOMayBeDroppedWhileBusy(backend: TestBackend) throws {
        let loop = try EventLoop()
        final class Counter { var steps = 0 }
        final class Chain: FileIOCompletion {
            let io: FileIO
            let counter: Counter
            init(io: FileIO, counter: Counter) { self.io = io; self.counter = counter }
            func fileIOCompleted(context: UInt64, result: Int) {
                counter.steps += 1
                if context < 100 { io.run(context: context + 1, completion: self) { 0 } }
            }
        }
        let counter = Counter()
        var chain: Chain? = Chain(io: try backend.make(loop), counter: counter)
        chain!.io.run(context: 1, completion: chain!) { 0 }
        weak let weakChain = chain
        weak let weakIO = chain!.io
        chain = nil   // from here on, only the in-flight request keeps the chain and its FileIO alive
        #expect(weakChain != nil)
        runLoop(loop)
        #expect(counter.steps == 100)
        #expect(weakChain == nil)
        #expect(weakIO == nil)
        try loop.close()
    }
}
