// Opens the image an export configuration names with the driver its format needs.

import BlockDevice
import QCow2
import QCow2Driver
import QCow2Tools
import RawDriver
import UVCore
#if canImport(Glibc)
import Glibc
#endif

enum ImageOpener {
    static let qcow2Magic: [UInt8] = [0x51, 0x46, 0x49, 0xfb]

    static func open(_ configuration: ExportConfiguration, io: FileIO, log: Logger) throws(ServerError) -> BlockDevice {
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
            if !configuration.readOnly && isDirty(path) { try repair(path, log: log) }
            do {
                let driver = try QCow2Driver(path: path, readOnly: configuration.readOnly, io: io,
                                             cacheBytes: configuration.cacheBytes)
                driver.onFailure = { log.error($0) }
                return driver
            } catch {
                throw ServerError(error.description)
            }
        }
    }

    /// The dirty bit: lazy refcounts were in use when the writer stopped without closing.
    private static func isDirty(_ path: String) -> Bool {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        var bytes = [UInt8](repeating: 0, count: 80)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, 80, 0) }
        guard n == 80, bytes[4..<8] == [0, 0, 0, 3] else { return false }
        return bytes[79] & UInt8(FeatureBit.dirty) != 0
    }

    /// O5: a dirty image's refcounts may be stale, so they are rebuilt from the tables before anything
    /// is allocated from them; the repair clears the dirty bit when it leaves nothing broken.
    private static func repair(_ path: String, log: Logger) throws(ServerError) {
        log.warning("\(path): the dirty bit is set (lazy refcounts, unclean stop); repairing refcounts before serving")
        let report = ImageChecker.check(path: path, repair: .all)
        let result = report.final
        guard report.failure == nil, result.corruptions == 0, !isDirty(path) else {
            let why = report.failure ?? "\(result.corruptions) errors remain"
            throw ServerError("\(path): repairing the dirty image failed (\(why)); run `qemu-img check -r all` or serve it with --read-only")
        }
        log.warning("\(path): repaired \(result.corruptionsFixed) refcount errors and \(result.leaksFixed) leaks")
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
