// Runs a real Server on its own thread, as `qnbd serve` would, and a blocking NBD client on the test
// thread: the connection glue is exercised over a real unix socket with limits small enough to make
// back-pressure and timeouts happen on purpose.

import Foundation
import NBDProtocol
import NBDServer
#if canImport(Glibc)
import Glibc
#endif

/// The server side: started on a thread, stopped through its stop handle.
final class RunningServer: @unchecked Sendable {
    let socketPath: String
    let imagePath: String
    private let ready = DispatchSemaphore(value: 0)
    private let finished = DispatchSemaphore(value: 0)
    private var stop: (@Sendable () -> Void)?
    private(set) var startError: String?
    private(set) var exitStatus: Int32 = -1

    init(image: String, limits: ConnectionLimits, size: Int = 8 << 20, memoryBudget: Int? = nil,
         configure: (inout ServerConfiguration) -> Void = { _ in }) throws {
        let dir = NSTemporaryDirectory() + "qnbd-st-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        imagePath = dir + "/" + image
        socketPath = dir + "/s.sock"
        _ = FileManager.default.createFile(atPath: imagePath, contents: nil)
        truncate(imagePath, off_t(size))
        var configuration = ServerConfiguration(imagePath: imagePath)
        configuration.listen = [.unix(path: socketPath)]
        configuration.connectionLimits = limits
        if let memoryBudget { configuration.memoryBudgetBytes = memoryBudget }
        configuration.logLevel = .error
        configuration.threadPoolSize = 4
        configure(&configuration)
        let settings = configuration
        let thread = Thread { [self] in
            do {
                let server = try Server(configuration: settings)
                self.stop = server.stopHandle
                self.ready.signal()
                self.exitStatus = server.run()
            } catch {
                self.startError = "\(error)"
                self.ready.signal()
            }
            self.finished.signal()
        }
        thread.start()
        ready.wait()
        if let startError { throw ServerStartFailure(message: startError) }
    }

    /// Stops the server and waits for `run()` to return; the exit status is then in `exitStatus`.
    func shutdown() -> Int32 {
        stop?()
        _ = finished.wait(timeout: .now() + 30)
        return exitStatus
    }
}

struct ServerStartFailure: Error { let message: String }

/// A blocking NBD client over a unix socket, with a receive timeout so a test can never hang.
final class TestClient {
    let fd: Int32

    init(path: String) throws {
        fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: Array(path.utf8.prefix(raw.count - 1)) + [0])
        }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard rc == 0 else { throw ServerStartFailure(message: "connect: \(errno)") }
        var timeout = timeval(tv_sec: 10, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
    }

    deinit { close(fd) }

    func send(_ bytes: [UInt8]) {
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
            if n <= 0 { return }
            done += n
        }
    }

    /// Exactly `count` bytes, or nil on EOF, error or timeout.
    func receive(_ count: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + done, count - done, 0) }
            if n <= 0 { return nil }
            done += n
        }
        return out
    }

    /// Waits, without reading, until the server closes its end; false after `seconds` without that.
    func waitForPeerClose(seconds: Int32) -> Bool {
        var p = pollfd(fd: fd, events: pollPeerHangUp, revents: 0)
        return poll(&p, 1, seconds * 1000) == 1 && p.revents & (pollPeerHangUp | Int16(POLLHUP)) != 0
    }

    /// Negotiates with NBD_OPT_GO and simple replies; returns the export size.
    func handshake() -> UInt64? {
        guard let greeting = receive(18), greeting.prefix(8).elementsEqual(bytes(NBDMagic.greeting)) else { return nil }
        send(bytes(UInt32(3)))
        var payload = bytes(UInt32(0))
        payload += bytes(UInt16(0))
        send(bytes(NBDMagic.option) + bytes(NBDOption.go.rawValue) + bytes(UInt32(payload.count)) + payload)
        var size: UInt64?
        while let header = receive(20) {
            let type = be32(header, 12)
            let length = Int(be32(header, 16))
            guard let body = receive(length) else { return nil }
            if type == NBDOptionReply.info.rawValue && body.count >= 12 && be16(body, 0) == 0 {
                size = be64(body, 2)
            }
            if type == NBDOptionReply.ack.rawValue { return size }
            if type & 0x8000_0000 != 0 { return nil }
        }
        return nil
    }

    func request(_ command: NBDCommand, cookie: UInt64, offset: UInt64, length: UInt32, payload: [UInt8] = []) {
        let r = Request(flags: [], type: command.rawValue, cookie: cookie, offset: offset, length: UInt64(length))
        send(r.encoded(extended: false) + payload)
    }

    /// A simple reply: (error, cookie) and, for a successful read, `dataLength` bytes.
    func reply(dataLength: (UInt64) -> Int) -> (error: UInt32, cookie: UInt64, data: [UInt8])? {
        guard let header = receive(16), be32(header, 0) == NBDMagic.simpleReply else { return nil }
        let error = be32(header, 4)
        let cookie = be64(header, 8)
        let n = error == 0 ? dataLength(cookie) : 0
        guard let data = n > 0 ? receive(n) : [] else { return nil }
        return (error, cookie, data)
    }
}

/// POLLRDHUP (Linux), which Glibc's module leaves out: the peer closed or shut down its sending side.
let pollPeerHangUp: Int16 = 0x2000

func bytes<T: FixedWidthInteger>(_ v: T) -> [UInt8] { withUnsafeBytes(of: v.bigEndian) { Array($0) } }
func be16(_ b: [UInt8], _ at: Int) -> UInt16 { UInt16(b[at]) << 8 | UInt16(b[at + 1]) }
func be32(_ b: [UInt8], _ at: Int) -> UInt32 { (0..<4).reduce(0) { $0 << 8 | UInt32(b[at + $1]) } }
func be64(_ b: [UInt8], _ at: Int) -> UInt64 { (0..<8).reduce(0) { $0 << 8 | UInt64(b[at + $1]) } }
