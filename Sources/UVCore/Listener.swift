// Listener: a listening TCP (IPv4/IPv6) or unix socket.
//
// Ownership. The factories bind before any Listener exists; if binding fails,
// the half-made handle is closed and freed by libuv's close callback and only
// an error comes back (run the loop so that callback can happen). Once a
// Listener exists, `handle.data` holds one strong reference to it until its
// close callback, and the Listener holds its delegate strongly until then
// (same reasoning as SocketStream). Accepted streams are handed to the
// delegate; from then on they belong to whoever keeps them.
//
// Unix sockets. A socket file left behind by a dead process makes bind fail
// with EADDRINUSE. We remove it only after a connect() to it is refused, i.e.
// nobody listens there; a live listener (or a file that is not a socket) is an
// EADDRINUSE for the caller. The probe connect is a real connection: a live
// listener sees one client that closes at once. libuv itself unlinks the path
// it bound when the handle closes.
//
// TCP. libuv reports EADDRINUSE for TCP from uv_listen, not from bind, so a
// busy port surfaces in start().

import CLibUV
#if canImport(Glibc)
import Glibc
#endif

/// Receives accepted connections. All calls arrive on the loop thread.
public protocol ListenerDelegate: AnyObject {
    /// A new connection; the receiver sets stream.delegate and calls startReading (or closes it).
    func listener(_ listener: Listener, didAccept stream: SocketStream)
    func listener(_ listener: Listener, didFailToAcceptWith error: UVError)
}

private let onConnection: uv_connection_cb = { server, status in
    Unmanaged<Listener>.fromOpaque(server!.pointee.data)._withUnsafeGuaranteedRef { $0.didReceiveConnection(status: status) }
}

private let onClose: uv_close_cb = { handle in
    let listener = Unmanaged<Listener>.fromOpaque(handle!.pointee.data).takeRetainedValue()
    listener.delegate = nil
}

/// A listening socket, confined to its loop's thread.
public final class Listener {
    /// Receives accepted streams. Held strongly until the listener has closed.
    public var delegate: (any ListenerDelegate)?
    /// "tcp:127.0.0.1:10809", "tcp:[::1]:10809" or "unix:/path" (the bound port, even if 0 was asked for).
    public let localDescription: String

    private let kind: SocketStream.Kind
    private let memory: UnsafeMutableRawPointer
    private let backlog: Int32

    private init(memory: UnsafeMutableRawPointer, kind: SocketStream.Kind, description: String, backlog: Int32) {
        self.memory = memory
        self.kind = kind
        self.localDescription = description
        self.backlog = backlog
        memory.asHandle.pointee.data = Unmanaged.passRetained(self).toOpaque()
    }

    deinit {
        memory.deallocate()
    }

    /// Binds a TCP socket to a numeric IPv4 or IPv6 address ("127.0.0.1", "::1", "[::1]", "0.0.0.0", "::").
    /// Port 0 picks a free port; see `localPort`.
    public static func tcp(loop: EventLoop, host: String, port: Int, backlog: Int32 = 128) throws(UVError) -> Listener {
        guard (0...65535).contains(port) else { throw .invalidArgument }
        var address = sockaddr_storage()
        var bare = host
        if bare.hasPrefix("[") && bare.hasSuffix("]") { bare = String(bare.dropFirst().dropLast()) }
        try withUnsafeMutableBytes(of: &address) { (raw) throws(UVError) in
            let v4 = raw.baseAddress!.assumingMemoryBound(to: sockaddr_in.self)
            if uv_ip4_addr(bare, Int32(port), v4) == 0 { return }
            try check(uv_ip6_addr(bare, Int32(port), raw.baseAddress!.assumingMemoryBound(to: sockaddr_in6.self)))
        }

        let memory = allocateHandle(uv_tcp_t.self)
        precondition(uv_tcp_init(loop.raw, memory.asTCP) == 0)
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { uv_tcp_bind(memory.asTCP, $0, 0) }
        }
        if rc < 0 {
            closeAndFree(memory)
            throw UVError(code: rc)
        }
        let description = "tcp:" + (boundAddress(memory).map { describeSocketAddress([$0]) } ?? host)
        return Listener(memory: memory, kind: .tcp, description: description, backlog: backlog)
    }

    /// Binds a unix stream socket at `path`. A stale socket file is replaced; a live one is EADDRINUSE.
    public static func unix(loop: EventLoop, path: String, backlog: Int32 = 128) throws(UVError) -> Listener {
        // libuv silently truncates long paths; sun_path holds 107 bytes and a NUL.
        guard !path.isEmpty, path.utf8.count < MemoryLayout.size(ofValue: sockaddr_un().sun_path) else {
            throw UVError(code: UV_ENAMETOOLONG.rawValue)
        }
        var result = bindPipe(loop: loop, path: path)
        if case .failure(let error) = result, error == .addressInUse, isStaleSocket(path) {
            unlink(path)
            result = bindPipe(loop: loop, path: path)
        }
        let memory = try result.get()
        return Listener(memory: memory, kind: .pipe, description: "unix:" + path, backlog: backlog)
    }

    /// Adopts a stream socket that is already bound and listening, such as one systemd passes
    /// (socket activation): TCP through uv_tcp_open, unix through uv_pipe_open. From here on the fd
    /// belongs to the listener; close() closes it and never unlinks a unix socket's path (the
    /// socket's owner made it). `name` (LISTEN_FDNAMES) only labels the description.
    public static func adopt(loop: EventLoop, fd: Int32, name: String? = nil, backlog: Int32 = 128) throws(UVError) -> Listener {
        var type: Int32 = 0
        var typeLength = socklen_t(MemoryLayout<Int32>.size)
        guard getsockopt(fd, SOL_SOCKET, SO_TYPE, &type, &typeLength) == 0 else { throw UVError(code: -Glibc.errno) }
        guard type == Int32(SOCK_STREAM.rawValue) else { throw .invalidArgument }
        var address = sockaddr_storage()
        var length = socklen_t(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        guard rc == 0 else { throw UVError(code: -Glibc.errno) }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        let label = name.map { " (\($0))" } ?? ""
        switch Int32(address.ss_family) {
        case AF_UNIX:
            let memory = allocateHandle(uv_pipe_t.self)
            precondition(uv_pipe_init(loop.raw, memory.asPipe, 0) == 0)
            let opened = uv_pipe_open(memory.asPipe, fd)
            if opened < 0 {
                closeAndFree(memory)
                throw UVError(code: opened)
            }
            let path = withUnsafeBytes(of: address) { raw -> String in
                let un = raw.load(as: sockaddr_un.self)
                return withUnsafeBytes(of: un.sun_path) { p in
                    p.first == 0 && p.count > 1 ? "@" + String(decoding: p.dropFirst().prefix { $0 != 0 }, as: UTF8.self)
                        : String(decoding: p.prefix { $0 != 0 }, as: UTF8.self)
                }
            }
            return Listener(memory: memory, kind: .pipe, description: "unix:\(path.isEmpty ? "fd \(fd)" : path)" + label, backlog: backlog)
        case AF_INET, AF_INET6:
            let memory = allocateHandle(uv_tcp_t.self)
            precondition(uv_tcp_init(loop.raw, memory.asTCP) == 0)
            let opened = uv_tcp_open(memory.asTCP, fd)
            if opened < 0 {
                closeAndFree(memory)
                throw UVError(code: opened)
            }
            let description = "tcp:" + (boundAddress(memory).map { describeSocketAddress([$0]) } ?? "fd \(fd)")
            return Listener(memory: memory, kind: .tcp, description: description + label, backlog: backlog)
        default:
            throw .invalidArgument
        }
    }

    private static func bindPipe(loop: EventLoop, path: String) -> Result<UnsafeMutableRawPointer, UVError> {
        let memory = allocateHandle(uv_pipe_t.self)
        precondition(uv_pipe_init(loop.raw, memory.asPipe, 0) == 0)
        let rc = uv_pipe_bind(memory.asPipe, path)
        if rc < 0 {
            closeAndFree(memory)
            return .failure(UVError(code: rc))
        }
        return .success(memory)
    }

    /// True if `path` is a socket file that refuses connections (its server is gone).
    private static func isStaleSocket(_ path: String) -> Bool {
        var info = stat()
        guard lstat(path, &info) == 0, info.st_mode & S_IFMT == S_IFSOCK else { return false }
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue | SOCK_NONBLOCK.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { dst in
            let bytes = Array(path.utf8)
            dst.copyBytes(from: bytes)
            dst[bytes.count] = 0
        }
        let rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
        return rc < 0 && Glibc.errno == ECONNREFUSED
    }

    private static func boundAddress(_ memory: UnsafeMutableRawPointer) -> sockaddr_storage? {
        var address = sockaddr_storage()
        var length = Int32(MemoryLayout<sockaddr_storage>.size)
        let rc = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { uv_tcp_getsockname(memory.asTCP, $0, &length) }
        }
        return rc == 0 ? address : nil
    }

    /// The bound TCP port (useful after asking for port 0); nil for unix sockets.
    public var localPort: Int? {
        guard kind == .tcp, uv_is_closing(memory.asHandle) == 0, let address = Self.boundAddress(memory) else { return nil }
        return withUnsafeBytes(of: address) { raw in
            switch Int32(address.ss_family) {
            case AF_INET: Int(UInt16(bigEndian: raw.load(as: sockaddr_in.self).sin_port))
            case AF_INET6: Int(UInt16(bigEndian: raw.load(as: sockaddr_in6.self).sin6_port))
            default: nil
            }
        }
    }

    /// Starts accepting (uv_listen). A busy TCP port is reported here; the listener stays
    /// open after a failure, so close() it.
    public func start() throws(UVError) {
        try check(uv_listen(memory.asStream, backlog, onConnection))
    }

    /// Stops accepting and closes the socket; libuv unlinks a unix socket path it bound. Idempotent.
    public func close() {
        guard uv_is_closing(memory.asHandle) == 0 else { return }
        uv_close(memory.asHandle, onClose)
    }

    /// True from the first close() on.
    public var isClosing: Bool {
        uv_is_closing(memory.asHandle) != 0
    }

    fileprivate func didReceiveConnection(status: Int32) {
        guard status >= 0 else {
            delegate?.listener(self, didFailToAcceptWith: UVError(code: status))
            return
        }
        do throws(UVError) {
            let stream = try SocketStream(acceptingFrom: memory.asStream, kind: kind)
            if let delegate {
                delegate.listener(self, didAccept: stream)
            } else {
                stream.close()
            }
        } catch {
            delegate?.listener(self, didFailToAcceptWith: error)
        }
    }
}
