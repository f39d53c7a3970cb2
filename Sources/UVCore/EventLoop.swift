// EventLoop: one uv_loop_t, owned by this object and run on one thread.
//
// Ownership: the loop struct is allocated here and freed in deinit, but only if
// uv_loop_close succeeded (explicitly through close() or in deinit). If handles
// are still open at deinit, the memory is deliberately leaked: freeing it would
// leave those handles pointing at garbage, which is worse than a leak.
// Handle objects borrow `raw` without retaining the EventLoop (FileIO keeps a
// reference because it queues work long after init), so the owner must keep
// the loop alive until all handles are closed and run() has returned.
//
// Threads: everything except Mailbox.post must be called on the thread that runs
// the loop. The loop is not Sendable, which keeps it on one thread by type.

import CLibUV
#if canImport(Glibc)
import Glibc
#endif

/// A libuv event loop (never the default loop), confined to the thread that runs it.
public final class EventLoop {
    /// The libuv loop, for other UVCore types.
    let raw: UnsafeMutablePointer<uv_loop_t>
    private var isClosed = false

    public init() throws(UVError) {
        raw = .allocate(capacity: 1)
        let rc = uv_loop_init(raw)
        if rc < 0 {
            raw.deallocate()
            throw UVError(code: rc)
        }
    }

    deinit {
        if !isClosed {
            guard uv_loop_close(raw) == 0 else { return }   // leak on purpose, see above
        }
        raw.deallocate()
    }

    /// Runs until no active, referenced handles or requests remain, or `stop()` is called.
    public func run() {
        uv_run(raw, UV_RUN_DEFAULT)
    }

    /// Runs one iteration, blocking for I/O if there is nothing ready. Returns true if more work remains.
    @discardableResult
    public func runOnce() -> Bool {
        uv_run(raw, UV_RUN_ONCE) != 0
    }

    /// Runs one iteration without blocking.
    public func runNoWait() {
        uv_run(raw, UV_RUN_NOWAIT)
    }

    /// Makes the current `run()` return after this iteration.
    public func stop() {
        uv_stop(raw)
    }

    /// The loop's cached time in milliseconds (updated at the start of each iteration).
    public var nowMilliseconds: UInt64 {
        uv_now(raw)
    }

    /// Refreshes the cached time; useful after a long callback.
    public func updateTime() {
        uv_update_time(raw)
    }

    /// Releases the loop's resources. Fails with EBUSY while any handle is open or its
    /// close callback has not run yet: run the loop until it stops first.
    public func close() throws(UVError) {
        guard !isClosed else { return }
        try check(uv_loop_close(raw))
        isClosed = true
    }

    /// Number of libuv's pool threads; libuv reads UV_THREADPOOL_SIZE once, at the first
    /// pool use in the process, so this only has an effect before any FileIO work is queued.
    public static func configureThreadPool(size: Int) {
        precondition(size > 0, "thread pool size must be positive")
        _ = setenv("UV_THREADPOOL_SIZE", String(size), 1)
    }
}
