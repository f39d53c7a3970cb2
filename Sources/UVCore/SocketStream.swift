// SocketStream: one connected TCP or unix-socket stream.
//
// Ownership. The handle memory (a uv_tcp_t or uv_pipe_t) belongs to this object
// and is freed in deinit. From init until the close callback, `handle.data`
// holds one strong reference to the stream, so the stream outlives every libuv
// callback that can name it. The stream holds its delegate strongly until
// `streamDidClose` has been delivered and then drops it: the cycle
// connection -> stream -> connection is broken by closing, never by luck.
// (A strong reference costs a retain per callback but makes a forgotten owner
// a leak rather than a use-after-free; close() is mandatory anyway.)
//
// Writes. `write` tries uv_try_write first, so the common small reply is a
// single writev with no request at all. Only an unwritten tail is queued with
// uv_write, using uv_write_t requests from this stream's free list. libuv copies
// the uv_buf_t array into the request, but its inline copy holds only four
// buffers and it mallocs for more, so a longer tail is split into chunks of
// four, each its own request; only the last one reports to the delegate (or the
// first failing one does, and the last then stays quiet). libuv runs queued
// requests in order and refuses uv_try_write while any are queued, so byte
// order across calls is preserved. All write and shutdown callbacks (with
// ECANCELED if need be) run before the close callback.
//
// Coalescing (`coalesceWrites()`). A server that answers many pipelined
// requests in one loop turn would pay one writev per reply. In coalescing
// mode `write` only gathers the buffers and returns `.pending`; at the end of
// the loop turn (EventLoop.runAtTurnEnd) everything gathered goes out in one
// uv_try_write, and each call is reported through didFinishWrite, in order.
// An unwritten tail is queued as one uv_write for the whole batch (libuv
// mallocs its copy of more than four buffers; that happens only when the
// socket is full, once per batch). Batches complete in order, so their
// contexts wait in one FIFO and the batch's request carries only a count.

import CLibUV
#if canImport(Glibc)
import Glibc
#endif

/// Receives everything a `SocketStream` reports. All calls arrive on the loop thread.
public protocol SocketStreamDelegate: AnyObject {
    /// libuv asks where to put the next bytes. Return a non-empty buffer; it must stay valid until didRead.
    func streamWantsReadBuffer(_ stream: SocketStream) -> UnsafeMutableRawBufferPointer
    /// `count` bytes (> 0) landed at the start of the buffer last handed out.
    func stream(_ stream: SocketStream, didRead count: Int)
    /// The peer closed (error == .eof) or the read failed. The stream stops reading; the owner decides to close.
    func stream(_ stream: SocketStream, didFailReadingWith error: UVError)
    /// A write that `write` reported as `.pending` finished (error nil) or failed; `context` is what was passed.
    func stream(_ stream: SocketStream, didFinishWrite context: UInt64, error: UVError?)
    /// The handle is closed; no more callbacks after this one.
    func streamDidClose(_ stream: SocketStream)
}

/// What became of a `SocketStream.write` call.
public enum WriteOutcome {
    /// Every byte was handed to the kernel; no delegate call follows.
    case completed
    /// Some bytes are queued; `didFinishWrite` will report the end. Keep the bytes alive until then.
    case pending
    /// Nothing more will be written for this call; no delegate call follows.
    case failed(UVError)
}

/// One queued uv_write_t plus the bookkeeping that maps it back to a `write` call.
struct WriteRequest {
    var uv = uv_write_t()
    /// The caller's context; meaningful on the last request of a call.
    var context: UInt64 = 0
    /// For every request but the last of a call: that last request.
    var last: UnsafeMutablePointer<WriteRequest>? = nil
    /// On the last request: the error an earlier chunk already reported, or 0.
    var reportedError: Int32 = 0
    /// For a coalesced batch: how many contexts (at the head of the stream's FIFO) it completes.
    var batchContexts = 0
}

/// A coalesced write call that finished, waiting to be reported.
struct FinishedWrite {
    var context: UInt64
    /// 0 or a negative libuv error.
    var status: Int32
}

/// Gathered bytes beyond which a coalescing stream writes at once instead of at the turn's end.
private let eagerFlushBytes = 64 << 10

/// libuv's inline uv_buf_t copy in uv_write_t (`bufsml[4]`); more buffers would make it malloc.
private let buffersPerRequest = 4

private let onAlloc: uv_alloc_cb = { handle, _, buf in
    SocketStream.borrow(handle!) { stream in
        let bytes = stream.delegate?.streamWantsReadBuffer(stream) ?? UnsafeMutableRawBufferPointer(start: nil, count: 0)
        buf!.pointee = uv_buf_t(base: bytes.baseAddress?.assumingMemoryBound(to: CChar.self), len: bytes.count)
    }
}

private let onRead: uv_read_cb = { handle, nread, _ in
    SocketStream.borrow(handle!) { $0.didRead(nread) }
}

private let onWrite: uv_write_cb = { req, status in
    let request = req!.pointee.data.assumingMemoryBound(to: WriteRequest.self)
    SocketStream.borrow(req!.pointee.handle!) { $0.didWrite(request, status: status) }
}

private let onShutdown: uv_shutdown_cb = { req, _ in
    // Whether the shutdown worked or not, the stream is done.
    SocketStream.borrow(req!.pointee.handle!) { $0.close() }
}

private let onClose: uv_close_cb = { handle in
    let stream = Unmanaged<SocketStream>.fromOpaque(handle!.pointee.data).takeRetainedValue()
    stream.didClose()
}

/// A connected TCP or unix-socket stream, confined to its loop's thread.
public final class SocketStream {
    enum Kind { case tcp, pipe }

    // Unchecked exclusivity on the per-request properties: see FileIO.
    /// Receives reads, write completions and the close. Held strongly until `streamDidClose`.
    @exclusivity(unchecked) public var delegate: (any SocketStreamDelegate)?
    /// "127.0.0.1:5555", "[::1]:5555" or "unix".
    public let peerDescription: String

    let kind: Kind
    private let memory: UnsafeMutableRawPointer
    @exclusivity(unchecked) private var freeWriteRequests: [UnsafeMutablePointer<WriteRequest>] = []
    private var shutdownRequest: UnsafeMutablePointer<uv_shutdown_t>?

    // Coalescing state (see the file comment).
    @exclusivity(unchecked) private var coalescing = false
    /// Buffers gathered this turn, and their byte count.
    @exclusivity(unchecked) private var gathered = UnsafeList<uv_buf_t>(capacity: 64)
    @exclusivity(unchecked) private var gatheredBytes = 0
    /// Contexts of the write calls gathered this turn, in order.
    @exclusivity(unchecked) private var gatheredContexts = UnsafeList<UInt64>(capacity: 32)
    /// Contexts of flushed batches still queued in libuv; the live part starts at queuedHead.
    @exclusivity(unchecked) private var queuedContexts = UnsafeList<UInt64>(capacity: 32)
    @exclusivity(unchecked) private var queuedHead = 0
    /// Finished calls not yet reported; the live part starts at finishedHead. Reports go out from
    /// one non-reentrant drain, so a delegate that writes, flushes or shuts down from inside its
    /// didFinishWrite only adds to this FIFO.
    @exclusivity(unchecked) private var finished = UnsafeList<FinishedWrite>(capacity: 32)
    @exclusivity(unchecked) private var finishedHead = 0
    @exclusivity(unchecked) private var draining = false
    @exclusivity(unchecked) private var flushScheduled = false
    /// Bytes the kernel took directly plus bytes handed to uv_write; see `bytesWritten`.
    @exclusivity(unchecked) private var bytesAccepted: UInt64 = 0

    /// Accepts one pending connection from `server`. On failure the fresh handle is
    /// closed and freed by libuv's close callback; no SocketStream exists.
    convenience init(acceptingFrom server: UnsafeMutablePointer<uv_stream_t>, kind: Kind) throws(UVError) {
        let memory = Self.allocate(kind, on: server.pointee.loop)
        let rc = uv_accept(server, memory.asStream)
        if rc < 0 {
            closeAndFree(memory)
            throw UVError(code: rc)
        }
        self.init(connected: memory, kind: kind)
    }

    /// Takes over a connected socket another loop handed over (see `handOver()`); on failure the fd is
    /// closed.
    public convenience init(adopting socket: HandedOverSocket, loop: EventLoop) throws(UVError) {
        let memory = Self.allocate(socket.kind, on: loop.raw)
        let rc = socket.kind == .tcp ? uv_tcp_open(memory.asTCP, socket.fd) : uv_pipe_open(memory.asPipe, socket.fd)
        if rc < 0 {
            Glibc.close(socket.fd)
            closeAndFree(memory)
            throw UVError(code: rc)
        }
        self.init(connected: memory, kind: socket.kind)
    }

    private static func allocate(_ kind: Kind, on loop: UnsafeMutablePointer<uv_loop_t>) -> UnsafeMutableRawPointer {
        switch kind {
        case .tcp:
            let memory = allocateHandle(uv_tcp_t.self)
            precondition(uv_tcp_init(loop, memory.asTCP) == 0)
            return memory
        case .pipe:
            let memory = allocateHandle(uv_pipe_t.self)
            precondition(uv_pipe_init(loop, memory.asPipe, 0) == 0)
            return memory
        }
    }

    private init(connected memory: UnsafeMutableRawPointer, kind: Kind) {
        switch kind {
        case .tcp:
            var storage = sockaddr_storage()
            var length = Int32(MemoryLayout<sockaddr_storage>.size)
            let ok = withUnsafeMutablePointer(to: &storage) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { uv_tcp_getpeername(memory.asTCP, $0, &length) }
            } == 0
            peerDescription = ok ? describeSocketAddress(&storage) : "unknown"
        case .pipe:
            peerDescription = "unix"
        }
        self.kind = kind
        self.memory = memory
        freeWriteRequests.reserveCapacity(8)
        memory.asHandle.pointee.data = Unmanaged.passRetained(self).toOpaque()
    }

    /// Gives the connected socket to another loop: a duplicate of its fd comes back (socket options
    /// such as TCP_NODELAY go with it) and this stream closes. Only before any read or write, and with
    /// no delegate set. Nil if the fd cannot be duplicated (the stream is closed either way).
    public func handOver() -> HandedOverSocket? {
        precondition(delegate == nil && bytesAccepted == 0, "a stream is handed over before it is used")
        var fd: uv_os_fd_t = -1
        var copy: Int32 = -1
        if uv_fileno(handle, &fd) == 0 { copy = fcntl(fd, F_DUPFD_CLOEXEC, 0) }
        close()
        return copy >= 0 ? HandedOverSocket(fd: copy, kind: kind, peerDescription: peerDescription) : nil
    }

    deinit {
        for request in freeWriteRequests {
            request.deinitialize(count: 1)
            request.deallocate()
        }
        shutdownRequest?.deallocate()
        gathered.deallocate()
        gatheredContexts.deallocate()
        queuedContexts.deallocate()
        finished.deallocate()
        memory.deallocate()
    }

    @inline(__always)
    static func borrow<H, R>(_ handle: UnsafeMutablePointer<H>, _ body: (SocketStream) -> R) -> R {
        let data = UnsafeMutableRawPointer(handle).assumingMemoryBound(to: uv_handle_t.self).pointee.data!
        return Unmanaged<SocketStream>.fromOpaque(data)._withUnsafeGuaranteedRef(body)
    }

    /// The loop this stream belongs to (for wrappers that schedule turn-end work, such as TLSStream).
    public var eventLoop: EventLoop { EventLoop.owning(stream.pointee.loop) }

    private var handle: UnsafeMutablePointer<uv_handle_t> { memory.asHandle }
    private var stream: UnsafeMutablePointer<uv_stream_t> { memory.asStream }

    // MARK: Reading

    /// Starts delivering reads. Does nothing if already reading or closing.
    public func startReading() {
        guard uv_is_closing(handle) == 0 else { return }
        _ = uv_read_start(stream, onAlloc, onRead)
    }

    /// Stops delivering reads (back-pressure). Safe to call at any time.
    public func stopReading() {
        guard uv_is_closing(handle) == 0 else { return }
        _ = uv_read_stop(stream)
    }

    fileprivate func didRead(_ nread: Int) {
        if nread > 0 {
            delegate?.stream(self, didRead: nread)
        } else if nread < 0 {
            uv_read_stop(stream)
            delegate?.stream(self, didFailReadingWith: UVError(code: Int32(truncatingIfNeeded: nread)))
        }
        // nread == 0 is EAGAIN: the buffer was not used and nothing happened.
    }

    // MARK: Writing

    /// From now on, writes are gathered and sent together at the end of each loop turn (see the file
    /// comment): `write` returns `.pending` (or `.failed` once closing) and every call is reported
    /// through didFinishWrite.
    public func coalesceWrites() {
        coalescing = true
    }

    /// Writes the buffers in order (when coalescing, see `coalesceWrites`: gathers them and returns
    /// `.pending`). First tries uv_try_write; if everything went out, returns .completed
    /// synchronously (no delegate call). Otherwise the rest is queued with uv_write using a pooled
    /// uv_write_t and `.pending` is returned; the delegate's didFinishWrite(context) fires later.
    /// The caller keeps the bytes alive until completed/didFinishWrite. Order across calls is preserved.
    /// Up to 16 buffers per call without heap allocation (more work, through a heap scratch array).
    public func write(_ buffers: UnsafeBufferPointer<UnsafeRawBufferPointer>, context: UInt64) -> WriteOutcome {
        guard uv_is_closing(handle) == 0 else { return .failed(.canceled) }
        if coalescing { return gather(buffers, context: context) }
        return withUnsafeTemporaryAllocation(of: uv_buf_t.self, capacity: max(buffers.count, 1)) { bufs in
            var count = 0
            var total = 0
            for buffer in buffers where buffer.count > 0 {
                bufs[count] = uv_buf_t(base: UnsafeMutablePointer(mutating: buffer.baseAddress!.assumingMemoryBound(to: CChar.self)),
                                       len: buffer.count)
                count += 1
                total += buffer.count
            }
            if total == 0 { return .completed }

            let written = uv_try_write(stream, bufs.baseAddress, UInt32(count))
            if written < 0 && written != UV_EAGAIN.rawValue {
                return .failed(UVError(code: written))
            }
            let skip = Int(max(written, 0))
            bytesAccepted &+= UInt64(skip)
            if skip == total { return .completed }

            let first = Self.dropWritten(skip, from: bufs)
            return queue(UnsafeMutableBufferPointer(rebasing: bufs[first..<count]), context: context)
        }
    }

    /// Drops the `written` bytes the kernel took from the front of `bufs` (less than their total): whole
    /// buffers, then the head of a partial one. Returns the index of the first buffer with bytes left.
    private static func dropWritten(_ written: Int, from bufs: UnsafeMutableBufferPointer<uv_buf_t>) -> Int {
        var skip = written
        var first = 0
        while skip >= bufs[first].len {
            skip -= bufs[first].len
            first += 1
        }
        bufs[first].base += skip
        bufs[first].len -= skip
        return first
    }

    private func gather(_ buffers: UnsafeBufferPointer<UnsafeRawBufferPointer>, context: UInt64) -> WriteOutcome {
        for buffer in buffers where buffer.count > 0 {
            gathered.append(uv_buf_t(base: UnsafeMutablePointer(mutating: buffer.baseAddress!.assumingMemoryBound(to: CChar.self)),
                                     len: buffer.count))
            gatheredBytes += buffer.count
        }
        gatheredContexts.append(context)
        // Big replies go at once: waiting for the turn's end would hold back the first megabyte until
        // the last read of the turn is done, and a syscall is cheap next to copying that much.
        if gatheredBytes >= eagerFlushBytes { flushGathered() }
        if !flushScheduled {
            flushScheduled = true
            EventLoop.owning(stream.pointee.loop).runAtTurnEnd(self)
        }
        return .pending
    }

    /// Sends everything gathered: one uv_try_write, the rest (if any) queued as one uv_write.
    /// Calls that finished here are only recorded; `drainFinished` reports them.
    private func flushGathered() {
        guard !gatheredContexts.isEmpty, uv_is_closing(handle) == 0 else { return }
        let bufs = gathered.buffer
        let total = gatheredBytes
        gathered.removeAll()
        gatheredBytes = 0
        var status: Int32 = 0
        if total > 0 {
            let written = uv_try_write(stream, bufs.baseAddress, UInt32(bufs.count))
            if written < 0 && written != UV_EAGAIN.rawValue {
                status = written
            } else if Int(max(written, 0)) < total {
                bytesAccepted &+= UInt64(max(written, 0))
                let first = Self.dropWritten(Int(max(written, 0)), from: bufs)
                let request = takeWriteRequest()
                request.pointee.batchContexts = gatheredContexts.count
                // libuv copies the uv_buf_t array, so `gathered` may be reused at once.
                let rc = uv_write(&request.pointee.uv, stream, bufs.baseAddress! + first, UInt32(bufs.count - first), onWrite)
                if rc == 0 {
                    bytesAccepted &+= UInt64(total - Int(max(written, 0)))
                    queuedContexts.append(contentsOf: gatheredContexts)
                    gatheredContexts.removeAll()
                    return
                }
                recycle(request)
                status = rc
            } else {
                bytesAccepted &+= UInt64(total)
            }
        }
        for i in 0..<gatheredContexts.count {
            finished.append(FinishedWrite(context: gatheredContexts[i], status: status))
        }
        gatheredContexts.removeAll()
    }

    /// A queued batch finished: its contexts are the next `count` in the FIFO.
    private func didWriteBatch(count: Int, status: Int32) {
        for _ in 0..<count {
            finished.append(FinishedWrite(context: queuedContexts[queuedHead], status: status))
            queuedHead += 1
        }
        if queuedHead == queuedContexts.count {
            queuedContexts.removeAll()
            queuedHead = 0
        }
        drainFinished()
    }

    /// Reports finished calls in order. Not reentrant: a nested call returns at once and the
    /// outer loop picks up what was added meanwhile.
    private func drainFinished() {
        guard !draining else { return }
        draining = true
        while finishedHead < finished.count {
            let done = finished[finishedHead]
            finishedHead += 1
            delegate?.stream(self, didFinishWrite: done.context, error: done.status < 0 ? UVError(code: done.status) : nil)
        }
        finished.removeAll()
        finishedHead = 0
        draining = false
    }

    private func queue(_ bufs: UnsafeMutableBufferPointer<uv_buf_t>, context: UInt64) -> WriteOutcome {
        for buf in bufs { bytesAccepted &+= UInt64(buf.len) }
        let chunks = (bufs.count + buffersPerRequest - 1) / buffersPerRequest
        let last = takeWriteRequest()
        last.pointee.context = context
        for chunk in 0..<chunks {
            let start = chunk * buffersPerRequest
            let end = min(start + buffersPerRequest, bufs.count)
            let request = chunk == chunks - 1 ? last : takeWriteRequest()
            if request != last { request.pointee.last = last }
            let rc = uv_write(&request.pointee.uv, stream, bufs.baseAddress! + start, UInt32(end - start), onWrite)
            if rc < 0 {
                // Chunks of one call go to the same stream back to back: what fails, fails first.
                precondition(chunk == 0, "uv_write failed after an earlier chunk was queued: \(UVError(code: rc))")
                if request != last { recycle(request) }
                recycle(last)
                for buf in bufs { bytesAccepted &-= UInt64(buf.len) }
                return .failed(UVError(code: rc))
            }
        }
        return .pending
    }

    private func takeWriteRequest() -> UnsafeMutablePointer<WriteRequest> {
        if let request = freeWriteRequests.popLast() { return request }
        let request = UnsafeMutablePointer<WriteRequest>.allocate(capacity: 1)
        request.initialize(to: WriteRequest())
        request.pointee.uv.data = UnsafeMutableRawPointer(request)
        return request
    }

    private func recycle(_ request: UnsafeMutablePointer<WriteRequest>) {
        request.pointee.context = 0
        request.pointee.last = nil
        request.pointee.reportedError = 0
        request.pointee.batchContexts = 0
        freeWriteRequests.append(request)
    }

    fileprivate func didWrite(_ request: UnsafeMutablePointer<WriteRequest>, status: Int32) {
        let batch = request.pointee.batchContexts
        if batch > 0 {
            recycle(request)
            didWriteBatch(count: batch, status: status)
        } else if let last = request.pointee.last {
            recycle(request)
            // `last` is still queued behind us, so it is alive; it stays quiet once we report.
            if status < 0 && last.pointee.reportedError == 0 {
                last.pointee.reportedError = status
                delegate?.stream(self, didFinishWrite: last.pointee.context, error: UVError(code: status))
            }
        } else {
            let context = request.pointee.context
            let alreadyReported = request.pointee.reportedError != 0
            recycle(request)
            if !alreadyReported {
                delegate?.stream(self, didFinishWrite: context, error: status < 0 ? UVError(code: status) : nil)
            }
        }
    }

    /// Bytes queued in libuv (uv_stream_get_write_queue_size) or gathered, and not yet written.
    public var pendingWriteBytes: Int {
        Int(uv_stream_get_write_queue_size(stream)) + gatheredBytes
    }

    /// How many bytes the kernel has taken from this stream so far (wrapping). It moves whenever the
    /// peer drains anything, even part of a queued write, so an owner can tell a slow reader from one
    /// that stopped reading by sampling it.
    public var bytesWritten: UInt64 {
        bytesAccepted &- UInt64(uv_stream_get_write_queue_size(stream))
    }

    // MARK: Options and closing

    /// Sets TCP_NODELAY. Does nothing for unix sockets.
    public func setNoDelay(_ on: Bool) {
        guard kind == .tcp, uv_is_closing(handle) == 0 else { return }
        _ = uv_tcp_nodelay(memory.asTCP, on ? 1 : 0)
    }

    /// Raises a unix socket's send buffer to at least `bytes` (the kernel caps it at net.core.wmem_max
    /// and doubles it). A unix stream socket's send buffer is all the room the peer's unread data has:
    /// with the default (~208 KiB) a 1 MiB reply needs five or six writes, each after an epoll wake-up.
    /// TCP is left alone: setting SO_SNDBUF there would switch off the kernel's autotuning.
    public func enlargeUnixSendBuffer(toAtLeast bytes: Int) {
        guard kind == .pipe, uv_is_closing(handle) == 0 else { return }
        var current: Int32 = 0
        guard uv_send_buffer_size(handle, &current) == 0, Int(current) < bytes else { return }
        var wanted = Int32(clamping: bytes)
        _ = uv_send_buffer_size(handle, &wanted)
    }

    /// Lets queued writes drain, shuts down the sending side, then closes.
    public func shutdownAndClose() {
        // Gathered writes go first: uv_shutdown waits only for what libuv has queued.
        flushGathered()
        if uv_is_closing(handle) == 0 && shutdownRequest == nil {
            let request = UnsafeMutablePointer<uv_shutdown_t>.allocate(capacity: 1)
            shutdownRequest = request
            if uv_shutdown(request, stream, onShutdown) < 0 {
                close()
            }
        }
        drainFinished()
    }

    /// Closes the stream: queued writes fail with `.canceled`, then `streamDidClose` fires once.
    /// Idempotent.
    public func close() {
        guard uv_is_closing(handle) == 0 else { return }
        uv_close(handle, onClose)
    }

    /// True from the first close() until forever.
    public var isClosing: Bool {
        uv_is_closing(handle) != 0
    }

    fileprivate func didClose() {
        // libuv has cancelled its queued writes; gathered ones never reached it.
        for i in 0..<gatheredContexts.count {
            finished.append(FinishedWrite(context: gatheredContexts[i], status: UV_ECANCELED.rawValue))
        }
        gathered.removeAll()
        gatheredBytes = 0
        gatheredContexts.removeAll()
        drainFinished()
        let delegate = self.delegate
        self.delegate = nil
        delegate?.streamDidClose(self)
    }
}

extension SocketStream: ByteStream {}

/// A connected socket on its way from one loop to another: an fd nobody's loop watches yet.
public struct HandedOverSocket: Sendable {
    public let fd: Int32
    let kind: SocketStream.Kind
    /// The peer, as the stream that accepted it described it.
    public let peerDescription: String
}

extension SocketStream: TurnEndTask {
    public func runAtTurnEnd() {
        flushScheduled = false
        flushGathered()
        drainFinished()
    }
}
