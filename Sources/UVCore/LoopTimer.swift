// LoopTimer: a uv_timer_t running a closure on the loop thread.
//
// Ownership: `handle.data` holds one strong reference to the timer from init
// until its close callback, so a timer keeps running even if nobody else holds
// it, and it must be closed. The handler is dropped in the close callback,
// which breaks any cycle through a handler that captures the timer's owner.

import CLibUV

private let onTimer: uv_timer_cb = { handle in
    Unmanaged<LoopTimer>.fromOpaque(handle!.pointee.data)._withUnsafeGuaranteedRef { $0.fire() }
}

private let onClose: uv_close_cb = { handle in
    let timer = Unmanaged<LoopTimer>.fromOpaque(handle!.pointee.data).takeRetainedValue()
    timer.handler = nil
}

/// A one-shot or repeating timer, confined to its loop's thread. Close it when done.
public final class LoopTimer {
    private let handle: UnsafeMutablePointer<uv_timer_t>
    fileprivate var handler: (() -> Void)?

    public init(loop: EventLoop) {
        handle = .allocate(capacity: 1)
        precondition(uv_timer_init(loop.raw, handle) == 0)
        handle.pointee.data = Unmanaged.passRetained(self).toOpaque()
    }

    deinit {
        handle.deallocate()
    }

    private var rawHandle: UnsafeMutablePointer<uv_handle_t> {
        UnsafeMutableRawPointer(handle).assumingMemoryBound(to: uv_handle_t.self)
    }

    /// (Re)starts the timer; a running timer is restarted with the new handler.
    /// `repeatMilliseconds` 0 means fire once.
    public func start(afterMilliseconds: UInt64, repeatMilliseconds: UInt64 = 0, _ handler: @escaping () -> Void) {
        guard uv_is_closing(rawHandle) == 0 else { return }
        self.handler = handler
        precondition(uv_timer_start(handle, onTimer, afterMilliseconds, repeatMilliseconds) == 0)
    }

    /// Stops the timer; start() may be called again.
    public func stop() {
        uv_timer_stop(handle)
    }

    /// Stops and closes the timer. Idempotent.
    public func close() {
        guard uv_is_closing(rawHandle) == 0 else { return }
        uv_close(rawHandle, onClose)
    }

    /// Lets the loop's run() return even while this timer is active.
    public func unref() { uv_unref(rawHandle) }

    /// Undoes unref().
    public func ref() { uv_ref(rawHandle) }

    public var isActive: Bool { uv_is_active(rawHandle) != 0 }

    fileprivate func fire() {
        handler?()
    }
}
