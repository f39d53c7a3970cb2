// FileIO: positioned file I/O that never blocks the loop.
//
// Two paths. Reads first try preadv2(RWF_NOWAIT) on the loop thread: a page-cache
// hit costs one syscall and no thread hand-off. EAGAIN (not cached) or a short
// count (partly cached) sends the rest to libuv's thread pool through
// uv_queue_work, whose work callback does a plain pread loop. Writes try
// pwritev2(RWF_NOWAIT) the same way, but ext4 on this machine answers
// EOPNOTSUPP for every buffered NOWAIT write, so after the first EOPNOTSUPP a
// FileIO stops trying (one wasted syscall per FileIO, not per write).
// fdatasync, fallocate, FUA writes and arbitrary jobs always go to the pool.
//
// The ordered lane. Pool writes (plain and FUA), fallocate and jobs queued
// with `ordered: true` run in batches, strictly in the order they were
// submitted: the lane's requests of a loop turn wait for the turn's end and go
// to the pool as one job, which performs them in order on one thread. Small
// requests that arrive while a batch runs wait for it and form the next one;
// a full batch's worth (laneBatchBytes, e.g. one 1 MiB write) is queued at
// once behind the running batches, and a turnstile makes each batch's thread
// wait for the ones before it, so big writes stay pipelined and complete one
// by one. Two reasons. Buffered writes to one file serialize on its inode lock
// anyway (ext4, XFS), so pool threads writing at once only spin on that lock
// and each pays a thread wake-up (with 16 threads, randwrite 4k QD32 spent a
// third of the server's CPU in wake-ups and lock spinning); a batch costs one
// hand-off and no contention. And requests that change the file's contents
// take effect in the order the client sent them, even when it pipelines a
// write and a zeroing of the same range (NBD allows reordering; clients and
// tests are happier without it). A batch's results arrive together; with
// several batches on the pool, results may arrive out of order (a batch's
// thread posts its results after letting the next batch run), effects never
// do. Reads, fdatasync and other jobs stay parallel: a flush only has to cover
// writes that have completed.
//
// An O_DIRECT descriptor bypasses the page cache, so an "inline" read would
// wait for the disk on the loop thread: set both inline limits to 0 for one.
//
// Reads past end of file produce zeros, so a short or sparse image reads as if
// it were extended with zeros; the result is always the full length or -errno.
//
// Ownership. Work requests (a uv_work_t plus a FileWorkRequest) come from this
// object's free list and go back to it in the after-work callback, before the
// completion runs, so a completion may queue again at no cost. A request holds
// its completion object strongly while in flight. The FileIO itself holds one
// strong reference to itself while any request is in flight, so dropping it
// early cannot free a request libuv still owns.
//
// Threads. The work callback runs on a pool thread and touches only its own
// request's plain fields (fd, buffer, length, offset, mode, result, job); the
// loop thread does not touch the request between uv_queue_work and the
// after-work callback, and libuv's queue lock orders the two sides.

import CLibURing
import CLibUV
import SystemCalls
#if canImport(Glibc)
import Glibc
#endif

/// Receives the result of a queued `FileIO` operation, on the loop thread.
public protocol FileIOCompletion: AnyObject {
    /// result: bytes transferred (always the full length asked for) or -errno.
    /// fdatasync and fallocate report 0; `run` reports what its job returned.
    func fileIOCompleted(context: UInt64, result: Int)
}

/// How a `FileIO` call ended up.
public enum FileIOOutcome {
    /// Finished on the loop thread: bytes (the full length) or -errno. No completion call follows.
    case done(Int)
    /// Handed to the thread pool or the ring; the completion will be called.
    case queued
}

/// Where a FileIO sends the work it cannot finish inline (qemu-nbd's `--aio` names).
public enum FileIOBackend: String, Sendable, CaseIterable {
    /// libuv's thread pool.
    case threads
    /// An io_uring per FileIO, driven by the loop (FileRing); the pool only for what the kernel's
    /// ring cannot do and for `run` jobs.
    case ioUring = "io_uring"

    /// The backend an `--aio` / `aio =` value names, or why it names none.
    public static func parse(aio text: String) -> Result<FileIOBackend, FileIOBackendNameError> {
        if let backend = FileIOBackend(rawValue: text) { return .success(backend) }
        if text == "native" {
            return .failure(FileIOBackendNameError(description: "aio mode \"native\" (Linux AIO) is not supported: use io_uring or threads"))
        }
        return .failure(FileIOBackendNameError(description: "aio mode \"\(text)\" is unknown: use io_uring or threads"))
    }
}

public struct FileIOBackendNameError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

/// FALLOC_FL_* bits for `FileIO.fallocate(mode:)` (defined with the syscalls; named here so users of
/// FileIO need not import SystemCalls).
public typealias FallocateMode = SystemCalls.FallocateMode
public typealias SeekWhence = SystemCalls.SeekWhence

/// One pool operation. Lives in memory owned by FileIO's free list.
struct FileWorkRequest {
    enum Operation { case read, write, writeDSync, fdatasync, fallocate, run }

    let uv: UnsafeMutablePointer<uv_work_t>
    let owner: Unmanaged<FileIO>
    /// The owner's turnstile (the owner keeps it alive).
    let turnstile: Unmanaged<LaneTurnstile>
    /// On the head of a lane batch: its place in the lane (1, 2, ...); 0 for other jobs.
    var ticket: UInt64 = 0
    var operation = Operation.read
    var fd: Int32 = -1
    var mode: Int32 = 0
    var buffer: UnsafeMutableRawPointer?
    var length = 0
    var offset: UInt64 = 0
    /// Bytes the inline attempt already moved; added to a successful result.
    var alreadyDone = 0
    /// The next request of the same job (a lane batch), or nil.
    var next: UnsafeMutablePointer<FileWorkRequest>?
    var result = 0
    var context: UInt64 = 0
    var completion: (any FileIOCompletion)?
    var job: (@Sendable () -> Int)?
    /// Ring backend: the range an ordered request changes (everything for an ordered job: a
    /// barrier), and whether it holds its place in the ordering gate.
    var changesStart: UInt64 = 0
    var changesEnd: UInt64 = 0
    var isBarrier = false
    var holdsGate = false
    /// Ring backend, a member of a write chain (see `flushWriteChains`); members are linked through
    /// `next`, and the last one knows the first.
    var chained = false
    var chainFirst: UnsafeMutablePointer<FileWorkRequest>?
    /// A member that posted a completion (it failed or was short) before its chain ended: its result.
    var chainReported = false
}

private let onWork: uv_work_cb = { work in
    let head = work!.pointee.data.assumingMemoryBound(to: FileWorkRequest.self)
    let ticket = head.pointee.ticket
    if ticket != 0 { head.pointee.turnstile._withUnsafeGuaranteedRef { $0.enter(ticket) } }
    var request: UnsafeMutablePointer<FileWorkRequest>? = head
    while let r = request {
        r.pointee.result = performBlocking(r)
        request = r.pointee.next
    }
    if ticket != 0 { head.pointee.turnstile._withUnsafeGuaranteedRef { $0.leave() } }
}

/// Runs lane batches that are on the pool at the same time one after another, in ticket order:
/// a batch's thread waits until every batch queued before it has finished. libuv's queue is FIFO,
/// so the batch being waited for has always been picked up already: no deadlock, whatever the
/// pool size. @unchecked Sendable: `serving` is only touched under the mutex.
final class LaneTurnstile: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let condition = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var serving: UInt64 = 1

    init() {
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(condition, nil)
    }

    deinit {
        pthread_cond_destroy(condition)
        pthread_mutex_destroy(mutex)
        condition.deallocate()
        mutex.deallocate()
    }

    func enter(_ ticket: UInt64) {
        pthread_mutex_lock(mutex)
        while serving != ticket { pthread_cond_wait(condition, mutex) }
        pthread_mutex_unlock(mutex)
    }

    func leave() {
        pthread_mutex_lock(mutex)
        serving += 1
        pthread_cond_broadcast(condition)
        pthread_mutex_unlock(mutex)
    }
}

private let onRingReadable: uv_poll_cb = { handle, _, _ in
    guard let owner = handle!.pointee.data else { return }
    let io = Unmanaged<FileIO>.fromOpaque(owner)
    // The release must happen outside the borrow: it may be the FileIO's last reference.
    if io._withUnsafeGuaranteedRef({ $0.reapRing() }) { io.release() }
}

private let onAfterWork: uv_after_work_cb = { work, status in
    let request = work!.pointee.data.assumingMemoryBound(to: FileWorkRequest.self)
    let owner = request.pointee.owner
    // The release must happen outside the borrow: it may be the FileIO's last reference.
    if owner._withUnsafeGuaranteedRef({ $0.didFinish(request, status: status) }) {
        owner.release()
    }
}

/// Runs on a pool thread. Returns the byte count, 0, the job's value, or -errno.
private func performBlocking(_ request: UnsafeMutablePointer<FileWorkRequest>) -> Int {
    let fd = request.pointee.fd
    let buffer = request.pointee.buffer
    let length = request.pointee.length
    let offset = request.pointee.offset
    switch request.pointee.operation {
    case .read:
        return SystemCall.readFully(fd, into: buffer!, count: length, at: offset)
    case .write:
        return SystemCall.writeFully(fd, from: buffer!, count: length, at: offset)
    case .writeDSync:
        let result = SystemCall.writeFully(fd, from: buffer!, count: length, at: offset, flags: IOFlags.dsync)
        guard result == -Int(EOPNOTSUPP) || result == -Int(EINVAL) else { return result }
        // A kernel or filesystem without RWF_DSYNC: the same guarantee, two steps.
        let plain = SystemCall.writeFully(fd, from: buffer!, count: length, at: offset)
        guard plain >= 0 else { return plain }
        let synced = SystemCall.dataSync(fd)
        return synced < 0 ? synced : plain
    case .fdatasync:
        return SystemCall.dataSync(fd)
    case .fallocate:
        return SystemCall.allocate(fd, mode: request.pointee.mode, offset: offset, length: UInt64(length))
    case .run:
        return request.pointee.job!()
    }
}

/// Positioned file I/O for one loop: inline when it cannot block, otherwise on libuv's thread pool.
public final class FileIO {
    private let loop: EventLoop
    // Stored properties are `@exclusivity(unchecked)`: Swift's dynamic exclusivity checks on class
    // properties cost about 80 instructions per access on the request path, and this loop-confined
    // class never modifies one of them while another access to it is open (completions run after
    // the bookkeeping is done).
    @exclusivity(unchecked) private var freeRequests: [UnsafeMutablePointer<FileWorkRequest>] = []
    @exclusivity(unchecked) private var inFlight = 0
    @exclusivity(unchecked) private var inlineReadsSupported = true
    @exclusivity(unchecked) private var inlineWritesSupported = true
    @exclusivity(unchecked) private var counters = (inlineReads: 0, pooledReads: 0, inlineWrites: 0, pooledWrites: 0)
    /// Lane requests waiting for the next batch, oldest first (chained through `next`), and their bytes.
    @exclusivity(unchecked) private var lane: (head: UnsafeMutablePointer<FileWorkRequest>?,
                                               tail: UnsafeMutablePointer<FileWorkRequest>?) = (nil, nil)
    @exclusivity(unchecked) private var laneBytes = 0
    /// Lane batches on the pool (running or waiting at the turnstile), and the next ticket.
    @exclusivity(unchecked) private var laneBatches = 0
    @exclusivity(unchecked) private var nextTicket: UInt64 = 1
    private let turnstile = LaneTurnstile()
    @exclusivity(unchecked) private var turnEndScheduled = false

    /// The io_uring backend's ring; nil on the thread pool backend (or after close()).
    @exclusivity(unchecked) private var ring: FileRing?
    /// Ring backend: whether ordered requests use the ring (see init) or the lane.
    @exclusivity(unchecked) private var ringWrites = false
    /// Ring backend: operations handed to the ring (retries included), for tests.
    @exclusivity(unchecked) private(set) var ringSubmissions = 0
    /// Ring backend: requests waiting for room in the ring, oldest first (chained through `next`).
    @exclusivity(unchecked) private var ringWaiting: (head: UnsafeMutablePointer<FileWorkRequest>?,
                                                      tail: UnsafeMutablePointer<FileWorkRequest>?) = (nil, nil)
    /// Ring backend: what the ordered requests running now change, and the ones waiting to run,
    /// oldest first (see RingOrderingGate).
    @exclusivity(unchecked) private var gate = RingOrderingGate()
    /// Ring backend: plain writes of this turn, to go to the kernel as chains at the turn's end.
    @exclusivity(unchecked) private var pendingWrites: (head: UnsafeMutablePointer<FileWorkRequest>?,
                                                        tail: UnsafeMutablePointer<FileWorkRequest>?) = (nil, nil)
    @exclusivity(unchecked) private var pendingWriteCount = 0
    /// Writes handed to the ring and writes waiting for this turn's chains, for tests.
    var ringWritesAccepted: Int { ringSubmissions + pendingWriteCount }
    @exclusivity(unchecked) private var orderingWaiting: (head: UnsafeMutablePointer<FileWorkRequest>?,
                                                          tail: UnsafeMutablePointer<FileWorkRequest>?) = (nil, nil)

    /// A lane batch stops growing at this many bytes; this much waiting is queued without waiting for
    /// the running batch.
    static let laneBatchBytes = 256 << 10
    /// Lane batches on the pool at once: each holds a pool thread, most of them waiting.
    static let maximumLaneBatches = 4

    /// Reads longer than this skip the inline attempt (a big copy on the loop delays every socket). 0 = never inline.
    @exclusivity(unchecked) public var inlineReadLimit = 1 << 20
    /// Same for writes. 0 = never inline.
    @exclusivity(unchecked) public var inlineWriteLimit = 1 << 20

    /// How many reads and writes finished inline and how many went to the pool.
    public var statistics: (inlineReads: Int, pooledReads: Int, inlineWrites: Int, pooledWrites: Int) {
        counters
    }

    /// False once the kernel said EOPNOTSUPP to a NOWAIT write (buffered ext4 does).
    public var triesInlineWrites: Bool { inlineWritesSupported }

    /// Which backend this FileIO uses.
    public var backend: FileIOBackend { ring == nil ? .threads : .ioUring }

    /// A FileIO on libuv's thread pool. The loop must outlive this FileIO and all of its queued work.
    public init(loop: EventLoop) {
        self.loop = loop
        freeRequests.reserveCapacity(64)
    }

    /// A FileIO on `backend`; `.ioUring` throws when the ring cannot be made. Call `close()` before
    /// closing the loop (the ring's poll handle is open until then).
    ///
    /// `ringWrites`: whether writes, fallocate and ordered jobs go through the ring too (ordered by
    /// RingOrderingGate, writes as chains) rather than the ordered lane on the pool. Off by default:
    /// on ext4, which has no non-blocking buffered writes, the kernel hands every ring write to an
    /// io-wq worker, and measured per write that costs more context switches, CPU and user-space
    /// instructions than the lane's one hand-off per batch (docs/ARCHITECTURE.md, "I/O backends").
    /// It is the path to use on a filesystem that completes buffered writes inline (XFS, btrfs).
    public convenience init(loop: EventLoop, backend: FileIOBackend, ringEntries: UInt32 = 128,
                            ringWrites: Bool = false) throws(FileRingUnavailable) {
        self.init(loop: loop)
        guard backend == .ioUring else { return }
        self.ringWrites = ringWrites
        ring = try FileRing(loop: loop, entries: ringEntries, owner: Unmanaged.passUnretained(self).toOpaque(),
                            onReadable: onRingReadable)
    }

    /// The FileIO a server wants: `backend` if given (io_uring may throw), otherwise io_uring when
    /// the kernel lets this process make a ring, else the thread pool, with the reason in `note`.
    public static func preferred(loop: EventLoop, backend: FileIOBackend?, ringEntries: UInt32 = 128)
        throws(FileRingUnavailable) -> (io: FileIO, note: String?) {
        if let backend { return (try FileIO(loop: loop, backend: backend, ringEntries: ringEntries), nil) }
        do {
            return (try FileIO(loop: loop, backend: .ioUring, ringEntries: ringEntries), nil)
        } catch {
            return (FileIO(loop: loop), "file I/O on the thread pool: io_uring is not available (\(error))")
        }
    }

    /// Releases the ring (a thread-pool FileIO has nothing to release) and runs the loop once without
    /// blocking so libuv finishes closing its poll handle; call it once the loop has stopped, before
    /// closing the loop. Nothing may be in flight. Later calls fall back to the thread pool.
    public func close() {
        guard let ring else { return }
        precondition(inFlight == 0, "FileIO closed with \(inFlight) operations in flight")
        ring.close()
        self.ring = nil
        loop.runNoWait()
    }

    deinit {
        // inFlight == 0 here: in-flight work keeps self alive.
        ring?.close()
        gate.deallocate()
        for request in freeRequests {
            request.pointee.uv.deallocate()
            request.deinitialize(count: 1)
            request.deallocate()
        }
    }

    /// Tries preadv2(RWF_NOWAIT) inline (page-cache hit, no blocking); if it returns EAGAIN or a short
    /// count, the remainder goes to the thread pool (a full pread loop) and `.queued` is returned.
    /// Bytes past end of file read as zeros. Inline is tried only for lengths <= inlineReadLimit.
    /// The buffer must stay valid until the result arrives.
    public func read(fd: Int32, into buffer: UnsafeMutableRawBufferPointer, offset: UInt64, context: UInt64,
                     completion: FileIOCompletion) -> FileIOOutcome {
        let length = buffer.count
        guard length > 0 else { return .done(0) }
        var done = 0
        if inlineReadsSupported && length <= inlineReadLimit {
            let n = SystemCall.readWithoutBlocking(fd, into: buffer.baseAddress!, count: length, at: offset)
            if n == length || n == 0 {
                // NOWAIT says "would block" with EAGAIN, so 0 is a real end of file.
                if n == 0 { buffer.initializeMemory(as: UInt8.self, repeating: 0) }
                counters.inlineReads += 1
                return .done(length)
            }
            if n > 0 { done = n }
            if n == -Int(EOPNOTSUPP) { inlineReadsSupported = false }
            // Short (partly cached), EAGAIN, EOPNOTSUPP, or a real error the pool will meet and report again.
        }
        counters.pooledReads += 1
        submit(.read, fd: fd, buffer: buffer.baseAddress! + done, length: length - done, offset: offset + UInt64(done),
               alreadyDone: done, context: context, completion: completion)
        return .queued
    }

    /// Tries pwritev2(RWF_NOWAIT) inline; on EAGAIN/EOPNOTSUPP/short, the rest goes to the ordered lane.
    /// If the kernel answers EOPNOTSUPP once, inline writes are not tried again on this FileIO.
    /// `dsync: true` = RWF_DSYNC / fdatasync semantics (FUA) and always goes to the pool.
    /// The buffer must stay valid until the result arrives.
    public func write(fd: Int32, from buffer: UnsafeRawBufferPointer, offset: UInt64, dsync: Bool, context: UInt64,
                      completion: FileIOCompletion) -> FileIOOutcome {
        let length = buffer.count
        guard length > 0 else { return .done(0) }
        let base = UnsafeMutableRawPointer(mutating: buffer.baseAddress!)
        var done = 0
        // Not while the lane is busy: an inline write would overtake the writes queued there. Not on
        // the ring either: the kernel makes the same non-blocking attempt during the turn's submit.
        if !(ring != nil && ringWrites) && !dsync && inlineWritesSupported && length <= inlineWriteLimit && lane.head == nil && laneBatches == 0 {
            let n = SystemCall.writeWithoutBlocking(fd, from: base, count: length, at: offset)
            if n == length {
                counters.inlineWrites += 1
                return .done(length)
            }
            if n > 0 { done = n }
            if n == -Int(EOPNOTSUPP) { inlineWritesSupported = false }
        }
        counters.pooledWrites += 1
        submit(dsync ? .writeDSync : .write, fd: fd, buffer: base + done, length: length - done,
               offset: offset + UInt64(done), alreadyDone: done, context: context, completion: completion,
               ordered: true)
        return .queued
    }

    /// fdatasync(2) on the pool; result 0 or -errno.
    public func fdatasync(fd: Int32, context: UInt64, completion: FileIOCompletion) {
        submit(.fdatasync, fd: fd, context: context, completion: completion)
    }

    /// fallocate(2) on the pool, in the ordered lane; `mode` is the raw FALLOC_FL_* bits (see
    /// FallocateMode). Result 0 or -errno.
    public func fallocate(fd: Int32, mode: Int32, offset: UInt64, length: UInt64, context: UInt64,
                          completion: FileIOCompletion) {
        submit(.fallocate, fd: fd, mode: mode, length: Int(length), offset: offset, context: context, completion: completion,
               ordered: true)
    }

    /// Runs arbitrary blocking work on the pool (e.g. lseek SEEK_DATA loops, ioctl BLKDISCARD);
    /// its return value is the result. The job must not touch loop-confined state. `ordered: true`
    /// puts it in the ordered lane (for jobs that change file contents, like zeroing): it runs after
    /// every write and ordered job submitted before it.
    public func run(context: UInt64, completion: FileIOCompletion, ordered: Bool = false,
                    work: @escaping @Sendable () -> Int) {
        submit(.run, context: context, completion: completion, job: work, ordered: ordered)
    }

    private func submit(_ operation: FileWorkRequest.Operation, fd: Int32 = -1, mode: Int32 = 0,
                        buffer: UnsafeMutableRawPointer? = nil, length: Int = 0, offset: UInt64 = 0,
                        alreadyDone: Int = 0, context: UInt64, completion: FileIOCompletion,
                        job: (@Sendable () -> Int)? = nil, ordered: Bool = false) {
        precondition(offset <= UInt64(Int64.max), "file offset \(offset) out of range")
        let request = freeRequests.popLast() ?? makeRequest()
        request.pointee.operation = operation
        request.pointee.fd = fd
        request.pointee.mode = mode
        request.pointee.buffer = buffer
        request.pointee.length = length
        request.pointee.offset = offset
        request.pointee.alreadyDone = alreadyDone
        request.pointee.result = 0
        request.pointee.context = context
        request.pointee.completion = completion
        request.pointee.job = job
        request.pointee.next = nil
        if inFlight == 0 { _ = Unmanaged.passRetained(self) }
        inFlight += 1
        if ring != nil && (!ordered || ringWrites) {
            // Order on the ring (see RingOrderingGate): an ordered request that overlaps a running
            // one waits, and everything ordered after it waits behind it.
            if ordered {
                request.pointee.changesStart = offset
                request.pointee.changesEnd = offset + UInt64(length)
                request.pointee.isBarrier = operation == .run
                if orderingWaiting.head == nil && admits(request) {
                    startOrdered(request)
                } else {
                    append(request, to: &orderingWaiting)
                }
            } else {
                dispatch(request)
            }
            return
        }
        if ordered {
            if let tail = lane.tail { tail.pointee.next = request } else { lane.head = request }
            lane.tail = request
            laneBytes += length
            scheduleLaneBatch()
        } else {
            queue(request)
        }
    }

    // MARK: - Ring backend

    private func append(_ request: UnsafeMutablePointer<FileWorkRequest>,
                        to list: inout (head: UnsafeMutablePointer<FileWorkRequest>?, tail: UnsafeMutablePointer<FileWorkRequest>?)) {
        if let tail = list.tail { tail.pointee.next = request } else { list.head = request }
        list.tail = request
    }

    private func popFirst(_ list: inout (head: UnsafeMutablePointer<FileWorkRequest>?,
                                         tail: UnsafeMutablePointer<FileWorkRequest>?)) -> UnsafeMutablePointer<FileWorkRequest>? {
        guard let head = list.head else { return nil }
        list.head = head.pointee.next
        if list.head == nil { list.tail = nil }
        head.pointee.next = nil
        return head
    }

    private func admits(_ request: UnsafeMutablePointer<FileWorkRequest>) -> Bool {
        gate.admits(start: request.pointee.changesStart, end: request.pointee.changesEnd, barrier: request.pointee.isBarrier)
    }

    private func startOrdered(_ request: UnsafeMutablePointer<FileWorkRequest>) {
        request.pointee.holdsGate = true
        gate.enter(start: request.pointee.changesStart, end: request.pointee.changesEnd, barrier: request.pointee.isBarrier)
        dispatch(request)
    }

    /// Takes a finished ordered request out of the gate and starts the waiting ones it was holding up.
    private func leaveOrdering(_ request: UnsafeMutablePointer<FileWorkRequest>) {
        request.pointee.holdsGate = false
        gate.leave(start: request.pointee.changesStart, end: request.pointee.changesEnd, barrier: request.pointee.isBarrier)
        while let head = orderingWaiting.head, admits(head) {
            startOrdered(popFirst(&orderingWaiting)!)
        }
    }

    /// To the ring if the kernel can do it there, otherwise to the pool (one request, no lane).
    private func dispatch(_ request: UnsafeMutablePointer<FileWorkRequest>) {
        let ring = ring!
        switch request.pointee.operation {
        case .read, .write, .writeDSync: break
        case .fdatasync where ring.supportsFsync: break
        case .fallocate where ring.supportsFallocate: break
        default:
            queue(request)
            return
        }
        start(request, on: ring)
    }

    /// Into the ring (plain writes: into this turn's chains), or to wait for room.
    private func start(_ request: UnsafeMutablePointer<FileWorkRequest>, on ring: FileRing) {
        if ring.inFlight + pendingWriteCount >= ring.capacity {
            append(request, to: &ringWaiting)
        } else if ring.canChain && request.pointee.operation == .write {
            append(request, to: &pendingWrites)
            pendingWriteCount += 1
            scheduleTurnEnd()
        } else {
            prepare(request, on: ring)
        }
    }

    private func scheduleTurnEnd() {
        if !turnEndScheduled {
            turnEndScheduled = true
            loop.runAtTurnEnd(self)
        }
    }

    /// Write chains. On a filesystem without non-blocking buffered writes (ext4), the kernel hands
    /// every ring write to an io-wq worker, and each completion would wake the loop: more wake-ups
    /// than the thread pool's lane, which does a turn's writes in one job. So a turn's writes go as
    /// chains of up to `longestChain` hard-linked entries (run one after another, like the lane's
    /// batch, failures not breaking the chain) in which only the last posts a completion when all
    /// goes well: one wake-up per chain. A member that fails or comes up short posts its own
    /// completion; it is kept until the chain's end (its record must stay in the chain), then
    /// retried or finished. Members never overlap (the ordering gate let all of them run at once).
    private func flushWriteChains(_ ring: FileRing) {
        while pendingWriteCount > 0 {
            let count = min(pendingWriteCount, ring.longestChain)
            ring.makeRoom(for: count)
            var first: UnsafeMutablePointer<FileWorkRequest>?
            var previous: UnsafeMutablePointer<FileWorkRequest>?
            for index in 0..<count {
                let request = popFirst(&pendingWrites)!
                pendingWriteCount -= 1
                let sqe = prepare(request, on: ring)
                guard count > 1 else { break }
                request.pointee.chained = true
                if let previous { previous.pointee.next = request } else { first = request }
                previous = request
                if index < count - 1 { qnbd_uring_link_silently(sqe) } else { request.pointee.chainFirst = first }
            }
        }
    }

    /// The last member's completion: every member that posted nothing succeeded in full.
    private func finishChain(from first: UnsafeMutablePointer<FileWorkRequest>, last: UnsafeMutablePointer<FileWorkRequest>,
                             lastResult: Int, ring: FileRing) {
        last.pointee.chainFirst = nil
        var silent = 0
        var member: UnsafeMutablePointer<FileWorkRequest>? = first
        while let m = member, m != last {
            if !m.pointee.chainReported { silent += 1 }
            member = m.pointee.next
        }
        ring.completedSilently(silent)
        member = first
        while let m = member {
            member = m.pointee.next
            m.pointee.next = nil
            m.pointee.chained = false
            if m == last {
                ringCompleted(m, result: lastResult, ring: ring)
            } else if m.pointee.chainReported {
                m.pointee.chainReported = false
                ringCompleted(m, result: m.pointee.result, ring: ring)
            } else {
                ringCompleted(m, result: m.pointee.length, ring: ring)
            }
        }
    }

    /// Writes the request's submission entry; the turn's end submits it with the rest.
    @discardableResult
    private func prepare(_ request: UnsafeMutablePointer<FileWorkRequest>, on ring: FileRing) -> UnsafeMutablePointer<io_uring_sqe> {
        let sqe = ring.nextEntry()
        ringSubmissions &+= 1
        let token = UInt64(UInt(bitPattern: request))
        let r = request.pointee
        // One operation moves at most 1 GiB (io_uring's length is 32-bit); the rest is a short transfer.
        let chunk = UInt32(min(r.length, 1 << 30))
        switch r.operation {
        case .read:
            qnbd_uring_prep_read(sqe, r.fd, r.buffer, chunk, r.offset, token)
        case .write, .writeDSync:
            qnbd_uring_prep_write(sqe, r.fd, r.buffer, chunk, r.offset, r.operation == .writeDSync ? 1 : 0, token)
        case .fdatasync:
            qnbd_uring_prep_fdatasync(sqe, r.fd, token)
        case .fallocate:
            qnbd_uring_prep_fallocate(sqe, r.fd, r.mode, r.offset, UInt64(r.length), token)
        case .run:
            preconditionFailure("a job cannot run on the ring")
        }
        scheduleTurnEnd()
        return sqe
    }

    /// Delivers every completion the ring holds, then fills the ring from the waiting requests.
    /// Returns true when the last in-flight request finished: the caller drops the self-reference.
    fileprivate func reapRing() -> Bool {
        guard let ring else { return false }
        let held = inFlight > 0
        ring.reap { token, result in
            ringCompleted(UnsafeMutablePointer(bitPattern: UInt(token))!, result: Int(result), ring: ring)
        }
        while ring.inFlight + pendingWriteCount < ring.capacity, let request = popFirst(&ringWaiting) {
            start(request, on: ring)
        }
        ring.updateReference()
        return held && inFlight == 0
    }

    /// One completion: a retry (EINTR, EAGAIN, a short transfer: the rest goes again, as
    /// SystemCall's loops do) or the request's result.
    private func ringCompleted(_ request: UnsafeMutablePointer<FileWorkRequest>, result: Int, ring: FileRing) {
        if request.pointee.chained {
            if let first = request.pointee.chainFirst {
                finishChain(from: first, last: request, lastResult: result, ring: ring)
            } else {
                request.pointee.result = result
                request.pointee.chainReported = true
            }
            return
        }
        let operation = request.pointee.operation
        if result == -Int(EINTR) || result == -Int(EAGAIN) {
            prepare(request, on: ring)
            return
        }
        var final = result
        switch operation {
        case .read, .write, .writeDSync:
            let length = request.pointee.length
            if result > 0 && result < length {
                request.pointee.buffer! += result
                request.pointee.offset += UInt64(result)
                request.pointee.length -= result
                request.pointee.alreadyDone += result
                prepare(request, on: ring)
                return
            }
            if operation == .writeDSync && (result == -Int(EOPNOTSUPP) || result == -Int(EINVAL)) {
                // No RWF_DSYNC here: the pool does it as a write and an fdatasync.
                queue(request)
                return
            }
            if result == 0 {
                if operation == .read {
                    // End of file: the rest reads as zeros.
                    request.pointee.buffer!.initializeMemory(as: UInt8.self, repeating: 0, count: length)
                    final = length
                } else {
                    final = -Int(EIO)   // no progress and no error: do not spin
                }
            }
            if final > 0 { final += request.pointee.alreadyDone }
        default:
            break
        }
        if request.pointee.holdsGate { leaveOrdering(request) }
        let context = request.pointee.context
        let completion = request.pointee.completion!
        recycle(request)
        completion.fileIOCompleted(context: context, result: final)
        inFlight -= 1
    }

    private func recycle(_ request: UnsafeMutablePointer<FileWorkRequest>) {
        request.pointee.completion = nil
        request.pointee.job = nil
        request.pointee.buffer = nil
        request.pointee.next = nil
        freeRequests.append(request)
    }

    // MARK: - Thread pool

    private func queue(_ head: UnsafeMutablePointer<FileWorkRequest>) {
        // uv_queue_work fails only for a nil work callback.
        precondition(uv_queue_work(loop.raw, head.pointee.uv, onWork, onAfterWork) == 0)
    }

    /// Whether waiting lane requests should go to the pool now: when nothing of the lane is there, or
    /// when a full batch waits (and the turnstile has room).
    private var laneBatchDue: Bool {
        lane.head != nil && (laneBatches == 0 || (laneBytes >= Self.laneBatchBytes && laneBatches < Self.maximumLaneBatches))
    }

    /// Sends the waiting lane requests at the end of this turn, if they are due (otherwise the end of
    /// a running batch brings them back here).
    private func scheduleLaneBatch() {
        guard !turnEndScheduled, laneBatchDue else { return }
        turnEndScheduled = true
        loop.runAtTurnEnd(self)
    }

    private func makeRequest() -> UnsafeMutablePointer<FileWorkRequest> {
        let work = UnsafeMutablePointer<uv_work_t>.allocate(capacity: 1)
        let request = UnsafeMutablePointer<FileWorkRequest>.allocate(capacity: 1)
        request.initialize(to: FileWorkRequest(uv: work, owner: .passUnretained(self), turnstile: .passUnretained(turnstile)))
        work.pointee.data = UnsafeMutableRawPointer(request)
        return request
    }

    /// Finishes a job (one request, or a lane batch in order). Returns true when the last in-flight
    /// request finished: the caller drops the self-reference.
    fileprivate func didFinish(_ head: UnsafeMutablePointer<FileWorkRequest>, status: Int32) -> Bool {
        if head.pointee.ticket != 0 {
            head.pointee.ticket = 0
            laneBatches -= 1
            scheduleLaneBatch()
        }
        var next: UnsafeMutablePointer<FileWorkRequest>? = head
        while let request = next {
            next = request.pointee.next
            let context = request.pointee.context
            let completion = request.pointee.completion!
            var result = status < 0 ? Int(status) : request.pointee.result
            if result >= 0 { result += request.pointee.alreadyDone }
            if request.pointee.holdsGate { leaveOrdering(request) }
            recycle(request)
            completion.fileIOCompleted(context: context, result: result)
            inFlight -= 1
        }
        return inFlight == 0
    }
}

extension FileIO: TurnEndTask {
    public func runAtTurnEnd() {
        if let ring { flushWriteChains(ring) }
        turnEndScheduled = false
        while laneBatchDue {
            // Up to laneBatchBytes from the front of the lane (at least one request).
            let head = lane.head!
            var last = head
            var bytes = head.pointee.length
            while let next = last.pointee.next, bytes + next.pointee.length <= Self.laneBatchBytes {
                last = next
                bytes += next.pointee.length
            }
            lane.head = last.pointee.next
            if lane.head == nil { lane.tail = nil }
            last.pointee.next = nil
            laneBytes -= bytes
            head.pointee.ticket = nextTicket
            nextTicket += 1
            laneBatches += 1
            queue(head)
        }
        if let ring {
            // The turn's entries go to the kernel in one call; what finished during it is delivered
            // now rather than after a wake-up. (The loop's task list holds self during this call.)
            ring.submit()
            if reapRing() { Unmanaged.passUnretained(self).release() }
        }
    }
}
