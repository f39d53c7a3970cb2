// The in-memory BlockDevice the NBDServer tests share, so a change to the BlockDevice protocol is
// followed in one test stub rather than one per suite.

import BlockDevice
#if canImport(Glibc)
import Glibc
#endif

/// A 1 MiB disk in memory. Reads complete inline; writes wait until the next flush (a write-back
/// cache), so completions arrive both inside the call and later from another request's call. Given
/// an owner thread it counts calls made on any other (ProxyDevice must hand every call over); tests
/// that only need a device's size and capabilities (the export flags, the export table) pass none.
final class MemoryDevice: BlockDevice {
    let size: UInt64 = 1 << 20
    let capabilities = BlockCapabilities(writable: true, canTrim: true, canZero: true, canFastZero: true)
    let summary = "memory"
    var bytes = [UInt8](repeating: 0, count: 1 << 20)
    let ownerThread: pthread_t?
    var wrongThreadCalls = 0
    var fuaWrites = 0
    var zeroOptions: [ZeroOptions] = []
    private var waitingWrites: [(UInt64, BlockIOHandler)] = []

    init(ownerThread: pthread_t? = nil) { self.ownerThread = ownerThread }

    private func check() {
        if let ownerThread, pthread_equal(pthread_self(), ownerThread) == 0 { wrongThreadCalls += 1 }
    }

    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, tag: UInt64, handler: BlockIOHandler) {
        check()
        bytes.withUnsafeBytes { buffer.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count])) }
        handler.blockIOCompleted(tag: tag, outcome: .read(zeroRanges: []))
    }
    func write(offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool, tag: UInt64, handler: BlockIOHandler) {
        check()
        if fua { fuaWrites += 1 }
        bytes.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + buffer.count]).copyMemory(from: buffer) }
        waitingWrites.append((tag, handler))
    }
    func writeZeroes(offset: UInt64, length: UInt64, options: ZeroOptions, tag: UInt64, handler: BlockIOHandler) {
        check()
        zeroOptions.append(options)
        for i in Int(offset)..<Int(offset + length) { bytes[i] = 0 }
        handler.blockIOCompleted(tag: tag, outcome: .done)
    }
    func trim(offset: UInt64, length: UInt64, fua: Bool, tag: UInt64, handler: BlockIOHandler) {
        writeZeroes(offset: offset, length: length, options: [], tag: tag, handler: handler)
    }
    func flush(tag: UInt64, handler: BlockIOHandler) {
        check()
        let writes = waitingWrites
        waitingWrites.removeAll()
        for (t, h) in writes { h.blockIOCompleted(tag: t, outcome: .done) }
        handler.blockIOCompleted(tag: tag, outcome: .done)
    }
    func cache(offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler) {
        check()
        handler.blockIOCompleted(tag: tag, outcome: .failed(BlockError(errno: EIO, message: "cache refused")))
    }
    func blockStatus(offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler) {
        check()
        handler.blockIOCompleted(tag: tag, outcome: .extents([Extent(length: length, flags: .zero, depth: 1)]))
    }
}
