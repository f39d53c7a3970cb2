// UVError: the one error type UVCore throws.
//
// libuv reports failure as a negative errno (UV_EOF and a few others are
// libuv's own negative codes). We keep that number unchanged, so it can be
// compared, logged and mapped to an NBD error at the edge without a table here.
// Names and messages come from uv_err_name_r/uv_strerror_r, which write into a
// caller buffer: uv_err_name would leak a malloc'd string for unknown codes.

import CLibUV

/// A libuv status code, always negative (`-errno` on Unix, or a libuv code such as `UV_EOF`).
public struct UVError: Error, Equatable, Hashable, CustomStringConvertible {
    /// The negative libuv/errno code.
    public let code: Int32

    public init(code: Int32) {
        precondition(code < 0, "UVError needs a negative status, got \(code)")
        self.code = code
    }

    /// Builds the error from a positive errno value, as `errno` or `-result` gives it.
    public init(errno: Int32) {
        self.init(code: -errno)
    }

    /// The positive errno value (meaningless for libuv-only codes such as `.eof`).
    public var errno: Int32 { -code }

    /// The symbolic name, e.g. `"EADDRINUSE"`.
    public var name: String {
        withUnsafeTemporaryAllocation(of: CChar.self, capacity: 64) { buf in
            String(cString: uv_err_name_r(code, buf.baseAddress, buf.count))
        }
    }

    /// `"EADDRINUSE: address already in use"`.
    public var description: String {
        let message = withUnsafeTemporaryAllocation(of: CChar.self, capacity: 128) { buf in
            String(cString: uv_strerror_r(code, buf.baseAddress, buf.count))
        }
        return "\(name): \(message)"
    }

    /// The peer closed its side of a stream.
    public static let eof = UVError(code: UV_EOF.rawValue)
    public static let again = UVError(code: UV_EAGAIN.rawValue)
    /// A request was cancelled, usually because its handle was closed first.
    public static let canceled = UVError(code: UV_ECANCELED.rawValue)
    public static let connectionReset = UVError(code: UV_ECONNRESET.rawValue)
    public static let brokenPipe = UVError(code: UV_EPIPE.rawValue)
    /// A read delegate handed out an empty buffer.
    public static let noBuffers = UVError(code: UV_ENOBUFS.rawValue)
    public static let addressInUse = UVError(code: UV_EADDRINUSE.rawValue)
    public static let invalidArgument = UVError(code: UV_EINVAL.rawValue)
}

/// Turns a libuv return value into a thrown error; non-negative values pass.
@inline(__always)
func check(_ rc: Int32) throws(UVError) {
    if rc < 0 { throw UVError(code: rc) }
}
