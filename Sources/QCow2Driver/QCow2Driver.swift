// The I/O shell around QCow2Engine: a BlockDevice that opens a qcow2 image and its backing chain,
// turns calls into engine events and runs the engine's actions on UVCore.
//
// Draining is a loop, not recursion: an action may complete inline (a page-cache hit), which feeds the
// engine and queues more actions; those are picked up by the loop already running, so the stack stays
// flat however long a chain of inline completions gets.

import BlockDevice
import QCow2
import RawDriver
import SystemCalls
import UVCore
#if canImport(Glibc)
import Glibc
#endif

public final class QCow2Driver: BlockDevice {
    public let size: UInt64
    public let capabilities: BlockCapabilities
    public let summary: String
    public let path: String
    public let header: Header
    /// The image below this one, if any.
    public let backing: BlockDevice?
    let engine: QCow2Engine
    /// The image's persistent bitmaps as they were at open, in directory order.
    public let dirtyBitmaps: [DirtyBitmapInfo]
    private let fd: Int32
    private let io: FileIO
    /// Test-only fault rules, installed on the top image only (the backing chain gets none); nil
    /// otherwise. Internal and mutable so that a test can arm one after the open.
    var faults: FaultInjector?
    // Loop-confined and never accessed overlapping: no dynamic exclusivity checks on the request path.
    @exclusivity(unchecked) private var callers = SlotTable<Caller>()
    @exclusivity(unchecked) private var inPlaceWrites = SlotTable<InPlaceWriteEntry>()
    @exclusivity(unchecked) private var pumping = false
    private var failureReported = false
    /// Called once, on the loop, when the image turns read-only after an error (the reason names the
    /// structure or the failed write), so the operator sees why in the log.
    public var onFailure: ((String) -> Void)?
    private var closing: (tag: UInt64, handler: BlockIOHandler, passes: Int)?
    /// The close waits for I/O still in flight (a punch) before it stores the bitmaps.
    private var closeWaitsForIO = false
    /// Test-only log of host-file changes (asked for with `writeLog`); nil in normal use.
    let recorder: WriteRecorder?

    /// Longest backing chain accepted; deeper chains are refused as a likely loop or attack.
    public static let maximumChainDepth = 64

    /// Largest refcount metadata loaded for a writable image (see RefcountState for why it is loaded).
    public static let maximumRefcountBytes = 512 << 20

    /// Opens `path`; the backing chain below it is always opened read-only. Test taps, for this image
    /// only: `faults` completes the file operations its rules pick with their errno instead of issuing
    /// them (it counts this driver's operations, so give each driver its own); `writeLog` logs every
    /// change to the file, when the image is opened writable.
    public convenience init(path: String, readOnly: Bool, io: FileIO, cacheBytes: Int? = nil,
                            faults: FaultInjector? = nil, writeLog: WriteLog? = nil) throws(BlockError) {
        var seen: Set<String> = [Self.identity(path)]
        try self.init(path: path, writable: !readOnly, io: io, cacheBytes: cacheBytes, faults: faults, writeLog: writeLog,
                      depth: 0, seen: &seen)
    }

    init(path: String, writable asked: Bool, io: FileIO, cacheBytes: Int?, faults: FaultInjector?, writeLog: WriteLog?,
         depth: Int, seen: inout Set<String>) throws(BlockError) {
        var writable = asked
        let fd = Glibc.open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC)
        guard fd >= 0 else { throw BlockError(errno: errno, message: "cannot open \(path)") }
        var ok = false
        defer { if !ok { Glibc.close(fd) } }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw BlockError(errno: errno, message: "cannot stat \(path)") }
        let fileSize = UInt64(st.st_size)
        // Metadata is read synchronously here, through the format layer's loader: opening happens
        // before the loop serves anyone.
        let loader = Self.loader(fd, path: path)
        let header: Header
        do {
            header = try loader.header(fileSize: fileSize)
            try header.validate(fileSize: fileSize, writable: writable)
        } catch {
            throw BlockError(errno: EINVAL, message: "\(path): \(error)")
        }
        if writable && header.isDirty {
            throw BlockError(errno: EINVAL, message: "\(path): qcow2 header: the dirty bit is set (lazy refcounts after a crash); "
                + "repair it with `qemu-img check -r all` or serve it with --read-only")
        }
        let bitmaps: OpenedBitmaps
        do {
            bitmaps = try OpenedBitmaps.load(header: header, fileSize: fileSize, read: loader.read)
        } catch {
            throw BlockError(errno: error.corrupt ? EINVAL : EIO, message: "\(path): \(error)")
        }
        var readOnlyReason: String?
        if writable, let unusable = bitmaps.unusable {
            // qemu opens such an image read-only as well: writing would leave bitmaps it cannot update.
            writable = false
            readOnlyReason = "\(unusable); served read-only"
        }
        let l1: [UInt64]
        do {
            l1 = try loader.l1Table(header)
        } catch {
            throw BlockError(errno: EIO, message: error.text)
        }

        var backing: BlockDevice?
        if let name = header.backingFileName {
            guard depth + 1 < Self.maximumChainDepth else {
                throw BlockError(errno: ELOOP, message: "\(path): backing chain deeper than \(Self.maximumChainDepth)")
            }
            let resolved = resolveBackingPath(name, relativeTo: path)
            let key = Self.identity(resolved)
            guard !seen.contains(key) else {
                throw BlockError(errno: ELOOP, message: "\(path): backing chain loops back to \(resolved)")
            }
            seen.insert(key)
            let format = header.backingFormat ?? Self.probedFormat(resolved)
            switch format {
            case "qcow2":
                backing = try QCow2Driver(path: resolved, writable: false, io: io, cacheBytes: cacheBytes, faults: nil,
                                          writeLog: nil, depth: depth + 1, seen: &seen)
            case "raw", "file":
                backing = try RawDriver(path: resolved, readOnly: true, io: io)
            default:
                throw BlockError(errno: ENOTSUP, message: "\(path): backing format \"\(format)\" is not supported")
            }
        }
        let cache = cacheBytes ?? QCow2Engine.defaultCacheBytes(header: header)
        // Made before the first change to the file, so the log holds every one.
        let recorder = writable ? writeLog.map { WriteRecorder(log: $0, fileSize: fileSize) } : nil
        do {
            if writable {
                let (table, blocks) = try Self.loadRefcounts(fd, header: header, fileSize: fileSize, path: path)
                let snapshots = try SnapshotMetadata(header: header, fileSize: fileSize) { (offset, count) throws(QCow2Error) in
                    do throws(BlockError) { return try Self.preadAll(fd, count: count, offset: offset, path: path) } catch {
                        throw QCow2Error("snapshot table", "cannot be read: \(error.message ?? "errno \(error.errno)")")
                    }
                }
                engine = try QCow2Engine(header: header, l1: l1, fileSize: fileSize, backingSize: backing?.size,
                                         cacheBytes: cache, refcountTable: table, refcountBlocks: blocks,
                                         snapshots: snapshots)
                try bitmaps.markInUse(fd: fd, header: header, path: path, recorder: recorder)
                try Self.clearAutoclearBits(fd, header: header, keepBitmaps: !bitmaps.entries.isEmpty, path: path)
            } else {
                engine = try QCow2Engine(header: header, l1: l1, fileSize: fileSize, backingSize: backing?.size,
                                         cacheBytes: cache)
            }
        } catch let error as QCow2Error {
            throw BlockError(errno: EINVAL, message: "\(path): \(error)")
        } catch let error as BlockError {
            throw error
        } catch {
            throw BlockError(errno: EIO, message: "\(path): \(error)")
        }
        engine.install(bitmaps: bitmaps.live)
        dirtyBitmaps = bitmaps.live.map {
            DirtyBitmapInfo(name: $0.name, granularity: $0.granularity, enabled: $0.enabled, inconsistent: $0.inconsistent)
        }
        self.faults = faults
        self.fd = fd
        self.io = io
        self.path = path
        self.header = header
        self.backing = backing
        // Whole 512-byte sectors, as qemu (qemu-img info, qemu-nbd) and `qnbd info` count a header size
        // that is not a multiple of 512: the tail past the last whole sector is not served.
        self.size = header.size & ~511
        self.capabilities = BlockCapabilities(
            writable: writable, canTrim: writable, canZero: writable, canFastZero: writable, canMultiConn: true,
            knowsAllocationDepth: true, minimumBlockSize: 1,
            preferredBlockSize: UInt32(min(header.clusterSize, 2 << 20)))
        var text = "qcow2 v\(header.version) \(path), \(header.size) bytes, \(header.clusterSize)-byte clusters"
        if let backing { text += ", backed by \(backing.summary)" }
        if !bitmaps.live.isEmpty { text += ", \(bitmaps.live.count) persistent bitmap\(bitmaps.live.count == 1 ? "" : "s")" }
        if let readOnlyReason { text += " (\(readOnlyReason))" }
        self.summary = text
        self.recorder = recorder
        ok = true
    }

    deinit { Glibc.close(fd) }

    // MARK: - BlockDevice

    public func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, tag: UInt64, handler: BlockIOHandler) {
        engine.read(tag: callers.insert(tag: tag, handler: handler), offset: offset, into: buffer)
        pump()
    }

    public func blockStatus(offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler) {
        engine.blockStatus(tag: callers.insert(tag: tag, handler: handler), offset: offset, length: length)
        pump()
    }

    public func write(offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool, tag: UInt64, handler: BlockIOHandler) {
        // The write log keys its records by engine token, so with a recorder every write takes the
        // general path (the file sees the same pwrite either way).
        if recorder == nil, let write = engine.beginInPlaceWrite(offset: offset, count: buffer.count, fua: fua) {
            return writeInPlace(write, from: buffer, tag: tag, handler: handler)
        }
        let requestTag = callers.insert(tag: tag, handler: handler)
        if fua { recorder?.asked(.fuaWrite, tag: requestTag) }
        engine.write(tag: requestTag, offset: offset, from: buffer, fua: fua)
        pump()
    }

    public func writeZeroes(offset: UInt64, length: UInt64, options: ZeroOptions, tag: UInt64, handler: BlockIOHandler) {
        engine.writeZeroes(tag: callers.insert(tag: tag, handler: handler), offset: offset, length: length,
                           keepAllocation: options.contains(.noHole), fastOnly: options.contains(.fastZero),
                           fua: options.contains(.fua))
        pump()
    }

    public func trim(offset: UInt64, length: UInt64, fua: Bool, tag: UInt64, handler: BlockIOHandler) {
        engine.trim(tag: callers.insert(tag: tag, handler: handler), offset: offset, length: length, fua: fua)
        pump()
    }

    public func flush(tag: UInt64, handler: BlockIOHandler) {
        let requestTag = callers.insert(tag: tag, handler: handler)
        recorder?.asked(.flush, tag: requestTag)
        engine.flush(tag: requestTag)
        pump()
    }

    /// Flushes until nothing is left: a flush that frees clusters dirties refcount blocks, which the
    /// next flush writes.
    public func close(tag: UInt64, handler: BlockIOHandler) {
        closing = (tag, handler, 4)
        closeStep()
    }

    private func closeStep() {
        guard let (tag, handler, passes) = closing else { return }
        if !engine.isDirty || passes == 0 {
            // Bitmaps are stored only over a quiet, fully flushed image: the store allocates from the
            // refcounts on disk, which are then the whole truth.
            if engine.outstandingIO > 0 || engine.activeRequests > 0 {
                closeWaitsForIO = true
                return
            }
            closing = nil
            guard capabilities.writable && !engine.isDirty && engine.failure == nil else {
                return handler.blockIOCompleted(tag: tag, outcome: .done)
            }
            return storeBitmaps(on: io) { handler.blockIOCompleted(tag: tag, outcome: .done) }
        }
        closing = (tag, handler, passes - 1)
        engine.flush(tag: callers.insert(tag: Self.closeTag, handler: self))
        pump()
    }

    /// Overwrites the in-place fast path has taken (tests and profiles).
    public var fastPathWrites: Int { engine.fastPathWrites }

    public func cache(offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler) {
        handler.blockIOCompleted(tag: tag, outcome: .done)
    }

    // MARK: - The in-place fast path

    /// Issues an overwrite the engine answered at once (QCow2Engine+InPlace) straight to the file.
    private func writeInPlace(_ write: InPlaceWrite, from buffer: UnsafeRawBufferPointer, tag: UInt64, handler: BlockIOHandler) {
        if let faults, let errno = faults.fault(.write, offset: write.host, length: UInt64(buffer.count)) {
            return finishInPlace(write, result: -Int(errno), tag: tag, handler: handler)
        }
        let slot = inPlaceWrites.insert(InPlaceWriteEntry(tag: tag, handler: handler, write: write))
        if case .done(let result) = io.write(fd: fd, from: buffer, offset: write.host, dsync: false,
                                             context: Self.inPlaceTag | UInt64(slot), completion: self) {
            let entry = inPlaceWrites.remove(slot)
            finishInPlace(entry.write, result: result, tag: entry.tag, handler: entry.handler)
        }
    }

    private func finishInPlace(_ write: InPlaceWrite, result: Int, tag: UInt64, handler: BlockIOHandler) {
        let outcome = engine.finishInPlaceWrite(write, errno: result < 0 ? Int32(-result) : nil)
        handler.blockIOCompleted(tag: tag, outcome: outcome)
        if closeWaitsForIO { pump() }
    }

    // MARK: - Running actions

    private func pump() {
        guard !pumping else { return }
        pumping = true
        while let action = engine.nextAction() { execute(action) }
        pumping = false
        if !failureReported, let failure = engine.failure {
            failureReported = true
            onFailure?("\(path): \(failure); the image is read-only from now on")
        }
        if closeWaitsForIO && engine.outstandingIO == 0 && engine.activeRequests == 0 {
            closeWaitsForIO = false
            closeStep()
        }
    }

    private func execute(_ action: IOAction) {
        recorder?.issuing(action)
        switch action {
        case .readFile(let token, let offset, let buffer):
            if injectedFault(token, .read, offset, buffer.count) { return }
            let context = UInt64(token.raw)
            if case .done(let result) = io.read(fd: fd, into: buffer, offset: offset, context: context, completion: self) {
                engine.completed(token, result: result < 0 ? .failure(Int32(-result)) : .success)
            }
        case .writeFile(let token, let offset, let buffer, let dsync):
            if injectedFault(token, .write, offset, buffer.count) { return }
            let context = UInt64(token.raw)
            if case .done(let result) = io.write(fd: fd, from: buffer, offset: offset, dsync: dsync, context: context,
                                                 completion: self) {
                recorder?.completed(token: token.raw, result: result)
                engine.completed(token, result: result < 0 ? .failure(Int32(-result)) : .success)
            }
        case .syncFile(let token):
            if injectedFault(token, .sync, 0, 0) { return }
            io.fdatasync(fd: fd, context: UInt64(token.raw), completion: self)
        case .punchFile(let token, let offset, let length):
            if injectedFault(token, .punch, offset, Int(length)) { return }
            io.fallocate(fd: fd, mode: FallocateMode.punchHole | FallocateMode.keepSize, offset: offset, length: length,
                         context: UInt64(token.raw), completion: self)
        case .readBacking(let token, let offset, let buffer):
            guard let backing else { preconditionFailure("backing read without a backing image") }
            backing.read(offset: offset, into: buffer, tag: Self.backingTag | UInt64(token.raw), handler: self)
        case .backingStatus(let token, let offset, let length):
            guard let backing else { preconditionFailure("backing status without a backing image") }
            backing.blockStatus(offset: offset, length: length, tag: Self.backingTag | UInt64(token.raw), handler: self)
        case .decompress(let token, let algorithm, let source, let destination):
            let job = DecompressJob(algorithm: algorithm, source: source, destination: destination)
            io.run(context: UInt64(token.raw), completion: self) { job.run() }
        case .complete(let tag, let outcome):
            let caller = callers.remove(tag)
            caller.handler.blockIOCompleted(tag: caller.tag, outcome: outcome)
        }
    }

    /// Test-only: a fault the injector picks completes the action with its errno instead of running it.
    private func injectedFault(_ token: IOToken, _ operation: FaultInjector.Operation, _ offset: UInt64, _ length: Int) -> Bool {
        guard let faults, let errno = faults.fault(operation, offset: offset, length: UInt64(length)) else { return false }
        engine.completed(token, result: .failure(errno))
        return true
    }

    private static let backingTag: UInt64 = 1 << 62
    /// Marks a FileIO context as an in-place write's table slot (engine tokens fit in 32 bits).
    private static let inPlaceTag: UInt64 = 1 << 40
    private static let closeTag: UInt64 = 1 << 61

    // MARK: - Opening helpers

    private static func preadAll(_ fd: Int32, count: Int, offset: UInt64, path: String) throws(BlockError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        // Stops at end of file: the rest stays zero, as qcow2 readers treat it.
        let result = bytes.withUnsafeMutableBytes { SystemCall.read(fd, into: $0, at: offset) }
        if result < 0 { throw BlockError(errno: Int32(-result), message: "reading \(path)") }
        return bytes
    }

    /// The format layer's metadata loader over `fd`.
    private static func loader(_ fd: Int32, path: String) -> MetadataLoader {
        MetadataLoader { (offset, count) throws(QCow2Error) in
            do throws(BlockError) { return try preadAll(fd, count: count, offset: offset, path: path) } catch {
                throw .io("\(path): \(error.message ?? "read failed (errno \(error.errno))")")
            }
        }
    }

    /// Reads the refcount table and every refcount block it names (writable opens only).
    private static func loadRefcounts(_ fd: Int32, header: Header, fileSize: UInt64,
                                      path: String) throws(BlockError) -> ([UInt64], [Int: [UInt8]]) {
        let loader = loader(fd, path: path)
        do {
            let table = try loader.refcountTable(header)
            let blocks = try loader.refcountBlocks(table: table, geometry: Geometry(header: header), fileSize: fileSize,
                                                   maximumBytes: maximumRefcountBytes)
            return (table, blocks)
        } catch {
            let code = error.structure == "file" ? EIO : error.corrupt ? EINVAL : EFBIG
            throw BlockError(errno: code, message: "\(path): \(error.text)")
        }
    }

    /// Autoclear features qnbd does not maintain are cleared before the first write, as the spec
    /// requires of writers that do not know them. Bit 0 (bitmaps) stays when the image's bitmaps were
    /// loaded: qnbd keeps them up to date.
    private static func clearAutoclearBits(_ fd: Int32, header: Header, keepBitmaps: Bool, path: String) throws(BlockError) {
        let kept = keepBitmaps ? header.autoclearFeatures & FeatureBit.bitmaps : 0
        guard header.version >= 3, header.autoclearFeatures != kept else { return }
        var word = kept.bigEndian
        guard pwrite(fd, &word, 8, off_t(Header.autoclearFeaturesOffset)) == 8, fdatasync(fd) == 0 else {
            throw BlockError(errno: errno, message: "\(path): cannot clear the autoclear feature bits")
        }
    }

    private static func identity(_ path: String) -> String {
        var st = stat()
        guard stat(path, &st) == 0 else { return path }
        return "\(st.st_dev):\(st.st_ino)"
    }

    /// A backing file's format from its first bytes, by qemu's name: another format's signature is not
    /// taken for raw (the backing format check below refuses it).
    private static func probedFormat(_ path: String) -> String {
        guard let file = try? BlockingImageFile(path: path, writable: false),
              let probed = try? MetadataLoader(file: file).probe() else { return "raw" }
        switch probed {
        case .qcow2: return "qcow2"
        case .raw: return "raw"
        case .foreign(let name): return name
        }
    }
}

extension QCow2Driver: FileIOCompletion {
    public func fileIOCompleted(context: UInt64, result: Int) {
        if context & Self.inPlaceTag != 0 {
            let entry = inPlaceWrites.remove(Int(truncatingIfNeeded: context & ~Self.inPlaceTag))
            return finishInPlace(entry.write, result: result, tag: entry.tag, handler: entry.handler)
        }
        recorder?.completed(token: UInt32(context), result: result)
        engine.completed(IOToken(raw: UInt32(context)), result: result < 0 ? .failure(Int32(-result)) : .success)
        pump()
    }
}

extension QCow2Driver: BlockIOHandler {
    /// Completions from the backing image.
    public func blockIOCompleted(tag: UInt64, outcome: BlockOutcome) {
        if tag == Self.closeTag {
            if case .failed(let error) = outcome, let (t, h, _) = closing {
                closing = nil
                return h.blockIOCompleted(tag: t, outcome: .failed(error))
            }
            return closeStep()
        }
        let token = IOToken(raw: UInt32(truncatingIfNeeded: tag & ~Self.backingTag))
        switch outcome {
        case .done, .read: engine.completed(token, result: .success)
        case .extents(let extents): engine.completed(token, result: .extents(extents))
        case .failed(let error): engine.completed(token, result: .failure(error.errno))
        }
        pump()
    }
}

/// Carries the buffers of one decompression to a pool thread; the engine does not touch them until the
/// completion, which libuv orders after the work.
private final class DecompressJob: @unchecked Sendable {
    let algorithm: CompressionAlgorithm
    let source: UnsafeRawBufferPointer
    let destination: UnsafeMutableRawBufferPointer

    init(algorithm: CompressionAlgorithm, source: UnsafeRawBufferPointer, destination: UnsafeMutableRawBufferPointer) {
        self.algorithm = algorithm
        self.source = source
        self.destination = destination
    }

    func run() -> Int { Decompressor.run(algorithm, source: source, into: destination) }
}

/// The caller of a request in flight; its SlotTable slot is the RequestTag the engine carries.
private struct Caller {
    let tag: UInt64
    let handler: BlockIOHandler
}

extension SlotTable where Entry == Caller {
    mutating func insert(tag: UInt64, handler: BlockIOHandler) -> RequestTag {
        RequestTag(insert(Caller(tag: tag, handler: handler)))
    }

    mutating func remove(_ tag: RequestTag) -> Caller {
        remove(Int(tag))
    }
}
