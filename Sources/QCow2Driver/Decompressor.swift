// Inflating compressed qcow2 clusters. Runs on a thread-pool thread, touching only the two buffers it
// is given. Both decoders stop once a whole cluster has been produced: qcow2 descriptors round the
// compressed length up to a sector, so trailing bytes belong to the neighbouring cluster.

import CZlib
import CZstd
import QCow2

enum Decompressor {
    /// Returns 0 when `destination` was filled, -EIO otherwise.
    static func run(_ algorithm: CompressionAlgorithm, source: UnsafeRawBufferPointer,
                    into destination: UnsafeMutableRawBufferPointer) -> Int {
        switch algorithm {
        case .deflate: return inflateRaw(source, destination)
        case .zstd: return decompressZstd(source, destination)
        }
    }

    private static func inflateRaw(_ source: UnsafeRawBufferPointer, _ destination: UnsafeMutableRawBufferPointer) -> Int {
        var stream = z_stream()
        // -15: raw deflate with the largest window, a superset of the 4 KiB window qemu writes with.
        guard inflateInit2_(&stream, -15, ZLIB_VERSION, Int32(MemoryLayout<z_stream>.size)) == Z_OK else { return -5 }
        defer { inflateEnd(&stream) }
        stream.next_in = UnsafeMutablePointer(mutating: source.baseAddress?.assumingMemoryBound(to: UInt8.self))
        stream.avail_in = UInt32(source.count)
        stream.next_out = destination.baseAddress?.assumingMemoryBound(to: UInt8.self)
        stream.avail_out = UInt32(destination.count)
        let status = inflate(&stream, Z_FINISH)
        // A full output buffer is success even if the stream goes on (Z_BUF_ERROR/Z_OK), as in qemu.
        if stream.avail_out == 0 && (status == Z_STREAM_END || status == Z_OK || status == Z_BUF_ERROR) { return 0 }
        return -5
    }

    private static func decompressZstd(_ source: UnsafeRawBufferPointer, _ destination: UnsafeMutableRawBufferPointer) -> Int {
        guard let context = ZSTD_createDStream() else { return -5 }
        defer { ZSTD_freeDStream(context) }
        var input = ZSTD_inBuffer(src: source.baseAddress, size: source.count, pos: 0)
        var output = ZSTD_outBuffer(dst: destination.baseAddress, size: destination.count, pos: 0)
        while output.pos < output.size {
            let before = (input.pos, output.pos)
            let r = ZSTD_decompressStream(context, &output, &input)
            if ZSTD_isError(r) != 0 { return -5 }
            if r == 0 { break }   // end of frame
            if before == (input.pos, output.pos) { return -5 }   // no progress: truncated input
        }
        return output.pos == output.size ? 0 : -5
    }
}
