// How the format layer reads an image: through a closure over the file's bytes, so the same parsing
// serves the tools (blocking pread), the opener and the driver's open (pread before the loop runs), and
// unit tests (bytes in memory). Bytes past the end of the file read as zeros, as in qemu's file layer.

/// Reads `count` bytes of the image file at `offset`.
public typealias MetadataRead = (_ offset: UInt64, _ count: Int) throws(QCow2Error) -> [UInt8]
