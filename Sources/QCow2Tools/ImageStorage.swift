// Where the offline tools read and write image bytes. The tools run once and exit, so plain blocking
// pread/pwrite is the right tool here (the server's libuv file layer exists for concurrency they do not
// need). The protocol lets unit tests run create, check and map on images held in memory.

import SystemCalls
#if canImport(Glibc)
import Glibc
#endif

/// Byte access to one image file.
public protocol ImageStorage: AnyObject {
    /// Current length in bytes.
    func length() throws(ToolError) -> UInt64
    /// Bytes actually allocated on the host (qemu's "disk size" / actual-size).
    func allocatedBytes() throws(ToolError) -> UInt64
    /// Reads `count` bytes at `offset`; whatever lies past the end of the file reads as zeros, as qemu's
    /// file layer does (a table that runs past EOF is then diagnosed, not a read error).
    func read(at offset: UInt64, count: Int) throws(ToolError) -> [UInt8]
    func write(_ bytes: [UInt8], at offset: UInt64) throws(ToolError)
    func truncate(to length: UInt64) throws(ToolError)
    /// Makes every write so far durable.
    func sync() throws(ToolError)
    /// Whether `offset` lies in data or in a hole, and where that run ends (nil: unknown, treat as data).
    func allocationRun(at offset: UInt64) -> (data: Bool, end: UInt64)?
}

/// A file on the host, through blocking libc calls.
public final class FileStorage: ImageStorage {
    public let path: String
    private var fd: Int32
    public let writable: Bool

    /// Linux's lseek whence values for sparse files; Swift's Glibc module does not export them.
    private static let seekData: Int32 = 3
    private static let seekHole: Int32 = 4

    public enum Mode { case readOnly, readWrite, createNew, createOrTruncate }

    public init(path: String, mode: Mode) throws(ToolError) {
        self.path = path
        let flags: Int32
        switch mode {
        case .readOnly: flags = O_RDONLY
        case .readWrite: flags = O_RDWR
        case .createNew: flags = O_RDWR | O_CREAT | O_EXCL
        case .createOrTruncate: flags = O_RDWR | O_CREAT | O_TRUNC
        }
        writable = mode != .readOnly
        fd = open(path, flags | O_CLOEXEC, 0o644)
        if fd < 0 {
            let code = errno
            if code == EEXIST {
                throw ToolError("\(path): file exists (use --force to overwrite it)")
            }
            throw ToolError("could not open '\(path)': \(errnoText(code))")
        }
    }

    deinit {
        if fd >= 0 { Glibc.close(fd) }
    }

    public func close() {
        if fd >= 0 { Glibc.close(fd) }
        fd = -1
    }

    public func length() throws(ToolError) -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw ToolError("\(path): fstat failed: \(errnoText(errno))") }
        return UInt64(st.st_size)
    }

    public func allocatedBytes() throws(ToolError) -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw ToolError("\(path): fstat failed: \(errnoText(errno))") }
        return UInt64(st.st_blocks) * 512
    }

    public func read(at offset: UInt64, count: Int) throws(ToolError) -> [UInt8] {
        guard offset <= UInt64(Int64.max) - UInt64(count) else {
            throw ToolError("\(path): read of \(count) bytes at \(offset) is beyond any file")
        }
        var out = [UInt8](repeating: 0, count: count)
        // Stops at end of file: the rest stays zero.
        let result = out.withUnsafeMutableBytes { SystemCall.read(fd, into: $0, at: offset) }
        if result < 0 {
            throw ToolError("\(path): read of \(count) bytes at \(offset) failed: \(errnoText(Int32(-result)))")
        }
        return out
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws(ToolError) {
        guard offset <= UInt64(Int64.max) - UInt64(bytes.count) else {
            throw ToolError("\(path): write of \(bytes.count) bytes at \(offset) is beyond any file")
        }
        let result = bytes.withUnsafeBytes { SystemCall.writeFully(fd, from: $0, at: offset) }
        if result < 0 {
            throw ToolError("\(path): write of \(bytes.count) bytes at \(offset) failed: \(errnoText(Int32(-result)))")
        }
    }

    public func truncate(to length: UInt64) throws(ToolError) {
        guard ftruncate(fd, off_t(length)) == 0 else {
            throw ToolError("\(path): could not set the length to \(length): \(errnoText(errno))")
        }
    }

    public func sync() throws(ToolError) {
        guard fdatasync(fd) == 0 else { throw ToolError("\(path): fdatasync failed: \(errnoText(errno))") }
    }

    public func allocationRun(at offset: UInt64) -> (data: Bool, end: UInt64)? {
        let data = lseek(fd, off_t(offset), Self.seekData)
        if data < 0 {
            // ENXIO: offset is in the trailing hole (or past EOF); anything else: no information.
            guard errno == ENXIO, let size = try? length() else { return nil }
            return (false, max(size, offset))
        }
        if UInt64(data) > offset { return (false, UInt64(data)) }
        let hole = lseek(fd, off_t(offset), Self.seekHole)
        guard hole >= 0 else { return nil }
        return (true, UInt64(hole))
    }
}

/// An image held in memory: for unit tests, and for building small images before writing them out.
public final class MemoryStorage: ImageStorage {
    public var bytes: [UInt8]
    public private(set) var syncCount = 0

    public init(bytes: [UInt8] = []) {
        self.bytes = bytes
    }

    public func length() -> UInt64 { UInt64(bytes.count) }

    /// Memory has no holes.
    public func allocatedBytes() -> UInt64 { UInt64(bytes.count) }

    public func read(at offset: UInt64, count: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        guard offset < UInt64(bytes.count) else { return out }
        let start = Int(offset)
        let n = min(count, bytes.count - start)
        out.replaceSubrange(0..<n, with: bytes[start..<(start + n)])
        return out
    }

    public func write(_ data: [UInt8], at offset: UInt64) {
        let end = Int(offset) + data.count
        if end > bytes.count { bytes += [UInt8](repeating: 0, count: end - bytes.count) }
        bytes.replaceSubrange(Int(offset)..<end, with: data)
    }

    public func truncate(to length: UInt64) {
        let n = Int(length)
        if n < bytes.count { bytes.removeSubrange(n...) } else { bytes += [UInt8](repeating: 0, count: n - bytes.count) }
    }

    public func sync() { syncCount += 1 }

    public func allocationRun(at offset: UInt64) -> (data: Bool, end: UInt64)? { nil }
}

func errnoText(_ code: Int32) -> String {
    String(cString: strerror(code))
}
