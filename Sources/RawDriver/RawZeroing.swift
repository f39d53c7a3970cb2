// Zeroing and hole punching for raw images, run on the thread pool. Each function tries the cheapest
// primitive first and falls back, so the answer is right on any file system or block device.

import BlockDevice
import SystemCalls
import UVCore
#if canImport(Glibc)
import Glibc
#endif

enum RawZeroing {
    /// Returns 0 or -errno.
    static func zero(fd: Int32, offset: UInt64, length: UInt64, options: ZeroOptions, canPunch: Bool) -> Int {
        var done = false
        if !options.contains(.noHole) && canPunch {
            done = SystemCall.allocate(fd, mode: FallocateMode.punchHole | FallocateMode.keepSize, offset: offset, length: length) == 0
        }
        if !done {
            // ZERO_RANGE keeps the blocks allocated, which is what NO_HOLE asks for.
            done = SystemCall.allocate(fd, mode: FallocateMode.zeroRange | FallocateMode.keepSize, offset: offset, length: length) == 0
        }
        if !done {
            if options.contains(.fastZero) { return -Int(ENOTSUP) }
            let r = writeZeros(fd: fd, offset: offset, length: length)
            if r < 0 { return r }
        }
        return options.contains(.fua) ? SystemCall.dataSync(fd) : 0
    }

    /// TRIM: drop the range so it reads back as zeros and stops using space.
    static func punch(fd: Int32, offset: UInt64, length: UInt64, sync: Bool) -> Int {
        let punched = SystemCall.allocate(fd, mode: FallocateMode.punchHole | FallocateMode.keepSize, offset: offset, length: length)
        guard punched == 0 else { return punched }
        return sync ? SystemCall.dataSync(fd) : 0
    }

    private static func writeZeros(fd: Int32, offset: UInt64, length: UInt64) -> Int {
        let chunk = 1 << 20
        let zeros = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { zeros.deallocate() }
        zeros.initializeMemory(as: UInt8.self, repeating: 0)
        var position = offset
        let end = offset + length
        while position < end {
            let n = Int(min(UInt64(chunk), end - position))
            let written = SystemCall.writeFully(fd, from: zeros.baseAddress!, count: n, at: position)
            if written < 0 { return written }
            position += UInt64(n)
        }
        return 0
    }
}
