// systemd's readiness protocol (sd_notify(3)) without libsystemd: one datagram per state change to
// the unix socket in NOTIFY_SOCKET. A leading '@' names an abstract socket (the '@' becomes a NUL).
// Without NOTIFY_SOCKET every call does nothing, so the server sends its states unconditionally.

#if canImport(Glibc)
import Glibc
#endif

struct SystemdNotify {
    private let path: String?

    /// Reads NOTIFY_SOCKET once; it is removed from the environment so no child inherits it.
    static func fromEnvironment() -> SystemdNotify {
        guard let value = getenv("NOTIFY_SOCKET").map({ String(cString: $0) }), !value.isEmpty else {
            return SystemdNotify(path: nil)
        }
        unsetenv("NOTIFY_SOCKET")
        return SystemdNotify(path: value)
    }

    var isActive: Bool { path != nil }

    /// Sends "KEY=value" lines; returns an error text for the log, or nil.
    @discardableResult
    func send(_ state: String) -> String? {
        guard let path else { return nil }
        guard path.hasPrefix("/") || path.hasPrefix("@") else { return "NOTIFY_SOCKET \(path) is neither a path nor @abstract" }
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(path.utf8)
        if bytes.first == UInt8(ascii: "@") { bytes[0] = 0 }
        guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else { return "NOTIFY_SOCKET path is too long" }
        withUnsafeMutableBytes(of: &address.sun_path) { $0.copyBytes(from: bytes) }
        // Abstract names are exactly their bytes long; a path may carry its NUL.
        let length = socklen_t(MemoryLayout<sockaddr_un>.offset(of: \.sun_path)! + bytes.count + (bytes[0] == 0 ? 0 : 1))
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return "cannot create the notify socket: \(String(cString: strerror(errno)))" }
        defer { close(fd) }
        let sent = state.utf8CString.withUnsafeBytes { text in
            withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    sendto(fd, text.baseAddress, text.count - 1, Int32(MSG_NOSIGNAL), $0, length)
                }
            }
        }
        return sent < 0 ? "cannot notify systemd at \(path): \(String(cString: strerror(errno)))" : nil
    }

    /// CLOCK_MONOTONIC in microseconds, which systemd wants beside RELOADING=1.
    static var monotonicMicroseconds: UInt64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return UInt64(now.tv_sec) * 1_000_000 + UInt64(now.tv_nsec) / 1000
    }
}
