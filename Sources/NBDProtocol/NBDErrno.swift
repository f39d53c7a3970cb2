// The one place where a host errno becomes an NBD error (nbdkit's nbd_errno plays the same role).

#if canImport(Glibc)
import Glibc
#endif

extension NBDErrorCode {
    /// Maps a host errno from a driver to the error the client sees. The spec allows only a few values;
    /// everything without a specific meaning for the client becomes EIO.
    public init(errno: Int32) {
        switch errno {
        case 0: self = .ok
        case EPERM, EROFS: self = .notPermitted
        case ENOSPC, EDQUOT, EFBIG: self = .noSpace
        case ENOMEM: self = .noMemory
        case EINVAL: self = .invalid
        case EOVERFLOW: self = .overflow
        case ENOTSUP, EOPNOTSUPP: self = .notSupported
        case ESHUTDOWN: self = .shutdown
        default: self = .io
        }
    }
}
