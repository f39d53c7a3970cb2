// Opens the image an export configuration names with the driver its format needs. What the file is,
// whether it is dirty and its repair all come from the qcow2 format layer (ImageProbe, Header,
// QCow2Check).

import BlockDevice
import QCow2
import QCow2Driver
import RawDriver
import UVCore

enum ImageOpener {
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

    /// The image's metadata through the format layer, read with blocking I/O (opening happens before
    /// the loop serves anyone).
    private static func withLoader<T>(_ path: String,
                                      _ body: (MetadataLoader, UInt64) throws(QCow2Error) -> T) throws(ServerError) -> T {
        do throws(QCow2Error) {
            let file = try BlockingImageFile(path: path, writable: false)
            return try body(MetadataLoader(file: file), try file.length())
        } catch {
            throw ServerError(error.structure == "file" ? error.message : "\(path): \(error)")
        }
    }

    /// The dirty bit (from the header): lazy refcounts were in use when the writer stopped without
    /// closing. An image whose header does not parse is not dirty here; the driver refuses it.
    private static func isDirty(_ path: String) -> Bool {
        (try? withLoader(path) { (loader, size) throws(QCow2Error) in try loader.header(fileSize: size).isDirty }) ?? false
    }

    /// O5: a dirty image's refcounts may be stale, so they are rebuilt from the tables before anything
    /// is allocated from them; the repair clears the dirty bit when it leaves nothing broken. It is the
    /// format layer's check and repair (QCow2Check), the one `qnbd check -r all` runs.
    private static func repair(_ path: String, log: Logger) throws(ServerError) {
        log.warning("\(path): the dirty bit is set (lazy refcounts, unclean stop); repairing refcounts before serving")
        let outcome: CheckOutcome
        do throws(QCow2Error) {
            outcome = QCow2Check.run(file: try BlockingImageFile(path: path, writable: true), name: path, repair: .all)
        } catch {
            throw ServerError(error.text)
        }
        let result = outcome.final
        guard outcome.failure == nil, result.corruptions == 0, !isDirty(path) else {
            let why = outcome.failure ?? "\(result.corruptions) errors remain"
            throw ServerError("\(path): repairing the dirty image failed (\(why)); run `qemu-img check -r all` or serve it with --read-only")
        }
        log.warning("\(path): repaired \(result.corruptionsFixed) refcount errors and \(result.leaksFixed) leaks")
    }

    /// The format from the file's first bytes (ImageProbe). Another format's signature is refused:
    /// serving it as raw would expose the container instead of the disk in it.
    private static func detect(_ path: String) throws(ServerError) -> ServerConfiguration.ImageFormat {
        let probed = try withLoader(path) { (loader, _) throws(QCow2Error) in try loader.probe() }
        switch probed {
        case .qcow2: return .qcow2
        case .raw: return .raw
        case .foreign(let name): throw ServerError(ImageProbe.refusal(path: path, format: name))
        }
    }
}

/// A startup failure, reported to the operator as one line.
public struct ServerError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
