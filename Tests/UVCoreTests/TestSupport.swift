// Helpers shared by the UVCore tests: plain-thread spawning (never the Swift
// concurrency pool, which the blocked test threads may already occupy),
// blocking client sockets for those threads, and a loop runner with a watchdog.

import Glibc
import Synchronization
import Testing
@testable import UVCore

// MARK: Threads

private final class ThreadBody {
    let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
}

private let threadEntry: @convention(c) (UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? = { argument in
    Unmanaged<ThreadBody>.fromOpaque(argument!).takeRetainedValue().body()
    return nil
}

/// Starts a detached-from-Swift-concurrency pthread; join it with `joinThread`.
func spawnThread(_ body: @escaping @Sendable () -> Void) -> pthread_t {
    var thread = pthread_t()
    let box = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
    precondition(pthread_create(&thread, nil, threadEntry, box) == 0)
    return thread
}

func joinThread(_ thread: pthread_t) {
    pthread_join(thread, nil)
}

/// A value shared between a client thread and the test.
final class Shared<Value: Sendable>: Sendable {
    private let storage: Mutex<Value>
    init(_ value: Value) { storage = Mutex(value) }
    var value: Value {
        get { storage.withLock { $0 } }
        set { storage.withLock { $0 = newValue } }
    }
    func update(_ body: (inout Value) -> Void) { storage.withLock { body(&$0) } }
}

// MARK: Blocking client sockets (for client threads only)

func connectTCP(host: String, port: Int) -> Int32 {
    let isV6 = host.contains(":")
    let fd = socket(isV6 ? AF_INET6 : AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
    precondition(fd >= 0)
    var one: Int32 = 1
    setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    let rc: Int32
    if isV6 {
        var address = sockaddr_in6()
        address.sin6_family = sa_family_t(AF_INET6)
        address.sin6_port = UInt16(port).bigEndian
        precondition(inet_pton(AF_INET6, host, &address.sin6_addr) == 1)
        rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
        }
    } else {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        precondition(inet_pton(AF_INET, host, &address.sin_addr) == 1)
        rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
    }
    precondition(rc == 0, "connect failed: \(errno)")
    return fd
}

func unixAddress(_ path: String) -> sockaddr_un {
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { dst in
        let bytes = Array(path.utf8)
        dst.copyBytes(from: bytes)
        dst[bytes.count] = 0
    }
    return address
}

func connectUnix(path: String) -> Int32 {
    let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
    precondition(fd >= 0)
    var address = unixAddress(path)
    let rc = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    precondition(rc == 0, "connect failed: \(errno)")
    return fd
}

func sendAll(_ fd: Int32, _ bytes: [UInt8]) {
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
        precondition(n > 0 || errno == EINTR, "send failed: \(errno)")
        if n > 0 { done += n }
    }
}

/// Reads until `count` bytes arrived or the peer closed; returns what arrived.
func receive(_ fd: Int32, count: Int) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    var done = 0
    while done < count {
        let n = bytes.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + done, count - done, 0) }
        if n == 0 { break }
        if n < 0 { if errno == EINTR { continue }; break }
        done += n
    }
    return Array(bytes[0..<done])
}

/// Reads until end of stream.
func receiveToEnd(_ fd: Int32) -> [UInt8] {
    var result: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = chunk.withUnsafeMutableBytes { recv(fd, $0.baseAddress!, $0.count, 0) }
        if n == 0 { break }
        if n < 0 { if errno == EINTR { continue }; break }
        result.append(contentsOf: chunk[0..<n])
    }
    return result
}

func pattern(_ count: Int, seed: Int = 0) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: ($0 &* 31) &+ ($0 >> 8) &+ seed) }
}

func temporaryPath(_ tag: String) -> String {
    "/tmp/uvcore-\(tag)-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
}

// MARK: Loop running

/// Runs the loop until it has no more work, with an unref'd watchdog timer so a
/// hung test fails instead of hanging CI. Then closes the watchdog and drains.
func runLoop(_ loop: EventLoop, timeoutSeconds: UInt64 = 30, sourceLocation: SourceLocation = #_sourceLocation) {
    let watchdog = LoopTimer(loop: loop)
    var fired = false
    watchdog.start(afterMilliseconds: timeoutSeconds * 1000) {
        fired = true
        loop.stop()
    }
    watchdog.unref()
    loop.run()
    if fired {
        Issue.record("event loop still busy after \(timeoutSeconds) s", sourceLocation: sourceLocation)
        return
    }
    watchdog.close()
    loop.run()
}
