// Raw images: a regular file or a block device served byte for byte.
//
// Reads and writes go through UVCore's FileIO, which answers page-cache hits inline and sends everything
// else to the thread pool; so a request either completes inside `read`/`write` or later on the loop.
// The rare operations (zeroing, trimming, block status, cache hints) run as small blocking jobs on the
// pool, where falling back from one syscall to another costs nothing on the loop. Zeroing and trimming
// change the image, so they go in FileIO's ordered lane with the writes: they take effect in the order
// the client sent them.
//
// One driver instance serves every connection to its export, which is what makes advertising
// multi-conn honest: a flush (fdatasync) on any connection covers every write the kernel has accepted,
// whichever connection sent it.

import BlockDevice
import SystemCalls
import UVCore
#if canImport(Glibc)
import Glibc
#endif

public final class RawDriver: BlockDevice {
    public let size: UInt64
    public let capabilities: BlockCapabilities
    public let summary: String
    public let path: String
    private let fd: Int32
    private let io: FileIO
    private let isBlockDevice: Bool
    /// Test-only: the fault rules a test installed (the server's TestTaps, from QNBD_TEST_FAULTS);
    /// nil otherwise.
    private let faults: FaultInjector?
    /// Requests waiting for FileIO, addressed by slot so the completion context is a plain integer.
    /// Unchecked exclusivity: touched once per request on the loop, never re-entered (see Connection).
    @exclusivity(unchecked) private var inFlight = InFlightTable()

    /// Opens `path`; `readOnly` opens it O_RDONLY and advertises a read-only export. `faults` (tests
    /// only) completes the operations its rules pick with their errno instead of issuing them; the
    /// injector counts this driver's operations, so give each driver its own.
    public init(path: String, readOnly: Bool, io: FileIO, faults: FaultInjector? = nil) throws(BlockError) {
        self.faults = faults
        let fd = Glibc.open(path, (readOnly ? O_RDONLY : O_RDWR) | O_CLOEXEC)
        guard fd >= 0 else { throw BlockError(errno: errno, message: "cannot open \(path)") }
        var st = stat()
        guard fstat(fd, &st) == 0 else {
            let e = errno
            Glibc.close(fd)
            throw BlockError(errno: e, message: "cannot stat \(path)")
        }
        let kind = st.st_mode & S_IFMT
        let size: UInt64
        if kind == S_IFBLK {
            let bytes = SystemCall.blockDeviceSize(fd)
            guard bytes >= 0 else {
                Glibc.close(fd)
                throw BlockError(errno: Int32(-bytes), message: "cannot read the size of block device \(path)")
            }
            size = UInt64(bytes)
        } else if kind == S_IFREG {
            // Whole 512-byte sectors, as qemu-nbd and qemu-img info (and so `qnbd info`) see a raw file;
            // the tail past the end of the file reads as zeros.
            size = (UInt64(st.st_size) + 511) & ~511
        } else {
            Glibc.close(fd)
            throw BlockError(errno: EINVAL, message: "\(path) is neither a regular file nor a block device")
        }
        self.fd = fd
        self.io = io
        self.path = path
        self.size = size
        self.isBlockDevice = kind == S_IFBLK
        // Probe hole punching once, past the end where it changes nothing: it decides whether TRIM and
        // fast zeroing can be offered at all.
        let punches = !readOnly && SystemCall.allocate(fd, mode: FallocateMode.punchHole | FallocateMode.keepSize,
                                                       offset: size, length: 4096) == 0
        self.capabilities = BlockCapabilities(
            writable: !readOnly, canTrim: punches, canZero: !readOnly, canFastZero: punches,
            canMultiConn: true, rotational: false, minimumBlockSize: 1, preferredBlockSize: 4096)
        self.summary = "raw \(isBlockDevice ? "block device" : "file") \(path), \(size) bytes"
    }

    deinit {
        Glibc.close(fd)
    }

    // MARK: - Hot path

    public func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, tag: UInt64, handler: BlockIOHandler) {
        if buffer.count == 0 { return handler.blockIOCompleted(tag: tag, outcome: .read(zeroRanges: [])) }
        if let e = faults?.fault(.read, offset: offset, length: UInt64(buffer.count)) { return fail(tag, handler, e) }
        let slot = inFlight.insert(tag: tag, handler: handler, kind: .read)
        if case .done(let result) = io.read(fd: fd, into: buffer, offset: offset, context: UInt64(slot), completion: self) {
            fileIOCompleted(context: UInt64(slot), result: result)
        }
    }

    public func write(offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool, tag: UInt64, handler: BlockIOHandler) {
        if buffer.count == 0 { return handler.blockIOCompleted(tag: tag, outcome: .done) }
        if let e = faults?.fault(.write, offset: offset, length: UInt64(buffer.count)) { return fail(tag, handler, e) }
        let slot = inFlight.insert(tag: tag, handler: handler, kind: .other)
        if case .done(let result) = io.write(fd: fd, from: buffer, offset: offset, dsync: fua,
                                             context: UInt64(slot), completion: self) {
            fileIOCompleted(context: UInt64(slot), result: result)
        }
    }

    public func flush(tag: UInt64, handler: BlockIOHandler) {
        if let e = faults?.fault(.sync) { return fail(tag, handler, e) }
        let slot = inFlight.insert(tag: tag, handler: handler, kind: .other)
        io.fdatasync(fd: fd, context: UInt64(slot), completion: self)
    }

    // MARK: - Pool jobs

    public func writeZeroes(offset: UInt64, length: UInt64, options: ZeroOptions, tag: UInt64, handler: BlockIOHandler) {
        if length == 0 { return handler.blockIOCompleted(tag: tag, outcome: .done) }
        if let e = faults?.fault(.write, offset: offset, length: length) { return fail(tag, handler, e) }
        let fd = self.fd
        let canPunch = capabilities.canTrim
        runJob(tag: tag, handler: handler, ordered: true) {
            RawZeroing.zero(fd: fd, offset: offset, length: length, options: options, canPunch: canPunch)
        }
    }

    public func trim(offset: UInt64, length: UInt64, fua: Bool, tag: UInt64, handler: BlockIOHandler) {
        if length == 0 { return handler.blockIOCompleted(tag: tag, outcome: .done) }
        if let e = faults?.fault(.punch, offset: offset, length: length) { return fail(tag, handler, e) }
        let fd = self.fd
        runJob(tag: tag, handler: handler, ordered: true) {
            RawZeroing.punch(fd: fd, offset: offset, length: length, sync: fua)
        }
    }

    public func cache(offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler) {
        if length == 0 { return handler.blockIOCompleted(tag: tag, outcome: .done) }
        let fd = self.fd
        runJob(tag: tag, handler: handler) {
            // Advisory: start readahead; a failure here is not the client's problem.
            _ = posix_fadvise(fd, off_t(offset), off_t(length), POSIX_FADV_WILLNEED)
            return 0
        }
    }

    public func blockStatus(offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler) {
        let job = ExtentScan(fd: fd, offset: offset, length: length, isBlockDevice: isBlockDevice)
        let slot = inFlight.insert(tag: tag, handler: handler, kind: .blockStatus(job))
        io.run(context: UInt64(slot), completion: self) { job.scan() }
    }

    /// Test-only: completes a request with an injected errno instead of issuing it.
    private func fail(_ tag: UInt64, _ handler: BlockIOHandler, _ errno: Int32) {
        handler.blockIOCompleted(tag: tag, outcome: .failed(BlockError(errno: errno, message: "injected fault")))
    }

    /// `ordered`: jobs that change the image go in FileIO's ordered lane, behind earlier writes.
    private func runJob(tag: UInt64, handler: BlockIOHandler, ordered: Bool = false,
                        _ work: @escaping @Sendable () -> Int) {
        let slot = inFlight.insert(tag: tag, handler: handler, kind: .other)
        io.run(context: UInt64(slot), completion: self, ordered: ordered, work: work)
    }
}

extension RawDriver: FileIOCompletion {
    public func fileIOCompleted(context: UInt64, result: Int) {
        let entry = inFlight.remove(slot: Int(context))
        let outcome: BlockOutcome
        if result < 0 {
            outcome = .failed(BlockError(errno: Int32(-result)))
        } else {
            switch entry.kind {
            case .read: outcome = .read(zeroRanges: [])
            case .other: outcome = .done
            case .blockStatus(let job): outcome = .extents(job.extents)
            }
        }
        entry.handler.blockIOCompleted(tag: entry.tag, outcome: outcome)
    }
}
