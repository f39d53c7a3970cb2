// An image file as the offline parts of the format layer see it: `qnbd check` and its repair, `info`,
// `map`, and the repair of a dirty image before it is served. Blocking byte access, provided by whoever
// holds the file (the tools' storage, the driver's open-time file, memory in tests); the format layer
// itself does no I/O.

public protocol MetadataFile: AnyObject {
    /// Current length in bytes.
    func length() throws(QCow2Error) -> UInt64
    /// `count` bytes at `offset`; bytes past the end of the file read as zeros (qemu's file layer does
    /// the same, so a table that runs past EOF is diagnosed rather than failing the read).
    func read(at offset: UInt64, count: Int) throws(QCow2Error) -> [UInt8]
    func write(_ bytes: [UInt8], at offset: UInt64) throws(QCow2Error)
    /// Makes every write so far durable.
    func sync() throws(QCow2Error)
}

extension QCow2Error {
    /// A failed read, write or sync of the image file (as opposed to bad metadata in it).
    public static func io(_ message: String) -> QCow2Error { QCow2Error("file", message, corrupt: false) }

    /// The message alone for file errors (they already name the file), else the full description.
    public var text: String { structure == "file" ? message : description }
}

extension MetadataLoader {
    /// A loader reading through `file`.
    public init(file: MetadataFile) {
        self.init { (offset, count) throws(QCow2Error) in try file.read(at: offset, count: count) }
    }
}
