// Opens the image an export configuration names with the driver its format needs. What the file is,
// whether it is dirty and its repair all come from the qcow2 format layer (ImageProbe, Header,
// QCow2Check). The test taps (fault rules, write log) go into the driver of the image itself, never
// into its backing chain.

import BlockDevice
import QCow2
import QCow2Driver
import RawDriver
import Synchronization
import UVCore

enum ImageOpener {
    static func open(_ configuration: ExportConfiguration, io: FileIO, taps: TestTaps,
                     log: Logger) throws(ServerError) -> BlockDevice {
        let path = configuration.imagePath
        try checkBitmapNames(configuration.bitmaps)
        if let make = registeredDevices.withLock({ $0[path] }) {
            let device = make(io)
            try checkBitmaps(configuration.bitmaps, of: device, path: path)
            return device
        }
        let format: ServerConfiguration.ImageFormat
        if let f = configuration.format {
            format = f
        } else {
            format = try detect(path)
        }
        switch format {
        case .raw:
            // Checked before opening: a raw file keeps no bitmaps (qemu-nbd's words for it).
            if let name = configuration.bitmaps.first {
                throw ServerError("Bitmap '\(name)' is not found: \(path) is a raw image, and only qcow2 images keep persistent bitmaps")
            }
            do {
                return try RawDriver(path: path, readOnly: configuration.readOnly, io: io, faults: taps.makeFaultInjector())
            } catch {
                throw ServerError(error.description)
            }
        case .qcow2:
            // Checked before opening as well as after: a mistyped name must not cost the image a
            // writable open (which marks its enabled bitmaps in use until the clean close).
            if !configuration.bitmaps.isEmpty { try checkBitmapsInFile(configuration.bitmaps, path: path) }
            if !configuration.readOnly && isDirty(path) { try repair(path, log: log) }
            let driver: QCow2Driver
            do {
                driver = try QCow2Driver(path: path, readOnly: configuration.readOnly, io: io,
                                         cacheBytes: configuration.cacheBytes, faults: taps.makeFaultInjector(),
                                         writeLog: taps.writeLog)
                driver.onFailure = { log.error($0) }
            } catch {
                throw ServerError(error.description)
            }
            try checkBitmaps(configuration.bitmaps, of: driver, path: path)
            return driver
        }
    }

    /// Devices tests serve instead of opening a file, by image path (a device built on the loop's
    /// FileIO, so it completes on the loop thread like a driver).
    static let registeredDevices = Mutex<[String: @Sendable (FileIO) -> BlockDevice]>([:])

    // MARK: - Bitmaps (`--bitmap NAME`, qemu-nbd's `-B`)

    private static func checkBitmapNames(_ names: [String]) throws(ServerError) {
        var seen = Set<String>()
        for name in names where !seen.insert(name).inserted {
            throw ServerError("Bitmap '\(name)' is named twice; give each bitmap once")
        }
    }

    /// The names against the image's bitmap directory as the format layer reads it.
    private static func checkBitmapsInFile(_ names: [String], path: String) throws(ServerError) {
        let entries = try withLoader(path) { (loader, size) throws(QCow2Error) in
            try BitmapValidation.load(header: try loader.header(fileSize: size), fileSize: size, read: loader.read)
        }
        for name in names {
            guard let entry = entries.first(where: { $0.name == name }) else {
                throw ServerError(notFound(name, path: path, known: entries.map(\.name)))
            }
            if entry.isInUse { throw ServerError(inconsistent(name, path: path)) }
        }
    }

    /// The names against what the opened device serves; the device is what answers BLOCK_STATUS.
    private static func checkBitmaps(_ names: [String], of device: BlockDevice, path: String) throws(ServerError) {
        guard !names.isEmpty else { return }
        guard let keeper = device as? DirtyBitmapDevice else {
            throw ServerError("Bitmap '\(names[0])' is not found: \(device.summary) serves no persistent bitmaps")
        }
        let bitmaps = keeper.dirtyBitmaps
        for name in names {
            guard let bitmap = bitmaps.first(where: { $0.name == name }) else {
                throw ServerError(notFound(name, path: path, known: bitmaps.map(\.name)))
            }
            if bitmap.inconsistent { throw ServerError(inconsistent(name, path: path)) }
        }
    }

    private static func notFound(_ name: String, path: String, known: [String]) -> String {
        let listed = known.isEmpty ? "it has none" : "it has " + known.map { "'\($0)'" }.joined(separator: ", ")
        return "Bitmap '\(name)' is not found in \(path) (\(listed))"
    }

    private static func inconsistent(_ name: String, path: String) -> String {
        "Bitmap '\(name)' is inconsistent and cannot be used: \(path) was not closed cleanly by its last writer; "
            + "remove it (qnbd bitmap --remove \(path) \(name)) and take a full backup"
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
