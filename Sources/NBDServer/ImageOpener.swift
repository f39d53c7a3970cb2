// Opens the image a configuration names with the driver its format needs.

import BlockDevice
import QCow2Driver
import RawDriver
import UVCore
#if canImport(Glibc)
import Glibc
#endif

enum ImageOpener {
    static let qcow2Magic: [UInt8] = [0x51, 0x46, 0x49, 0xfb]

    static func open(_ configuration: ServerConfiguration, io: FileIO) throws(ServerError) -> BlockDevice {
        let path = configuration.imagePath
        let format: ServerConfiguration.ImageFormat
        if let f = configuration.format {
            format = f
        } else {
            format = try detect(path)
        }
        switch format {
        case .raw:
            do {
                return try RawDriver(path: path, readOnly: configuration.readOnly, io: io)
            } catch {
                throw ServerError(error.description)
            }
        case .qcow2:
            do {
                return try QCow2Driver(path: path, readOnly: configuration.readOnly, io: io,
                                       cacheBytes: configuration.cacheBytes)
            } catch {
                throw ServerError(error.description)
            }
        }
    }

    private static func detect(_ path: String) throws(ServerError) -> ServerConfiguration.ImageFormat {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw ServerError("cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { Glibc.close(fd) }
        var magic = [UInt8](repeating: 0, count: 4)
        let n = magic.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 4, 0) }
        return n == 4 && magic == qcow2Magic ? .qcow2 : .raw
    }
}

/// A startup failure, reported to the operator as one line.
public struct ServerError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
