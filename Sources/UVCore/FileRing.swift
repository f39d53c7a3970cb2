// FileRing: one io_uring, driven by the libuv loop it belongs to (FileIO's io_uring backend).
//
// Why. On the thread pool every write costs a hand-off: queue, wake a pool thread, let it run
// pwrite, post the result back through libuv's async handle, wake the loop. A ring needs no thread
// of ours: the loop thread writes submission entries into shared memory and one io_uring_enter per
// loop turn submits the turn's whole batch; the kernel finishes what it can during that call (a
// page-cache read or a buffered write usually completes inline) and hands the rest to its own
// workers.
//
// How completions reach the loop. The ring's fd is watched by a uv_poll handle: the kernel makes it
// readable while the completion queue holds entries, and epoll is level-triggered, so consuming the
// entries is all the "clearing" there is (no eventfd to read, no extra syscall). Right after each
// submit the completion queue is also read directly, so work that finished inline never waits for
// a wake-up. The poll handle is started once and stays active; it is referenced only while
// something is in flight, so an idle FileIO does not keep `uv_run` from returning.
//
// Limits. At most `capacity` operations (the completion queue's size) are in the kernel at once,
// so the completion queue can never overflow; FileIO queues the excess itself. A full submission
// queue is submitted on the spot.
//
// Ownership. FileIO owns its FileRing; the poll handle's `data` points at the FileIO, unretained
// (FileIO keeps itself alive while anything is in flight, and the handle only fires for work in
// flight). `close()` stops and closes the handle and releases the ring; the handle's memory is
// freed by its close callback, so the loop must run once more (FileIO.close does that).
//
// Nothing here is global: each loop's FileIO makes its own ring.

import CLibURing
import CLibUV
#if canImport(Glibc)
import Glibc
#endif

/// io_uring could not be set up (a kernel without it, or a seccomp profile or container refusing it).
public struct FileRingUnavailable: Error, CustomStringConvertible, Sendable {
    /// The errno io_uring_queue_init (or the probe) returned.
    public let errno: Int32
    public let description: String
}

final class FileRing {
    /// Submission entries; the completion queue has twice as many.
    static let defaultEntries: UInt32 = 128
    /// Completions copied out per reap pass.
    static let reapBatch = 64

    let ring: UnsafeMutablePointer<io_uring>
    private let poll: UnsafeMutableRawPointer
    /// Operations the kernel may hold at once (the completion queue's size).
    let capacity: Int
    let supportsFsync: Bool
    let supportsFallocate: Bool
    /// Whether writes can go as silent chains (IOSQE_CQE_SKIP_SUCCESS), and the longest chain (one
    /// chain must fit in one submit).
    let canChain: Bool
    let longestChain: Int
    /// Operations prepared (submitted or not) whose completion has not been reaped.
    @exclusivity(unchecked) var inFlight = 0
    /// Prepared entries not yet handed to the kernel.
    @exclusivity(unchecked) private(set) var unsubmitted = 0
    @exclusivity(unchecked) private var referenced = false
    @exclusivity(unchecked) private var isClosed = false
    private let tokens: UnsafeMutablePointer<UInt64>
    private let results: UnsafeMutablePointer<Int32>

    /// `owner` goes into the poll handle's data for `onReadable`.
    init(loop: EventLoop, entries: UInt32 = FileRing.defaultEntries, owner: UnsafeMutableRawPointer,
         onReadable: uv_poll_cb) throws(FileRingUnavailable) {
        ring = .allocate(capacity: 1)
        let rc = io_uring_queue_init(entries, ring, 0)
        guard rc == 0 else {
            ring.deallocate()
            throw FileRingUnavailable(errno: -rc, description: "io_uring_queue_init: \(String(cString: strerror(-rc)))")
        }
        let ops = qnbd_uring_supported_ops(ring)
        // IORING_OP_READ/WRITE arrived in 5.6; without them (or without a probe, 5.6 too) the ring is no use.
        guard ops >= 0, ops & 3 == 3 else {
            io_uring_queue_exit(ring)
            ring.deallocate()
            throw FileRingUnavailable(errno: ENOSYS, description: "the kernel's io_uring has no IORING_OP_READ/WRITE")
        }
        supportsFsync = ops & 4 != 0
        supportsFallocate = ops & 8 != 0
        capacity = Int(qnbd_uring_cq_entries(ring))
        canChain = qnbd_uring_can_skip_completions(ring) != 0
        longestChain = min(32, Int(qnbd_uring_sq_entries(ring)))
        poll = allocateHandle(uv_poll_t.self)
        let pollHandle = poll.assumingMemoryBound(to: uv_poll_t.self)
        let pollRC = uv_poll_init(loop.raw, pollHandle, qnbd_uring_fd(ring))
        guard pollRC == 0 else {
            poll.deallocate()
            io_uring_queue_exit(ring)
            ring.deallocate()
            throw FileRingUnavailable(errno: -pollRC, description: "uv_poll_init on the ring: \(UVError(code: pollRC))")
        }
        pollHandle.pointee.data = owner
        precondition(uv_poll_start(pollHandle, Int32(UV_READABLE.rawValue), onReadable) == 0)
        uv_unref(poll.asHandle)
        tokens = .allocate(capacity: Self.reapBatch)
        results = .allocate(capacity: Self.reapBatch)
    }

    deinit {
        close()
        tokens.deallocate()
        results.deallocate()
        ring.deallocate()
    }

    /// Stops watching and releases the ring. Nothing may be in flight.
    func close() {
        guard !isClosed else { return }
        precondition(inFlight == 0, "FileRing closed with \(inFlight) operations in flight")
        isClosed = true
        poll.assumingMemoryBound(to: uv_poll_t.self).pointee.data = nil
        // uv_close takes the fd out of epoll at once; the memory goes in the close callback.
        uv_close(poll.asHandle, onCloseFreeing)
        io_uring_queue_exit(ring)
    }

    /// A free submission entry, submitting the queued ones first if the queue is full. The caller
    /// must prepare it before doing anything else with the ring.
    func nextEntry() -> UnsafeMutablePointer<io_uring_sqe> {
        if let sqe = qnbd_uring_get_sqe(ring) { return take(sqe) }
        submit()
        guard let sqe = qnbd_uring_get_sqe(ring) else { preconditionFailure("io_uring submission queue still full after submitting") }
        return take(sqe)
    }

    private func take(_ sqe: UnsafeMutablePointer<io_uring_sqe>) -> UnsafeMutablePointer<io_uring_sqe> {
        unsubmitted += 1
        inFlight += 1
        return sqe
    }

    /// Submits first if fewer than `count` free entries remain, so a chain of `count` goes in one submit.
    func makeRoom(for count: Int) {
        if Int(qnbd_uring_sq_space(ring)) < count { submit() }
    }

    /// Entries that completed without posting a completion (the silent members of a chain).
    func completedSilently(_ count: Int) {
        inFlight -= count
    }

    /// Hands the prepared entries to the kernel (one io_uring_enter).
    func submit() {
        guard unsubmitted > 0 else { return }
        while true {
            let rc = io_uring_submit(ring)
            if rc >= 0 {
                unsubmitted -= Int(rc)
                if unsubmitted <= 0 { unsubmitted = 0; break }
                continue
            }
            if rc == -EINTR { continue }
            // EAGAIN/EBUSY: the kernel is short of memory for requests; the entries stay queued and
            // the next submit (after completions are reaped) tries again.
            if rc == -EAGAIN || rc == -EBUSY { break }
            preconditionFailure("io_uring_submit: \(String(cString: strerror(-rc)))")
        }
    }

    /// Calls `handle(token, result)` for every completion waiting now (no syscall).
    @inline(__always)
    func reap(_ handle: (UInt64, Int32) -> Void) {
        while true {
            let n = Int(qnbd_uring_reap(ring, tokens, results, UInt32(Self.reapBatch)))
            if n == 0 { break }
            inFlight -= n
            for i in 0..<n { handle(tokens[i], results[i]) }
            if n < Self.reapBatch { break }
        }
    }

    /// Keeps the loop running while operations are in the kernel, and lets it return when none are.
    func updateReference() {
        let wanted = inFlight > 0
        guard wanted != referenced, !isClosed else { return }
        referenced = wanted
        if wanted { uv_ref(poll.asHandle) } else { uv_unref(poll.asHandle) }
    }
}
