// SignalWatcher: a uv_signal_t delivering a Unix signal on the loop thread.
//
// libuv catches the signal with its own process-wide handler and forwards it
// through a pipe, so the Swift handler runs as an ordinary loop callback and
// may do anything. Ownership follows LoopTimer: `handle.data` holds one strong
// reference from a successful init until the close callback; the handler is
// dropped there. If uv_signal_start fails in init, the handle is closed and the
// error thrown; run the loop once so that close callback can happen.

import CLibUV

private let onSignal: uv_signal_cb = { handle, signal in
    Unmanaged<SignalWatcher>.fromOpaque(handle!.pointee.data)._withUnsafeGuaranteedRef { $0.handler?(signal) }
}

private let onClose: uv_close_cb = { handle in
    let watcher = Unmanaged<SignalWatcher>.fromOpaque(handle!.pointee.data).takeRetainedValue()
    watcher.handler = nil
}

/// Watches one signal number until closed. Close it when done.
public final class SignalWatcher {
    private let handle: UnsafeMutablePointer<uv_signal_t>
    fileprivate var handler: ((Int32) -> Void)?

    public init(loop: EventLoop, signal: Int32, _ handler: @escaping (Int32) -> Void) throws(UVError) {
        handle = .allocate(capacity: 1)
        self.handler = handler
        let rc = uv_signal_init(loop.raw, handle)
        if rc < 0 {
            // Not initialized, so nothing for libuv to close; deinit frees the memory.
            throw UVError(code: rc)
        }
        handle.pointee.data = Unmanaged.passRetained(self).toOpaque()
        let started = uv_signal_start(handle, onSignal, signal)
        if started < 0 {
            close()
            throw UVError(code: started)
        }
    }

    deinit {
        handle.deallocate()
    }

    private var rawHandle: UnsafeMutablePointer<uv_handle_t> {
        UnsafeMutableRawPointer(handle).assumingMemoryBound(to: uv_handle_t.self)
    }

    /// Stops watching and closes the handle; libuv restores the default disposition
    /// when no watcher for the signal remains. Idempotent.
    public func close() {
        guard uv_is_closing(rawHandle) == 0 else { return }
        uv_close(rawHandle, onClose)
    }

    /// Lets the loop's run() return even while this watcher is active.
    public func unref() { uv_unref(rawHandle) }

    /// Undoes unref().
    public func ref() { uv_ref(rawHandle) }
}
