// The one line a service log gets when a connection ends: peer, export, duration and bytes moved.

#if canImport(Glibc)
import Glibc
#endif

enum ConnectionReport {
    static var now: UInt64 {
        var t = timespec()
        clock_gettime(CLOCK_MONOTONIC, &t)
        return UInt64(t.tv_sec) * 1_000_000_000 + UInt64(t.tv_nsec)
    }

    static func closed(_ connection: Connection, export: String?, startedAt: UInt64) -> String {
        let nanoseconds = now &- startedAt
        let seconds = Double(nanoseconds / 1_000_000) / 1000
        let target = export.map { "export \"\($0)\"" } ?? "no export (ended in the handshake)"
        return "connection \(connection.id) from \(connection.stream.peerDescription) closed: \(target), "
            + "\(seconds) s, \(connection.bytesReceived) bytes received, \(connection.stream.bytesWritten) bytes sent"
    }
}
