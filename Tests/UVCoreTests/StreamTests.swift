// Listener and SocketStream tests, libuv style: every callback is counted, all
// handles are closed, the loop runs dry, and loop.close() must then succeed.

import Glibc
import Testing
@testable import UVCore

/// Echoes everything back on each accepted stream; counts every callback.
final class EchoServer: ListenerDelegate, SocketStreamDelegate {
    var accepted = 0
    var acceptErrors = 0
    var reads = 0
    var bytesRead = 0
    var eofs = 0
    var readErrors = 0
    var pendingWrites = 0
    var finishedWrites = 0
    var writeErrors = 0
    var closed = 0
    var peers: [String] = []
    /// Close the listener after this many accepts (0 = never).
    var acceptLimit = 1
    /// Put accepted streams in coalescing mode.
    var coalesce = false
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 16)

    deinit { buffer.deallocate() }

    func listener(_ listener: Listener, didAccept stream: SocketStream) {
        accepted += 1
        peers.append(stream.peerDescription)
        stream.delegate = self
        stream.setNoDelay(true)
        if coalesce { stream.coalesceWrites() }
        stream.startReading()
        if accepted == acceptLimit { listener.close() }
    }

    func listener(_ listener: Listener, didFailToAcceptWith error: UVError) {
        acceptErrors += 1
    }

    func streamWantsReadBuffer(_ stream: SocketStream) -> UnsafeMutableRawBufferPointer { buffer }

    func stream(_ stream: SocketStream, didRead count: Int) {
        reads += 1
        bytesRead += count
        let outcome = withUnsafeTemporaryAllocation(of: UnsafeRawBufferPointer.self, capacity: 1) { list in
            list[0] = UnsafeRawBufferPointer(rebasing: buffer[0..<count])
            return stream.write(UnsafeBufferPointer(list), context: UInt64(count))
        }
        switch outcome {
        case .completed: break
        case .pending:
            // The read buffer is the write buffer: stop reading until it drained.
            pendingWrites += 1
            stream.stopReading()
        case .failed: writeErrors += 1; stream.close()
        }
    }

    func stream(_ stream: SocketStream, didFailReadingWith error: UVError) {
        if error == .eof { eofs += 1 } else { readErrors += 1 }
        stream.close()
    }

    func stream(_ stream: SocketStream, didFinishWrite context: UInt64, error: UVError?) {
        finishedWrites += 1
        if error != nil { writeErrors += 1 }
        stream.startReading()
    }

    func streamDidClose(_ stream: SocketStream) {
        closed += 1
    }
}

/// Runs one echo session: `connect` runs on a plain thread, sends `messages`, expects them back.
private func echoSession(loop: EventLoop, listener: Listener, messages: Int = 50, coalesce: Bool = false,
                         connect: @escaping @Sendable () -> Int32) throws -> EchoServer {
    let server = EchoServer()
    server.coalesce = coalesce
    listener.delegate = server
    try listener.start()
    let echoed = Shared(false)
    let client = spawnThread {
        let fd = connect()
        var ok = true
        for index in 0..<messages {
            let message = pattern(100 + index * 37, seed: index)
            sendAll(fd, message)
            ok = ok && receive(fd, count: message.count) == message
        }
        close(fd)
        echoed.value = ok
    }
    runLoop(loop)
    joinThread(client)
    #expect(echoed.value)
    #expect(server.accepted == 1)
    #expect(server.acceptErrors == 0)
    #expect(server.eofs == 1)
    #expect(server.readErrors == 0)
    #expect(server.writeErrors == 0)
    #expect(server.closed == 1)
    #expect(server.finishedWrites == server.pendingWrites)
    #expect(server.bytesRead == (0..<messages).reduce(0) { $0 + 100 + $1 * 37 })
    return server
}

@Suite struct StreamTests {
    @Test func tcpEchoOverIPv4() throws {
        let loop = try EventLoop()
        let listener = try Listener.tcp(loop: loop, host: "127.0.0.1", port: 0)
        let port = try #require(listener.localPort)
        #expect(port > 0)
        #expect(listener.localDescription == "tcp:127.0.0.1:\(port)")
        let server = try echoSession(loop: loop, listener: listener) { connectTCP(host: "127.0.0.1", port: port) }
        #expect(server.peers.count == 1 && server.peers[0].hasPrefix("127.0.0.1:"))
        #expect(listener.isClosing)
        try loop.close()
    }

    @Test func tcpEchoOverIPv6() throws {
        let loop = try EventLoop()
        let listener = try Listener.tcp(loop: loop, host: "::1", port: 0)
        let port = try #require(listener.localPort)
        #expect(listener.localDescription == "tcp:[::1]:\(port)")
        let server = try echoSession(loop: loop, listener: listener) { connectTCP(host: "::1", port: port) }
        #expect(server.peers.count == 1 && server.peers[0].hasPrefix("[::1]:"))
        try loop.close()
    }

    @Test func unixEcho() throws {
        let loop = try EventLoop()
        let path = temporaryPath("echo") + ".sock"
        let listener = try Listener.unix(loop: loop, path: path)
        #expect(listener.localDescription == "unix:\(path)")
        #expect(listener.localPort == nil)
        let server = try echoSession(loop: loop, listener: listener) { connectUnix(path: path) }
        #expect(server.peers == ["unix"])
        #expect(access(path, F_OK) != 0, "libuv unlinks the socket path on close")
        try loop.close()
    }

    @Test func unixEchoWithCoalescedWrites() throws {
        let loop = try EventLoop()
        let path = temporaryPath("echo-coalesced") + ".sock"
        let listener = try Listener.unix(loop: loop, path: path)
        let server = try echoSession(loop: loop, listener: listener, coalesce: true) { connectUnix(path: path) }
        // Every coalesced write is reported through didFinishWrite.
        #expect(server.pendingWrites == server.reads)
        try loop.close()
    }

    @Test func peerCloseIsEOF() throws {
        let loop = try EventLoop()
        let listener = try Listener.tcp(loop: loop, host: "127.0.0.1", port: 0)
        let port = try #require(listener.localPort)
        let server = EchoServer()
        listener.delegate = server
        try listener.start()
        let client = spawnThread { close(connectTCP(host: "127.0.0.1", port: port)) }
        runLoop(loop)
        joinThread(client)
        #expect(server.accepted == 1)
        #expect(server.reads == 0)
        #expect(server.eofs == 1)
        #expect(server.readErrors == 0)
        #expect(server.closed == 1)
        try loop.close()
    }

    @Test func busyTCPPortIsAddressInUse() throws {
        let loop = try EventLoop()
        let first = try Listener.tcp(loop: loop, host: "127.0.0.1", port: 0)
        try first.start()
        let port = try #require(first.localPort)
        var error: UVError?
        do {
            let second = try Listener.tcp(loop: loop, host: "127.0.0.1", port: port)
            do { try second.start() } catch let e { error = e }
            second.close()
        } catch let e {
            error = e
        }
        #expect(error == .addressInUse)
        first.close()
        runLoop(loop)
        try loop.close()
    }

    @Test func badHostIsInvalidArgument() throws {
        let loop = try EventLoop()
        #expect(throws: UVError.invalidArgument) { try Listener.tcp(loop: loop, host: "not-an-address", port: 0) }
        #expect(throws: UVError.invalidArgument) { try Listener.tcp(loop: loop, host: "127.0.0.1", port: 70000) }
        runLoop(loop)
        try loop.close()
    }

    @Test func busyUnixPathIsAddressInUseAndStaleSocketIsReplaced() throws {
        let loop = try EventLoop()
        let path = temporaryPath("busy") + ".sock"

        // A live listener: the second bind must fail cleanly. Its probe connect
        // is accepted (and closed at EOF) by the live listener's delegate.
        let live = try Listener.unix(loop: loop, path: path)
        let server = EchoServer()
        live.delegate = server
        try live.start()
        #expect(throws: UVError.addressInUse) { try Listener.unix(loop: loop, path: path) }
        runLoop(loop)
        #expect(server.accepted == 1)
        #expect(server.eofs == 1)
        #expect(server.closed == 1)
        #expect(access(path, F_OK) != 0)

        // A stale socket file (bound, never listened, closed, not unlinked) is replaced.
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = unixAddress(path)
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        #expect(rc == 0)
        close(fd)
        #expect(access(path, F_OK) == 0)
        let replacement = try Listener.unix(loop: loop, path: path)
        try replacement.start()
        replacement.close()

        // A regular file is never removed.
        let filePath = temporaryPath("plain")
        let file = open(filePath, O_CREAT | O_WRONLY, 0o600)
        close(file)
        #expect(throws: UVError.addressInUse) { try Listener.unix(loop: loop, path: filePath) }
        #expect(access(filePath, F_OK) == 0)
        unlink(filePath)

        runLoop(loop)
        try loop.close()
    }

    @Test func largeVectoredWriteGoesPendingAndFinishesInOrder() throws {
        let loop = try EventLoop()
        let listener = try Listener.tcp(loop: loop, host: "127.0.0.1", port: 0)
        let port = try #require(listener.localPort)

        // First write: 6 buffers with an 8 MiB one in the middle (more than the 4 a uv_write_t
        // holds inline). Second write: 7 small buffers, queued behind it.
        let first = [pattern(16, seed: 1), pattern(3000, seed: 2), pattern(8 << 20, seed: 3),
                     pattern(1, seed: 4), pattern(77, seed: 5), pattern(4096, seed: 6)]
        let second = (0..<7).map { pattern(10 + $0, seed: 10 + $0) }
        let expected = (first + second).flatMap { $0 }

        final class Writer: ListenerDelegate, SocketStreamDelegate {
            let first: [UnsafeRawBufferPointer], second: [UnsafeRawBufferPointer]
            var outcomes: [String] = []
            var pendingAfterFirst = 0
            var finished: [UInt64] = []
            var errors = 0
            var closed = 0
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 4096, alignment: 16)
            init(first: [[UInt8]], second: [[UInt8]]) {
                func copy(_ bytes: [UInt8]) -> UnsafeRawBufferPointer {
                    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 16)
                    buffer.copyBytes(from: bytes)
                    return UnsafeRawBufferPointer(buffer)
                }
                self.first = first.map(copy)
                self.second = second.map(copy)
            }
            deinit {
                scratch.deallocate()
                for buffer in first + second { buffer.deallocate() }
            }

            func write(_ stream: SocketStream, _ buffers: [UnsafeRawBufferPointer], context: UInt64) {
                let outcome = buffers.withUnsafeBufferPointer { stream.write($0, context: context) }
                switch outcome {
                case .completed: outcomes.append("completed")
                case .pending: outcomes.append("pending")
                case .failed(let error): outcomes.append("failed \(error)")
                }
            }

            func listener(_ listener: Listener, didAccept stream: SocketStream) {
                listener.close()
                stream.delegate = self
                write(stream, first, context: 42)
                pendingAfterFirst = stream.pendingWriteBytes
                write(stream, second, context: 43)
                stream.shutdownAndClose()
            }
            func listener(_ listener: Listener, didFailToAcceptWith error: UVError) { errors += 1 }
            func streamWantsReadBuffer(_ stream: SocketStream) -> UnsafeMutableRawBufferPointer { scratch }
            func stream(_ stream: SocketStream, didRead count: Int) {}
            func stream(_ stream: SocketStream, didFailReadingWith error: UVError) { errors += 1 }
            func stream(_ stream: SocketStream, didFinishWrite context: UInt64, error: UVError?) {
                finished.append(context)
                if error != nil { errors += 1 }
            }
            func streamDidClose(_ stream: SocketStream) { closed += 1 }
        }

        let writer = Writer(first: first, second: second)
        listener.delegate = writer
        try listener.start()
        let received = Shared<[UInt8]>([])
        let client = spawnThread {
            let fd = connectTCP(host: "127.0.0.1", port: port)
            usleep(50_000)   // let the server's first write fill the socket buffers
            received.value = receiveToEnd(fd)
            close(fd)
        }
        runLoop(loop)
        joinThread(client)

        #expect(writer.outcomes == ["pending", "pending"])
        #expect(writer.pendingAfterFirst > 0)
        #expect(writer.finished == [42, 43])
        #expect(writer.errors == 0)
        #expect(writer.closed == 1)
        let bytes = received.value
        #expect(bytes.count == expected.count)
        #expect(bytes == expected)
        try loop.close()
    }

    @Test func writeAfterCloseFailsWithoutCallback() throws {
        let loop = try EventLoop()
        let listener = try Listener.tcp(loop: loop, host: "127.0.0.1", port: 0)
        let port = try #require(listener.localPort)
        final class Closer: ListenerDelegate, SocketStreamDelegate {
            var outcome = ""
            var callbacks = 0
            var closed = 0
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 16)
            deinit { scratch.deallocate() }
            func listener(_ listener: Listener, didAccept stream: SocketStream) {
                listener.close()
                stream.delegate = self
                stream.close()
                stream.close()   // idempotent
                let bytes: [UInt8] = [1, 2, 3]
                let result = bytes.withUnsafeBytes { raw in
                    [raw].withUnsafeBufferPointer { stream.write($0, context: 1) }
                }
                if case .failed(let error) = result { outcome = error.name }
            }
            func listener(_ listener: Listener, didFailToAcceptWith error: UVError) { callbacks += 1 }
            func streamWantsReadBuffer(_ stream: SocketStream) -> UnsafeMutableRawBufferPointer { scratch }
            func stream(_ stream: SocketStream, didRead count: Int) { callbacks += 1 }
            func stream(_ stream: SocketStream, didFailReadingWith error: UVError) { callbacks += 1 }
            func stream(_ stream: SocketStream, didFinishWrite context: UInt64, error: UVError?) { callbacks += 1 }
            func streamDidClose(_ stream: SocketStream) { closed += 1 }
        }
        let closer = Closer()
        listener.delegate = closer
        try listener.start()
        let client = spawnThread {
            let fd = connectTCP(host: "127.0.0.1", port: port)
            _ = receiveToEnd(fd)
            close(fd)
        }
        runLoop(loop)
        joinThread(client)
        #expect(closer.outcome == "ECANCELED")
        #expect(closer.callbacks == 0)
        #expect(closer.closed == 1)
        try loop.close()
    }

    @Test func coalescedWritesLeaveTogetherAndFinishInOrder() throws {
        let loop = try EventLoop()
        let path = temporaryPath("coalesce") + ".sock"
        let listener = try Listener.unix(loop: loop, path: path)

        // Turn 1 (accept): 20 small writes, a 1 MiB one (sent at once: past the eager-flush size) and 3
        // more small ones. From the first finish: an 8 MiB write (more than the socket takes, so the
        // batch is queued in libuv) and 2 small ones behind it. The last finish shuts down.
        let small = (0..<25).map { pattern(17 + $0, seed: $0) }
        let big = pattern(1 << 20, seed: 100)
        let huge = pattern(8 << 20, seed: 101)
        final class Writer: ListenerDelegate, SocketStreamDelegate {
            var buffers: [UnsafeRawBufferPointer] = []
            var outcomes: [String] = []
            var finished: [UInt64] = []
            var errors = 0
            var closed = 0
            var pendingAtAccept = 0
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 16)
            init(_ contents: [[UInt8]]) {
                buffers = contents.map { bytes in
                    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 16)
                    buffer.copyBytes(from: bytes)
                    return UnsafeRawBufferPointer(buffer)
                }
            }
            deinit {
                scratch.deallocate()
                for buffer in buffers { buffer.deallocate() }
            }
            func write(_ stream: SocketStream, _ index: Int) {
                let outcome = [buffers[index]].withUnsafeBufferPointer { stream.write($0, context: UInt64(index)) }
                switch outcome {
                case .completed: outcomes.append("completed")
                case .pending: outcomes.append("pending")
                case .failed(let error): outcomes.append("failed \(error)")
                }
            }
            func listener(_ listener: Listener, didAccept stream: SocketStream) {
                listener.close()
                stream.delegate = self
                stream.coalesceWrites()
                for i in 0..<20 { write(stream, i) }
                write(stream, 25)          // the 1 MiB one
                for i in 20..<23 { write(stream, i) }
                pendingAtAccept = stream.pendingWriteBytes
            }
            func listener(_ listener: Listener, didFailToAcceptWith error: UVError) { errors += 1 }
            func streamWantsReadBuffer(_ stream: SocketStream) -> UnsafeMutableRawBufferPointer { scratch }
            func stream(_ stream: SocketStream, didRead count: Int) {}
            func stream(_ stream: SocketStream, didFailReadingWith error: UVError) { errors += 1 }
            func stream(_ stream: SocketStream, didFinishWrite context: UInt64, error: UVError?) {
                finished.append(context)
                if error != nil { errors += 1 }
                if finished.count == 1 {
                    write(stream, 26)      // the 8 MiB one
                    write(stream, 23)
                    write(stream, 24)
                }
                if context == 24 { stream.shutdownAndClose() }
            }
            func streamDidClose(_ stream: SocketStream) { closed += 1 }
        }
        let writer = Writer(small + [big, huge])
        listener.delegate = writer
        try listener.start()
        let received = Shared<[UInt8]>([])
        let client = spawnThread {
            let fd = connectUnix(path: path)
            usleep(50_000)   // let the 8 MiB write find the socket full
            received.value = receiveToEnd(fd)
            close(fd)
        }
        runLoop(loop)
        joinThread(client)

        let order = Array(0..<20) + [25, 20, 21, 22, 26, 23, 24]
        #expect(writer.outcomes == Array(repeating: "pending", count: order.count))
        #expect(writer.pendingAtAccept > 0)
        #expect(writer.finished == order.map(UInt64.init))
        #expect(writer.errors == 0)
        #expect(writer.closed == 1)
        let expected = order.flatMap { $0 < 25 ? small[$0] : ($0 == 25 ? big : huge) }
        #expect(received.value.count == expected.count)
        #expect(received.value == expected)
        try loop.close()
    }

    @Test func gatheredWritesAreCanceledByClose() throws {
        let loop = try EventLoop()
        let listener = try Listener.tcp(loop: loop, host: "127.0.0.1", port: 0)
        let port = try #require(listener.localPort)
        final class Closer: ListenerDelegate, SocketStreamDelegate {
            var events: [String] = []
            let scratch = UnsafeMutableRawBufferPointer.allocate(byteCount: 16, alignment: 16)
            let bytes = UnsafeMutableRawBufferPointer.allocate(byteCount: 100, alignment: 16)
            deinit {
                scratch.deallocate()
                bytes.deallocate()
            }
            func listener(_ listener: Listener, didAccept stream: SocketStream) {
                listener.close()
                stream.delegate = self
                stream.coalesceWrites()
                for context in 1...3 as ClosedRange<UInt64> {
                    let outcome = [UnsafeRawBufferPointer(bytes)].withUnsafeBufferPointer { stream.write($0, context: context) }
                    if case .pending = outcome {} else { events.append("not pending") }
                }
                stream.close()
                let late = [UnsafeRawBufferPointer(bytes)].withUnsafeBufferPointer { stream.write($0, context: 4) }
                if case .failed(let error) = late { events.append("late \(error.name)") }
            }
            func listener(_ listener: Listener, didFailToAcceptWith error: UVError) { events.append("accept error") }
            func streamWantsReadBuffer(_ stream: SocketStream) -> UnsafeMutableRawBufferPointer { scratch }
            func stream(_ stream: SocketStream, didRead count: Int) { events.append("read") }
            func stream(_ stream: SocketStream, didFailReadingWith error: UVError) { events.append("read error") }
            func stream(_ stream: SocketStream, didFinishWrite context: UInt64, error: UVError?) {
                events.append("finished \(context) \(error?.name ?? "ok")")
            }
            func streamDidClose(_ stream: SocketStream) { events.append("closed") }
        }
        let closer = Closer()
        listener.delegate = closer
        try listener.start()
        let received = Shared<[UInt8]>([])
        let client = spawnThread {
            let fd = connectTCP(host: "127.0.0.1", port: port)
            received.value = receiveToEnd(fd)
            close(fd)
        }
        runLoop(loop)
        joinThread(client)
        #expect(closer.events == ["late ECANCELED", "finished 1 ECANCELED", "finished 2 ECANCELED",
                                  "finished 3 ECANCELED", "closed"])
        #expect(received.value.isEmpty)
        try loop.close()
    }
}
