// Everything `qnbd serve` can be told, as plain data the command line or a config file fills in:
// settings for the whole server, and one ExportConfiguration per export.

import NBDProtocol
import TLS
import UVCore
#if canImport(Glibc)
import Glibc
#endif

public struct ServerConfiguration: Sendable {
    public enum ImageFormat: String, Sendable, CaseIterable {
        case raw
        case qcow2
    }

    public enum ListenAddress: Sendable, Equatable, CustomStringConvertible {
        case tcp(host: String, port: Int)
        case unix(path: String)

        public var description: String {
            switch self {
            case .tcp(let host, let port): return host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
            case .unix(let path): return "unix:\(path)"
            }
        }
    }

    /// The exports, in the order LIST shows them.
    public var exports: [ExportConfiguration]
    public var listen: [ListenAddress] = []
    /// Clients served at once over all exports; more are turned away.
    public var maximumConnections = 128
    public var pidFile: String?
    public var logLevel: Logger.Level = .info
    public var threadPoolSize = 16
    /// Where file I/O goes (qemu-nbd's --aio); nil: io_uring when the kernel allows it, else threads.
    public var aio: FileIOBackend?
    /// Event loops, one thread each (`--loops`, `loops =`); nil: one per online CPU, at most `maximumLoops`.
    public var loops: Int?
    public static let maximumLoops = 64
    /// The loop count in force: what was asked, or the online CPUs (capped at the most `loops` takes).
    public var effectiveLoops: Int { loops ?? Self.onlineCPUs }

    static var onlineCPUs: Int { min(max(sysconf(Int32(_SC_NPROCESSORS_ONLN)), 1), Self.maximumLoops) }
    public var connectionLimits = ConnectionLimits()
    /// Request and reply bytes all connections together may hold before they stop reading.
    public var memoryBudgetBytes = 256 << 20
    /// Whether NBD_OPT_LIST answers (nbd-server's `allowlist`); refused with ERR_POLICY otherwise.
    public var allowList = true
    /// Who the process becomes once its sockets are bound, before any image opens.
    public var user: String?
    public var group: String?
    /// Whether STARTTLS is offered or required; nil: `on` when credentials are given, else `off`.
    public var tlsMode: TLSPolicy?
    /// TLS credentials and client checks (certificates, PSK file, verify-peer, authz, priority).
    public var tls: TLSConfiguration?
    /// A file of allowed client certificate DNs, one a line (read at startup; added to `tls`'s list).
    public var tlsAuthzFile: String?
    /// The mode in force: what was asked, or `on` when credentials were given.
    public var effectiveTLSMode: TLSPolicy { tlsMode ?? (tls == nil ? .off : .on) }
    /// The file this configuration came from; SIGHUP re-reads it.
    public var configFile: String?
    /// What the command line changes on top of the file; applied again to every reload.
    public var overrides: (@Sendable (inout ServerConfiguration) -> Void)?

    public init(exports: [ExportConfiguration]) {
        self.exports = exports
    }

    /// The one-export form the command line builds.
    public init(imagePath: String) {
        self.exports = [ExportConfiguration(name: "", imagePath: imagePath)]
    }

    /// Settings that only a restart can change (sockets are bound and privileges dropped once).
    func restartOnlyDifferences(from other: ServerConfiguration) -> [String] {
        var changed: [String] = []
        if listen != other.listen { changed.append("listen addresses") }
        if user != other.user || group != other.group { changed.append("user/group") }
        if threadPoolSize != other.threadPoolSize { changed.append("threads") }
        if aio != other.aio { changed.append("aio") }
        if effectiveLoops != other.effectiveLoops { changed.append("loops") }
        if memoryBudgetBytes != other.memoryBudgetBytes { changed.append("memory budget") }
        if effectiveTLSMode != other.effectiveTLSMode || tls != other.tls || tlsAuthzFile != other.tlsAuthzFile { changed.append("TLS settings") }
        return changed
    }
}

/// One export: the image, how it is opened, and who may use it.
public struct ExportConfiguration: Sendable, Equatable {
    /// The name clients ask for (the section name in a config file).
    public var name: String
    public var imagePath: String
    /// nil: detect from the image's magic.
    public var format: ServerConfiguration.ImageFormat?
    public var description = ""
    public var readOnly = false
    /// qcow2 metadata cache budget in bytes; nil picks one that maps the whole disk, up to 64 MiB.
    public var cacheBytes: Int?
    /// Clients of this export at once; nil: only the server-wide limit applies.
    public var maximumConnections: Int?
    /// nbd-server's authfile: addresses and networks allowed to use the export. A missing file allows
    /// everyone, an empty one nobody.
    public var authFile: String?
    /// nbd-server's trim/flush/fua/rotational: nil leaves what the driver can do; false withholds the
    /// feature from clients; true asks for it (advertised when the driver can do it; rotational always).
    public var trim: Bool?
    public var flush: Bool?
    public var fua: Bool?
    public var rotational: Bool?
    /// `tls = require`: only served over TLS (SELECTIVETLS; hidden from LIST before STARTTLS).
    public var tlsRequired = false
    /// `tls-psk-users`: the PSK usernames that may use this export (implies TLS-only).
    public var allowedPSKUsernames: [String]?
    /// Persistent bitmaps served as `qemu:dirty-bitmap:NAME` meta contexts (qemu-nbd's `-B`), in the
    /// order given. Each must exist in the image and be consistent, or the export does not open.
    public var bitmaps: [String] = []
    /// Where the export was defined ("FILE:LINE"), for messages; empty for the command line.
    public var origin = ""

    public init(name: String, imagePath: String) {
        self.name = name
        self.imagePath = imagePath
    }

    /// True when serving `other` instead needs the image reopened (everything but the origin counts).
    func differsInService(from other: ExportConfiguration) -> Bool {
        var a = self, b = other
        a.origin = ""
        b.origin = ""
        return a != b
    }
}

extension ConnectionLimits: Equatable {
    public static func == (a: ConnectionLimits, b: ConnectionLimits) -> Bool {
        a.maximumRequests == b.maximumRequests && a.maximumInFlightBytes == b.maximumInFlightBytes
            && a.handshakeTimeoutMilliseconds == b.handshakeTimeoutMilliseconds
            && a.sendTimeoutMilliseconds == b.sendTimeoutMilliseconds
    }
}
