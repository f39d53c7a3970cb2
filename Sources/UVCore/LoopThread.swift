// LoopThread: a thread that runs one body, usually an EventLoop's run(), and can be joined.
//
// Why not Foundation's Thread: UVCore does not import Foundation, and libuv's uv_thread_create gives a
// plain pthread with a normal stack. The body is handed over as a retained box through the thread's
// argument and released on the thread once the body returns.

import CLibUV
#if canImport(Glibc)
import Glibc
#endif

private final class ThreadBody {
    let name: String
    let body: @Sendable () -> Void
    init(name: String, body: @escaping @Sendable () -> Void) {
        self.name = name
        self.body = body
    }
}

private let threadEntry: uv_thread_cb = { argument in
    let box = Unmanaged<ThreadBody>.fromOpaque(argument!).takeRetainedValue()
    // Linux names are at most 15 bytes; the name shows in top -H and in perf. (/proc rather than
    // pthread_setname_np, which Glibc's Swift module hides behind _GNU_SOURCE.)
    let fd = open("/proc/thread-self/comm", O_WRONLY | O_CLOEXEC)
    if fd >= 0 {
        var name = String(box.name.utf8.prefix(15))!
        name.withUTF8 { _ = write(fd, $0.baseAddress, $0.count) }
        close(fd)
    }
    box.body()
}

/// One started thread; `join()` waits for its body to return. Not Sendable: start and join it on one thread.
public final class LoopThread {
    private var thread = uv_thread_t()
    private var joined = false

    /// Starts `body` on a new thread named `name`.
    public init(name: String, _ body: @escaping @Sendable () -> Void) throws(UVError) {
        let box = Unmanaged.passRetained(ThreadBody(name: name, body: body))
        let rc = uv_thread_create(&thread, threadEntry, box.toOpaque())
        if rc < 0 {
            box.release()
            throw UVError(code: rc)
        }
    }

    /// Waits for the body to return. Idempotent.
    public func join() {
        guard !joined else { return }
        joined = true
        _ = uv_thread_join(&thread)
    }

    deinit {
        precondition(joined, "a LoopThread must be joined before it is dropped")
    }

    /// Online CPUs (sysconf; Glibc's Swift module hides sched_getaffinity behind _GNU_SOURCE).
    public static var onlineProcessors: Int {
        max(Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))), 1)
    }
}
