// The one place where qnbd's own file syscalls retry.
//
// Every loop that repeats a call on EINTR, or goes on after a short read or write, lives here, so the
// rules are written once: EINTR is retried; a read that reaches end of file stops (and `readFully`
// fills the rest with zeros, since images read as zero-extended); a write that makes no progress and
// reports no error is an EIO instead of a spin. Results are byte counts or -errno, the convention of
// libuv and the BlockDevice layer, so callers on the thread pool can hand them back as they are.
//
// The calls themselves come from CSystem (Linux calls Swift's Glibc module hides) and Glibc.

import CSystem
#if canImport(Glibc)
import Glibc
#endif

public enum SystemCall {
    /// Reads `count` bytes at `offset`; what lies past end of file reads as zeros. Returns `count` or
    /// -errno.
    public static func readFully(_ fd: Int32, into buffer: UnsafeMutableRawPointer, count: Int, at offset: UInt64) -> Int {
        let got = read(fd, into: buffer, count: count, at: offset)
        guard got >= 0 else { return got }
        if got < count { (buffer + got).initializeMemory(as: UInt8.self, repeating: 0, count: count - got) }
        return count
    }

    /// Reads up to `count` bytes at `offset`, stopping early only at end of file. Returns the bytes
    /// read or -errno.
    public static func read(_ fd: Int32, into buffer: UnsafeMutableRawPointer, count: Int, at offset: UInt64) -> Int {
        var done = 0
        while done < count {
            let n = pread(fd, buffer + done, count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                return -Int(errno)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Writes all `count` bytes at `offset` with pwritev2 `flags` (0, or `WriteFlags.dsync`). Returns
    /// `count` or -errno.
    public static func writeFully(_ fd: Int32, from buffer: UnsafeRawPointer, count: Int, at offset: UInt64,
                                  flags: Int32 = 0) -> Int {
        repeatUntilAllWritten(count) { done in
            var iov = iovec(iov_base: UnsafeMutableRawPointer(mutating: buffer) + done, iov_len: count - done)
            return csystem_pwritev2(fd, &iov, 1, off_t(offset) + off_t(done), flags)
        }
    }

    /// Writes all `count` bytes to a descriptor without a file offset (a pipe, a terminal, a log),
    /// with write(2). Returns `count` or -errno.
    public static func writeStream(_ fd: Int32, from buffer: UnsafeRawPointer, count: Int) -> Int {
        repeatUntilAllWritten(count) { done in write(fd, buffer + done, count - done) }
    }

    // Buffer forms for callers holding Swift arrays: an empty buffer has no base address and
    // transfers nothing.

    /// `read(_:into:count:at:)` over a whole buffer.
    public static func read(_ fd: Int32, into buffer: UnsafeMutableRawBufferPointer, at offset: UInt64) -> Int {
        guard let base = buffer.baseAddress, !buffer.isEmpty else { return 0 }
        return read(fd, into: base, count: buffer.count, at: offset)
    }

    /// `writeFully(_:from:count:at:flags:)` over a whole buffer.
    public static func writeFully(_ fd: Int32, from buffer: UnsafeRawBufferPointer, at offset: UInt64) -> Int {
        guard let base = buffer.baseAddress, !buffer.isEmpty else { return 0 }
        return writeFully(fd, from: base, count: buffer.count, at: offset)
    }

    /// `writeStream(_:from:count:)` over a whole buffer.
    public static func writeStream(_ fd: Int32, from buffer: UnsafeRawBufferPointer) -> Int {
        guard let base = buffer.baseAddress, !buffer.isEmpty else { return 0 }
        return writeStream(fd, from: base, count: buffer.count)
    }

    /// The loop both whole-buffer writes share: `step(done)` writes from byte `done` on and returns
    /// what write(2) does. EINTR retries; a step that makes no progress and reports no error is EIO
    /// rather than a spin. Returns `count` or -errno.
    @inline(__always)
    private static func repeatUntilAllWritten(_ count: Int, _ step: (_ done: Int) -> Int) -> Int {
        var done = 0
        while done < count {
            let n = step(done)
            if n < 0 {
                if errno == EINTR { continue }
                return -Int(errno)
            }
            if n == 0 { return -Int(EIO) }
            done += n
        }
        return count
    }

    /// Reads the whole of a small file (a config file, an authfile, a key file): opens `path`, reads
    /// to end of file with read(2), so pipes and /dev/stdin work too, and closes it. A file holding
    /// more than `limit` bytes is refused after reading at most one chunk past the limit, so a path
    /// that names a disk image by mistake costs no more than that. Throws rather than returning
    /// -errno: its callers run at startup or reload and report to an operator, not to the pool.
    public static func readSmallFile(_ path: String, limit: Int) throws(SmallFileError) -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw SmallFileError(path: path, reason: .cannotOpen(errno: errno)) }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
            if n < 0 {
                if errno == EINTR { continue }
                throw SmallFileError(path: path, reason: .cannotRead(errno: errno))
            }
            if n == 0 { return bytes }
            bytes += chunk[0..<n]
            if bytes.count > limit { throw SmallFileError(path: path, reason: .tooLarge(limit: limit)) }
        }
    }

    /// One preadv2(RWF_NOWAIT): the bytes the page cache holds (0 at end of file) or -errno (-EAGAIN:
    /// not cached; -EOPNOTSUPP: the file system cannot say). Short counts are the caller's to finish.
    public static func readWithoutBlocking(_ fd: Int32, into buffer: UnsafeMutableRawPointer, count: Int,
                                           at offset: UInt64) -> Int {
        var iov = iovec(iov_base: buffer, iov_len: count)
        while true {
            let n = csystem_preadv2(fd, &iov, 1, off_t(offset), IOFlags.noWait)
            if n >= 0 { return n }
            if errno != EINTR { return -Int(errno) }
        }
    }

    /// One pwritev2(RWF_NOWAIT): the bytes written without blocking or -errno (ext4 answers
    /// -EOPNOTSUPP for every buffered write). Short counts are the caller's to finish.
    public static func writeWithoutBlocking(_ fd: Int32, from buffer: UnsafeRawPointer, count: Int,
                                            at offset: UInt64) -> Int {
        var iov = iovec(iov_base: UnsafeMutableRawPointer(mutating: buffer), iov_len: count)
        while true {
            let n = csystem_pwritev2(fd, &iov, 1, off_t(offset), IOFlags.noWait)
            if n >= 0 { return n }
            if errno != EINTR { return -Int(errno) }
        }
    }

    /// fdatasync(2). Returns 0 or -errno.
    public static func dataSync(_ fd: Int32) -> Int {
        retrying { fdatasync(fd) }
    }

    /// fallocate(2) with `FallocateMode` bits. Returns 0 or -errno.
    public static func allocate(_ fd: Int32, mode: Int32, offset: UInt64, length: UInt64) -> Int {
        retrying { csystem_fallocate(fd, mode, off_t(offset), off_t(length)) }
    }

    /// The first byte of data at or after `offset` (lseek SEEK_DATA), or -errno (-ENXIO: none).
    public static func seekData(_ fd: Int32, from offset: UInt64) -> Int64 {
        let r = lseek(fd, off_t(offset), csystem_seek_data)
        return r < 0 ? -Int64(errno) : Int64(r)
    }

    /// The first hole at or after `offset` (lseek SEEK_HOLE; end of file counts as one), or -errno.
    public static func seekHole(_ fd: Int32, from offset: UInt64) -> Int64 {
        let r = lseek(fd, off_t(offset), csystem_seek_hole)
        return r < 0 ? -Int64(errno) : Int64(r)
    }

    /// The size of a block device in bytes, or -errno.
    public static func blockDeviceSize(_ fd: Int32) -> Int64 {
        var bytes: UInt64 = 0
        return csystem_block_device_size(fd, &bytes) == 0 ? Int64(bytes) : -Int64(errno)
    }

    /// Runs a call that returns 0 or -1 with errno until it is not interrupted. Returns 0 or -errno.
    @inline(__always)
    public static func retrying(_ call: () -> Int32) -> Int {
        while true {
            if call() == 0 { return 0 }
            if errno != EINTR { return -Int(errno) }
        }
    }
}

/// Why `SystemCall.readSmallFile` gave up. Callers word their own messages from `reason`; the
/// description is a fallback that names the path.
public struct SmallFileError: Error, Equatable, CustomStringConvertible {
    public enum Reason: Equatable, Sendable {
        case cannotOpen(errno: Int32)
        case cannotRead(errno: Int32)
        case tooLarge(limit: Int)
    }

    public let path: String
    public let reason: Reason

    public init(path: String, reason: Reason) {
        self.path = path
        self.reason = reason
    }

    /// strerror's text for the errno of a failed open or read; empty for `tooLarge`.
    public var systemMessage: String {
        switch reason {
        case .cannotOpen(let code), .cannotRead(let code): String(cString: strerror(code))
        case .tooLarge: ""
        }
    }

    public var description: String {
        switch reason {
        case .cannotOpen: "\(path): cannot open: \(systemMessage)"
        case .cannotRead: "\(path): cannot read: \(systemMessage)"
        case .tooLarge(let limit): "\(path): larger than \(limit) bytes"
        }
    }
}

/// Linux FALLOC_FL_* bits for `SystemCall.allocate` and `FileIO.fallocate`.
public enum FallocateMode {
    public static let keepSize = csystem_falloc_keep_size
    /// Deallocate the range; must be combined with keepSize.
    public static let punchHole = csystem_falloc_punch_hole
    public static let zeroRange = csystem_falloc_zero_range
}

/// pwritev2/preadv2 flags.
public enum IOFlags {
    /// The write is durable when it returns (FUA).
    public static let dsync = csystem_rwf_dsync
    /// Fail with EAGAIN instead of blocking (page-cache hits only).
    public static let noWait = csystem_rwf_nowait
}

/// lseek whence values that Swift's Glibc module does not export.
public enum SeekWhence {
    public static let data = csystem_seek_data
    public static let hole = csystem_seek_hole
}
