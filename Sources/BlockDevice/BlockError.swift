// Driver failures carry an errno so that one table at the protocol edge can map them to NBD errors.

#if canImport(Glibc)
import Glibc
#endif

/// A failed block operation: an errno plus, where it helps the operator, a message for the log.
public struct BlockError: Error, Equatable, Sendable, CustomStringConvertible {
    public let errno: Int32
    public let message: String?

    public init(errno: Int32, message: String? = nil) {
        self.errno = errno
        self.message = message
    }

    public static let io = BlockError(errno: EIO)
    public static let noSpace = BlockError(errno: ENOSPC)
    public static let notSupported = BlockError(errno: ENOTSUP)
    public static let invalid = BlockError(errno: EINVAL)
    public static let readOnly = BlockError(errno: EROFS)
    public static let shuttingDown = BlockError(errno: ESHUTDOWN)

    public var description: String {
        let text = String(cString: strerror(errno))
        if let message { return "\(message): \(text)" }
        return text
    }
}
