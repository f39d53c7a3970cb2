// Mailbox: hands messages from any thread to the loop thread.
//
// post() appends under a Mutex and wakes the loop with uv_async_send; the async
// callback swaps the whole queue out and calls the handler once per wake-up with
// every message in posting order (libuv coalesces wake-ups, so one call may
// carry many messages). The swap reuses two arrays, so steady traffic does not
// allocate once their capacity has grown.
//
// Why @unchecked Sendable: the queue and the closed flag are only touched under
// the Mutex; the handle, the handler and the spare array are only touched on the
// loop thread (init, the async callback, close). uv_async_send is called while
// holding the lock, and close() sets the flag under the same lock before
// uv_close, so no thread can send to a handle that is closing or freed.
//
// Ownership: a small non-generic AsyncHandle owns the uv_async_t (C callbacks
// cannot be generic) and holds one strong reference to itself via
// `handle.data` until its close callback; its `deliver` closure holds the
// Mailbox. Both are released when the close callback drops `deliver`.

import CLibUV
import Synchronization

private let onAsync: uv_async_cb = { handle in
    Unmanaged<AsyncHandle>.fromOpaque(handle!.pointee.data)._withUnsafeGuaranteedRef { $0.deliver?() }
}

private let onClose: uv_close_cb = { handle in
    let owner = Unmanaged<AsyncHandle>.fromOpaque(handle!.pointee.data).takeRetainedValue()
    owner.deliver = nil
}

/// The uv_async_t behind a Mailbox. Loop-confined except for `send`.
@usableFromInline
final class AsyncHandle {
    let handle: UnsafeMutablePointer<uv_async_t>
    @usableFromInline var deliver: (() -> Void)?

    @usableFromInline
    init(loop: EventLoop) throws(UVError) {
        handle = .allocate(capacity: 1)
        let rc = uv_async_init(loop.raw, handle, onAsync)
        if rc < 0 { throw UVError(code: rc) }   // not initialized: deinit just frees
        handle.pointee.data = Unmanaged.passRetained(self).toOpaque()
    }

    deinit {
        handle.deallocate()
    }

    var rawHandle: UnsafeMutablePointer<uv_handle_t> {
        UnsafeMutableRawPointer(handle).assumingMemoryBound(to: uv_handle_t.self)
    }

    func close() {
        guard uv_is_closing(rawHandle) == 0 else { return }
        uv_close(rawHandle, onClose)
    }

    /// Wakes the loop (coalesced by libuv). Any thread.
    @usableFromInline
    func send() {
        _ = uv_async_send(handle)
    }
}

/// Messages in, from any thread; batches out, on the loop thread.
///
/// The paths a request takes (`init`, which forms the drain closure, `post(draining:)` and `drain`) are
/// @inlinable so a caller's module specializes them for its Message: unspecialized, every array
/// operation looked up generic metadata (callgrind: ~20% of the proxy's cost per request).
public final class Mailbox<Message: Sendable>: @unchecked Sendable {
    @usableFromInline
    struct Queue {
        @usableFromInline var messages: [Message] = []
        @usableFromInline var closed = false
        @inlinable init() {}
    }

    @usableFromInline let queue: Mutex<Queue>
    @usableFromInline let async: AsyncHandle
    @usableFromInline let handler: ([Message]) -> Void
    @usableFromInline var spare: [Message]

    /// `handler` runs on the loop thread with the messages in posting order.
    @inlinable
    public init(loop: EventLoop, _ handler: @escaping ([Message]) -> Void) throws(UVError) {
        self.handler = handler
        queue = Mutex(Queue())
        spare = []
        async = try AsyncHandle(loop: loop)
        async.deliver = { [self] in self.drain() }
    }

    /// Queues a message and wakes the loop. Any thread. Messages posted after close() are dropped.
    public func post(_ message: Message) {
        let async = async
        queue.withLock { queue in
            guard !queue.closed else { return }
            queue.messages.append(message)
            async.send()
        }
    }

    /// Queues every message of `messages` (in order) with one lock and one wake-up, and empties it,
    /// keeping its capacity: for senders that gather a loop turn's messages. Any thread.
    @inlinable
    public func post(draining messages: inout [Message]) {
        guard !messages.isEmpty else { return }
        let async = async
        queue.withLock { queue in
            guard !queue.closed else { return }
            if queue.messages.isEmpty {
                swap(&queue.messages, &messages)   // the common case: no copy at all
            } else {
                queue.messages.append(contentsOf: messages)
                messages.removeAll(keepingCapacity: true)
            }
            async.send()
        }
        messages.removeAll(keepingCapacity: true)
    }

    /// Stops delivery and closes the handle; messages not yet delivered are dropped. Loop thread.
    public func close() {
        queue.withLock { $0.closed = true }
        async.close()
    }

    @inlinable
    func drain() {
        // Move (not copy) the spare out, so the queue gets storage nobody else shares.
        var batch: [Message] = []
        swap(&batch, &spare)
        queue.withLock { swap(&$0.messages, &batch) }
        guard !batch.isEmpty else { spare = batch; return }
        handler(batch)
        batch.removeAll(keepingCapacity: true)
        spare = batch
    }
}
