// An image file with blocking reads and writes, for what happens before the loop serves anyone:
// reading metadata at open and repairing a dirty image (QCow2Check). The format layer reaches it as a
// MetadataFile.

import QCow2
import SystemCalls
#if canImport(Glibc)
import Glibc
#endif

public final class BlockingImageFile: MetadataFile {
    public let path: String
    private let fd: Int32

    public init(path: String, writable: Bool) throws(QCow2Error) {
        self.path = path
        fd = Glibc.open(path, (writable ? O_RDWR : O_RDONLY) | O_CLOEXEC)
        guard fd >= 0 else { throw .io("cannot open \(path): \(String(cString: strerror(errno)))") }
    }

    deinit { Glibc.close(fd) }

    public func length() throws(QCow2Error) -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw failure("stat") }
        return UInt64(st.st_size)
    }

    public func read(at offset: UInt64, count: Int) throws(QCow2Error) -> [UInt8] {
        guard offset <= UInt64(Int64.max) - UInt64(count) else { throw .io("\(path): read at \(offset) is beyond any file") }
        var bytes = [UInt8](repeating: 0, count: count)
        // Stops at end of file: the rest stays zero.
        let result = bytes.withUnsafeMutableBytes { SystemCall.read(fd, into: $0, at: offset) }
        if result < 0 { throw failure("read of \(count) bytes at \(offset)", errno: Int32(-result)) }
        return bytes
    }

    public func write(_ bytes: [UInt8], at offset: UInt64) throws(QCow2Error) {
        guard offset <= UInt64(Int64.max) - UInt64(bytes.count) else { throw .io("\(path): write at \(offset) is beyond any file") }
        let result = bytes.withUnsafeBytes { SystemCall.writeFully(fd, from: $0, at: offset) }
        if result < 0 { throw failure("write of \(bytes.count) bytes at \(offset)", errno: Int32(-result)) }
    }

    public func sync() throws(QCow2Error) {
        guard fdatasync(fd) == 0 else { throw failure("fdatasync") }
    }

    private func failure(_ what: String, errno code: Int32 = errno) -> QCow2Error {
        .io("\(path): \(what) failed: \(String(cString: strerror(code)))")
    }
}
