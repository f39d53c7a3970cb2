// What the engine asks its I/O shell to do. The engine never performs I/O: it appends actions to its
// outbox, the shell executes them (file reads on the thread pool or the page-cache fast path, backing
// reads through the backing device, decompression on the pool) and reports each completion back with
// the action's token. Tests play the shell with an in-memory file and complete actions in any order.

import BlockDevice

/// Identifies one outstanding action; completions carry it back.
public struct IOToken: Hashable, Sendable {
    public let raw: UInt32
    public init(raw: UInt32) { self.raw = raw }
}

/// A caller's request, by the tag it gave the driver.
public typealias RequestTag = UInt64

/// The compression algorithm of a compressed cluster.
public enum CompressionAlgorithm: Sendable {
    /// Raw deflate, no zlib header (qemu's "zlib").
    case deflate
    case zstd
}

public enum IOAction {
    /// Read `buffer.count` bytes of the image file at `offset` (bytes past the end of the file read as zeros).
    case readFile(IOToken, offset: UInt64, into: UnsafeMutableRawBufferPointer)
    /// Write all of `from` to the image file at `offset`; `dsync` makes it durable before completion.
    case writeFile(IOToken, offset: UInt64, from: UnsafeRawBufferPointer, dsync: Bool)
    /// fdatasync the image file.
    case syncFile(IOToken)
    /// Deallocate a byte range of the image file (it reads back as zeros).
    case punchFile(IOToken, offset: UInt64, length: UInt64)
    /// Read guest data of the backing image at `offset` (past its end: zeros).
    case readBacking(IOToken, offset: UInt64, into: UnsafeMutableRawBufferPointer)
    /// Block status of the backing image for `offset ..< offset + length`.
    case backingStatus(IOToken, offset: UInt64, length: UInt64)
    /// Decompress `source` until `destination` is full (trailing input is ignored).
    case decompress(IOToken, CompressionAlgorithm, source: UnsafeRawBufferPointer, into: UnsafeMutableRawBufferPointer)
    /// Finish the caller's request.
    case complete(RequestTag, BlockOutcome)
}

/// What a finished action produced, fed back with `QCow2Engine.completed(_:result:)`.
public enum IOResult {
    /// Success of a read, write, sync or decompression.
    case success
    /// Extents of a `backingStatus` action.
    case extents([Extent])
    /// Failure with an errno.
    case failure(Int32)
}
