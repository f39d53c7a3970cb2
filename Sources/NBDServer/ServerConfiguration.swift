// Everything `qnbd serve` can be told, as plain data the command line (or a config file) fills in.

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

    public var imagePath: String
    /// nil: detect from the image's magic.
    public var format: ImageFormat?
    public var exportName = ""
    public var description = ""
    public var readOnly = false
    public var listen: [ListenAddress] = []
    public var maximumConnections = 128
    public var pidFile: String?
    public var logLevel: Logger.Level = .info
    public var threadPoolSize = 16
    /// qcow2 metadata cache budget in bytes; nil picks one that maps the whole disk, up to 64 MiB.
    public var cacheBytes: Int?
    public var connectionLimits = ConnectionLimits()
    /// Request and reply bytes all connections together may hold before they stop reading.
    public var memoryBudgetBytes = 256 << 20

    public init(imagePath: String) {
        self.imagePath = imagePath
    }
}
