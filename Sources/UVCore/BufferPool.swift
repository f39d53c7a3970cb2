// BufferPool: page-aligned I/O buffers in power-of-two size classes, reused.
//
// Classes run from 4 KiB to 64 MiB. Each slot is allocated with posix_memalign
// (page alignment suits O_DIRECT and keeps a 4 KiB block inside one page) and
// carries a 16-byte trailer after its class size: a magic number and a state
// word. `give` checks both, so handing the same buffer back twice, or handing
// back something that never came from a pool, traps instead of corrupting the
// free list (NIO's sentinel idea). The check cannot cover a buffer that was
// freed on its first give (cache full, or unpooled): its trailer is gone. Requests above 64 MiB are served unpooled and
// freed on give.
//
// Ownership. A PooledBuffer is a plain copyable value; the pool owns the memory
// and the caller owns the right to give it back once. Free slots are cached up
// to `maximumCachedBytes` in total; beyond that, given buffers are freed. The
// pool must outlive every buffer taken from it; deinit frees only cached slots.
// Loop-confined: no locks.

#if canImport(Glibc)
import Glibc
#endif

/// A buffer on loan from a `BufferPool`. Give it back exactly once.
public struct PooledBuffer {
    /// Exactly the requested number of bytes, page-aligned.
    public let bytes: UnsafeMutableRawBufferPointer
    /// Size class index, or `BufferPool.unpooledClass`.
    let sizeClass: Int
    /// Usable capacity of the slot (class size, or the rounded unpooled size).
    let capacity: Int
}

/// Per-loop cache of page-aligned buffers in power-of-two size classes (4 KiB ... 64 MiB).
public final class BufferPool {
    static let smallestShift = 12                  // 4 KiB
    static let largestShift = 26                   // 64 MiB
    static let classCount = largestShift - smallestShift + 1
    static let unpooledClass = -1
    private static let pageSize = 4096
    private static let trailerSize = 16
    private static let magic: UInt64 = 0x716E_6264_4275_6621   // "qnbdBuf!"
    private static let stateOnLoan: UInt64 = 0x4C4F_414E          // "LOAN"
    private static let stateCached: UInt64 = 0x4652_4545          // "FREE"

    // Unchecked exclusivity: take/give run twice per request and never re-enter (see FileIO).
    /// Free slots per size class.
    @exclusivity(unchecked) private var free: [[UnsafeMutableRawPointer]]
    @exclusivity(unchecked) private var cachedBytes = 0
    private let maximumCachedBytes: Int

    /// Buffers taken and not yet given back.
    @exclusivity(unchecked) public private(set) var outstandingBuffers = 0

    public init(maximumCachedBytes: Int = 256 << 20) {
        self.maximumCachedBytes = maximumCachedBytes
        free = Array(repeating: [], count: Self.classCount)
        for index in free.indices { free[index].reserveCapacity(16) }
    }

    deinit {
        for slots in free {
            for slot in slots { Glibc.free(slot) }
        }
    }

    /// Bytes currently held in the free lists.
    public var cachedByteCount: Int { cachedBytes }

    /// A page-aligned buffer of exactly `count` bytes. Never fails: allocates on a miss.
    public func take(count: Int) -> PooledBuffer {
        precondition(count >= 0, "negative buffer size \(count)")
        let sizeClass: Int
        let capacity: Int
        if count <= 1 << Self.largestShift {
            let needed = max(count, 1 << Self.smallestShift)
            let shift = Int.bitWidth - (needed - 1).leadingZeroBitCount   // ceil(log2(needed))
            sizeClass = shift - Self.smallestShift
            capacity = 1 << shift
        } else {
            sizeClass = Self.unpooledClass
            capacity = (count + Self.pageSize - 1) & ~(Self.pageSize - 1)
        }

        let base: UnsafeMutableRawPointer
        if sizeClass != Self.unpooledClass, let slot = free[sizeClass].popLast() {
            cachedBytes -= capacity
            base = slot
        } else {
            var memory: UnsafeMutableRawPointer?
            let rc = posix_memalign(&memory, Self.pageSize, capacity + Self.trailerSize)
            precondition(rc == 0 && memory != nil, "posix_memalign(\(capacity)) failed: \(rc)")
            base = memory!
            (base + capacity).storeBytes(of: Self.magic, as: UInt64.self)
        }
        (base + capacity + 8).storeBytes(of: Self.stateOnLoan, as: UInt64.self)
        outstandingBuffers += 1
        return PooledBuffer(bytes: UnsafeMutableRawBufferPointer(start: base, count: count),
                            sizeClass: sizeClass, capacity: capacity)
    }

    /// Returns a buffer. Traps if it was already given back or did not come from a pool.
    public func give(_ buffer: PooledBuffer) {
        let base = buffer.bytes.baseAddress!
        let trailer = base + buffer.capacity
        precondition(trailer.load(as: UInt64.self) == Self.magic, "BufferPool.give: not a pooled buffer")
        precondition(trailer.load(fromByteOffset: 8, as: UInt64.self) == Self.stateOnLoan,
                     "BufferPool.give: buffer given back twice")
        precondition(outstandingBuffers > 0, "BufferPool.give: more gives than takes")
        outstandingBuffers -= 1
        if buffer.sizeClass != Self.unpooledClass && cachedBytes + buffer.capacity <= maximumCachedBytes {
            trailer.storeBytes(of: Self.stateCached, toByteOffset: 8, as: UInt64.self)
            free[buffer.sizeClass].append(base)
            cachedBytes += buffer.capacity
        } else {
            trailer.storeBytes(of: 0, toByteOffset: 8, as: UInt64.self)
            Glibc.free(base)
        }
    }
}
