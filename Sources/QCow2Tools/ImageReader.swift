// How the offline tools reach the format layer (QCow2: probe, header, tables, snapshots, bitmaps,
// ImageMetadata) through their blocking ImageStorage, and how its errors become the tools' messages.

import QCow2

/// Image formats the tools understand.
public enum ImageFormat: String, Sendable {
    case qcow2
    case raw
}

/// Reads the first bytes and decides the format (ImageProbe); a file with another format's signature
/// is refused rather than taken for raw.
public func probeFormat(_ storage: ImageStorage, name: String) throws(ToolError) -> ImageFormat {
    switch probedFormat(storage) {
    case .qcow2: return .qcow2
    case .raw: return .raw
    case .foreign(let format):
        throw ToolError("'\(name)' is a \(format) image, which qnbd does not read; convert it with `qemu-img convert -O qcow2`")
    }
}

/// What the first bytes of the storage say, unjudged.
public func probedFormat(_ storage: ImageStorage) -> ProbedFormat {
    (try? MetadataLoader(storage: storage).probe()) ?? .raw
}

/// The tools' storage as the format layer's MetadataFile.
final class StorageFile: MetadataFile {
    let storage: ImageStorage

    init(_ storage: ImageStorage) {
        self.storage = storage
    }

    func length() throws(QCow2Error) -> UInt64 {
        do throws(ToolError) { return try storage.length() } catch { throw .io(error.message) }
    }

    func read(at offset: UInt64, count: Int) throws(QCow2Error) -> [UInt8] {
        do throws(ToolError) { return try storage.read(at: offset, count: count) } catch { throw .io(error.message) }
    }

    func write(_ bytes: [UInt8], at offset: UInt64) throws(QCow2Error) {
        do throws(ToolError) { try storage.write(bytes, at: offset) } catch { throw .io(error.message) }
    }

    func sync() throws(QCow2Error) {
        do throws(ToolError) { try storage.sync() } catch { throw .io(error.message) }
    }
}

extension MetadataLoader {
    /// A loader over the tools' blocking storage.
    public init(storage: ImageStorage) {
        self.init(file: StorageFile(storage))
    }
}

extension ImageMetadata {
    /// Opens `storage` as a qcow2 image for a tool, refusing (with `validate`) what qemu refuses at open
    /// (Header.validateOpenable); the rest is left for the tool to read or diagnose.
    static func open(_ storage: ImageStorage, name: String, validate: Bool = true) throws(ToolError) -> ImageMetadata {
        do {
            let image = try ImageMetadata(file: StorageFile(storage))
            if validate { try image.header.validateOpenable() }
            return image
        } catch {
            throw ToolError("could not open '\(name)': \(error.text)")
        }
    }
}

extension ToolError {
    /// A format-layer error as the tools print it.
    init(_ error: QCow2Error) { self.init(error.text) }
}

/// Runs a format-layer call from a tool, its error worded for the tool.
func tool<T>(_ body: () throws(QCow2Error) -> T) throws(ToolError) -> T {
    do { return try body() } catch { throw ToolError(error) }
}
