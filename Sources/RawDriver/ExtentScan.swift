// Block status for raw files from SEEK_DATA/SEEK_HOLE, run on the thread pool because lseek can block
// on some file systems. The result is handed back to the loop through the completion, which libuv
// orders after the work function, so the unsynchronised field is safe.

import BlockDevice
import SystemCalls
#if canImport(Glibc)
import Glibc
#endif

final class ExtentScan: @unchecked Sendable {
    let fd: Int32
    let offset: UInt64
    let length: UInt64
    let isBlockDevice: Bool
    /// Written on a pool thread, read on the loop after completion.
    private(set) var extents: [Extent] = []
    /// Enough for any client (qemu asks for one, libnbd walks); bounds the work per request.
    static let maximumExtents = 1024

    init(fd: Int32, offset: UInt64, length: UInt64, isBlockDevice: Bool) {
        self.fd = fd
        self.offset = offset
        self.length = length
        self.isBlockDevice = isBlockDevice
    }

    /// Fills `extents`; returns 0 (an lseek failure degrades to "all data", never to an error).
    func scan() -> Int {
        let end = offset + length
        let data = Extent(length: 0, flags: [], depth: 1)
        // A hole is still this file's (see Extent.depth): depth 1, like data.
        let hole = Extent(length: 0, flags: [.hole, .zero], depth: 1)
        if isBlockDevice {
            extents = [Extent(length: length, flags: [], depth: 1)]
            return 0
        }
        var position = offset
        while position < end && extents.count < Self.maximumExtents {
            let nextData = SystemCall.seekData(fd, from: position)
            if nextData < 0 {
                // ENXIO: no data at or after `position`, the rest is a hole. Anything else: say data.
                append(nextData == -Int64(ENXIO) ? hole : data, upTo: end, from: &position)
                break
            }
            if UInt64(nextData) > position {
                append(hole, upTo: min(UInt64(nextData), end), from: &position)
                continue
            }
            let nextHole = SystemCall.seekHole(fd, from: position)
            let dataEnd = nextHole < 0 ? end : min(UInt64(nextHole), end)
            append(data, upTo: max(dataEnd, position + 1), from: &position)
        }
        return 0
    }

    private func append(_ kind: Extent, upTo stop: UInt64, from position: inout UInt64) {
        let stop = min(stop, offset + length)
        guard stop > position else { return }
        if var last = extents.last, last.flags == kind.flags {
            last.length += stop - position
            extents[extents.count - 1] = last
        } else {
            extents.append(Extent(length: stop - position, flags: kind.flags, depth: kind.depth))
        }
        position = stop
    }
}
