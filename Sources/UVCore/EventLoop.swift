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
//
// Turn-end tasks. `runAtTurnEnd` lets a loop object gather work during a loop
// turn and act once, just before the loop waits for I/O again: SocketStream
// sends every reply of a turn in one writev, FileIO hands a turn's writes to
// the thread pool as one job. One uv_prepare_t (created on first use, active
// only while tasks are waiting) runs them; tasks scheduled while they run are
// run in the same pass, so nothing gathered is left behind when the loop
// blocks. Prepare handles run after timers, pending callbacks and idle
// handles, just before the poll, so every phase that can produce work is
// covered. The handle is the loop's own: close() closes it.

import CLibUV
#if canImport(Glibc)
import Glibc
#endif

/// Work a loop object wants done once at the end of the current loop turn.
public protocol TurnEndTask: AnyObject {
    /// Called on the loop thread just before the loop next waits for I/O.
    func runAtTurnEnd()
}

private let onPrepare: uv_prepare_cb = { handle in
    Unmanaged<EventLoop>.fromOpaque(handle!.pointee.data)._withUnsafeGuaranteedRef { $0.runTurnEndTasks() }
}

/// A libuv event loop (never the default loop), confined to the thread that runs it.
public final class EventLoop {
    /// The libuv loop, for other UVCore types.
    let raw: UnsafeMutablePointer<uv_loop_t>
    private var isClosed = false
    // Unchecked exclusivity on the turn-end state: touched every turn, never re-entered (see FileIO).
    /// Runs the turn-end tasks; nil until the first one is scheduled.
    @exclusivity(unchecked) private var turnEnd: UnsafeMutablePointer<uv_prepare_t>?
    @exclusivity(unchecked) private var turnEndTasks: [any TurnEndTask] = []
    @exclusivity(unchecked) private var runningTasks: [any TurnEndTask] = []

    public init() throws(UVError) {
        raw = .allocate(capacity: 1)
        let rc = uv_loop_init(raw)
        if rc < 0 {
            raw.deallocate()
            throw UVError(code: rc)
        }
        // Lets handles find their EventLoop (see `owning`); unretained, as the loop outlives them.
        raw.pointee.data = Unmanaged.passUnretained(self).toOpaque()
    }

    deinit {
        if !isClosed {
            closeTurnEndHandle(finishingCloses: false)
            guard uv_loop_close(raw) == 0 else { return }   // leak on purpose, see above
        }
        raw.deallocate()
    }

    /// The EventLoop that owns `loop`.
    static func owning(_ loop: UnsafeMutablePointer<uv_loop_t>) -> EventLoop {
        Unmanaged<EventLoop>.fromOpaque(loop.pointee.data!).takeUnretainedValue()
    }

    /// Calls `task.runAtTurnEnd()` once, just before the loop next waits for I/O (or, if scheduled from
    /// a turn-end task, in the same pass). Schedule a task at most once per turn: keep a flag.
    public func runAtTurnEnd(_ task: any TurnEndTask) {
        if turnEndTasks.isEmpty {
            let handle: UnsafeMutablePointer<uv_prepare_t>
            if let existing = turnEnd {
                handle = existing
            } else {
                handle = .allocate(capacity: 1)
                precondition(uv_prepare_init(raw, handle) == 0)
                handle.pointee.data = Unmanaged.passUnretained(self).toOpaque()
                turnEnd = handle
            }
            // Starting an active handle is a no-op.
            uv_prepare_start(handle, onPrepare)
        }
        turnEndTasks.append(task)
    }

    fileprivate func runTurnEndTasks() {
        while !turnEndTasks.isEmpty {
            swap(&turnEndTasks, &runningTasks)
            for i in runningTasks.indices { runningTasks[i].runAtTurnEnd() }
            runningTasks.removeAll(keepingCapacity: true)
        }
        // Inactive until the next task, so an idle loop can still run dry and return.
        if let turnEnd { uv_prepare_stop(turnEnd) }
    }

    /// Closes the turn-end handle and lets libuv finish closing it (one non-blocking turn, which runs
    /// the closing phase), then frees it; a later `runAtTurnEnd` would make a new one.
    /// Closes the turn-end handle, then runs one non-blocking pass so that every handle whose close
    /// was requested since the loop last ran (the turn-end handle, a FileIO ring's poll handle closed
    /// after `run()` returned) gets its close callback and stops counting as open.
    /// Not from deinit (`finishingCloses: false`): a pass there could call into loop objects that are
    /// already gone.
    private func closeTurnEndHandle(finishingCloses: Bool = true) {
        if let handle = turnEnd, turnEndTasks.isEmpty, runningTasks.isEmpty {
            uv_close(UnsafeMutableRawPointer(handle).assumingMemoryBound(to: uv_handle_t.self), nil)
            uv_run(raw, UV_RUN_NOWAIT)
            handle.deallocate()
            turnEnd = nil
        } else if finishingCloses {
            uv_run(raw, UV_RUN_NOWAIT)
        }
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

    /// Releases the loop's resources. Handles already being closed finish closing here; fails with
    /// EBUSY while any handle is still open: close them and let the loop stop first.
    public func close() throws(UVError) {
        guard !isClosed else { return }
        // Waiting turn-end tasks mean the loop was stopped mid-work: busy, like an open handle.
        guard turnEndTasks.isEmpty else { throw UVError(code: UV_EBUSY.rawValue) }
        closeTurnEndHandle()
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
