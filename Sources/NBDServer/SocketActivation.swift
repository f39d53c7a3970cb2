// systemd socket activation (sd_listen_fds(3)) without libsystemd: when LISTEN_PID is this process,
// LISTEN_FDS sockets start at fd 3, named by LISTEN_FDNAMES (colon-separated) if present. The
// variables are removed so no child takes the sockets for its own.

#if canImport(Glibc)
import Glibc
#endif

struct SocketActivation {
    struct Socket {
        var fd: Int32
        var name: String?
    }

    var sockets: [Socket]

    static let firstFD: Int32 = 3

    /// The inherited sockets, or nil when the process was not socket-activated.
    static func fromEnvironment() throws(ServerError) -> SocketActivation? {
        defer {
            unsetenv("LISTEN_PID")
            unsetenv("LISTEN_FDS")
            unsetenv("LISTEN_FDNAMES")
        }
        guard let pidText = getenv("LISTEN_PID").map({ String(cString: $0) }),
              let countText = getenv("LISTEN_FDS").map({ String(cString: $0) }) else { return nil }
        guard let pid = Int32(pidText), pid == getpid() else { return nil }
        guard let count = Int32(countText), count >= 1, count < 4096 else {
            throw ServerError("LISTEN_FDS=\(countText) is not a socket count")
        }
        let names = getenv("LISTEN_FDNAMES").map { String(cString: $0).split(separator: ":", omittingEmptySubsequences: false).map(String.init) }
        var sockets: [Socket] = []
        for i in 0..<count {
            let fd = firstFD + i
            guard fcntl(fd, F_GETFD) >= 0 else { throw ServerError("LISTEN_FDS=\(count) but fd \(fd) is not open") }
            let name = names.flatMap { Int(i) < $0.count ? $0[Int(i)] : nil }
            sockets.append(Socket(fd: fd, name: name))
        }
        return SocketActivation(sockets: sockets)
    }
}
