// A persistent dirty bitmap while the image is served: its bits in memory, one per granule, marked by
// every write, zero and trim and read back as dirty/clean runs for `qemu:dirty-bitmap:NAME`.
//
// The bits are 64-bit words whose bit j of word w is granule 64w + j. Read as little-endian bytes that
// is exactly the on-disk bitmap data (bit k is bit k % 8 of byte k / 8), so loading and storing are
// byte copies. Marking sets whole words where it can: a 4 KiB write is a shift, a mask and an OR.
//
// The words live in one allocation that every copy of a LiveBitmap shares (the live bits, not a value),
// so that the write path marks through a plain pointer (`Marker`): no uniqueness check, no reference
// counting, no allocation per request. Everything runs on the engine's loop.

/// The storage of one bitmap's bits.
final class BitmapWords {
    let base: UnsafeMutablePointer<UInt64>
    let count: Int

    init(count: Int) {
        self.count = count
        base = .allocate(capacity: max(count, 1))
        base.initialize(repeating: 0, count: max(count, 1))
    }

    deinit { base.deallocate() }
}

public struct LiveBitmap {
    public let name: String
    public let granularityBits: UInt8
    /// Records writes (the auto flag).
    public let enabled: Bool
    /// In use when the image opened: the bits are unknown, nothing is marked or served, and the entry
    /// is kept as it is (in use) when the image is stored.
    public let inconsistent: Bool
    private let storage: BitmapWords
    public let virtualSize: UInt64

    /// `bytes` is the bitmap data (one bit per granule, as stored); shorter data reads as clean.
    public init(name: String, granularityBits: UInt8, enabled: Bool, inconsistent: Bool, virtualSize: UInt64,
                bytes: [UInt8] = []) {
        self.name = name
        self.granularityBits = granularityBits
        self.enabled = enabled
        self.inconsistent = inconsistent
        self.virtualSize = virtualSize
        let bits = BitmapEntry.bitCount(virtualSize: virtualSize, granularityBits: granularityBits)
        storage = BitmapWords(count: inconsistent ? 0 : Int((bits + 63) / 64))
        let count = min(bytes.count, storage.count * 8)
        if count > 0 {
            bytes.withUnsafeBytes { UnsafeMutableRawPointer(storage.base).copyMemory(from: $0.baseAddress!, byteCount: count) }
        }
        for i in 0..<storage.count { storage.base[i] = UInt64(littleEndian: storage.base[i]) }
    }

    /// One bit per granule of the virtual disk; empty for an inconsistent bitmap.
    public var words: [UInt64] { Array(UnsafeBufferPointer(start: storage.base, count: storage.count)) }

    /// Marks through a plain pointer; valid while this bitmap (any copy of it) is alive.
    public struct Marker {
        let words: UnsafeMutablePointer<UInt64>
        let granularityBits: UInt64
        let virtualSize: UInt64

        /// Marks every granule that `offset..<offset+length` touches (clipped to the disk).
        @inline(__always)
        func mark(offset: UInt64, length: UInt64) {
            let end = min(offset &+ length, virtualSize)
            guard offset < end else { return }
            let first = offset >> granularityBits
            let last = (end - 1) >> granularityBits
            let firstWord = Int(first >> 6), lastWord = Int(last >> 6)
            let low = ~UInt64(0) << (first & 63)
            let high = ~UInt64(0) >> (63 - (last & 63))
            if firstWord == lastWord {
                words[firstWord] |= low & high
                return
            }
            words[firstWord] |= low
            var i = firstWord + 1
            while i < lastWord {
                words[i] = ~0
                i += 1
            }
            words[lastWord] |= high
        }
    }

    /// The write path's handle on a recording bitmap.
    public var marker: Marker {
        precondition(!inconsistent, "an inconsistent bitmap is never marked")
        return Marker(words: storage.base, granularityBits: UInt64(granularityBits), virtualSize: virtualSize)
    }

    public var granularity: UInt64 { 1 << UInt64(granularityBits) }
    /// Whether writes mark this bitmap.
    public var records: Bool { enabled && !inconsistent }

    /// Marks every granule that `offset..<offset+length` touches (clipped to the disk).
    public func mark(offset: UInt64, length: UInt64) {
        guard !inconsistent else { return }
        marker.mark(offset: offset, length: length)
    }

    /// Whether granule `index` is dirty.
    public func isDirty(granule index: UInt64) -> Bool {
        storage.base[Int(index >> 6)] & (1 << (index & 63)) != 0
    }

    /// Dirty and clean runs from `offset` over at most `length` bytes (clipped to the disk), at most
    /// `maximumRuns` of them; the first starts at `offset`.
    public func runs(offset: UInt64, length: UInt64, maximumRuns: Int = .max) -> [BitmapRun] {
        let end = min(offset &+ length, virtualSize)
        guard offset < end, !inconsistent else { return [] }
        let shift = UInt64(granularityBits)
        let lastGranule = (end - 1) >> shift
        var runs: [BitmapRun] = []
        var granule = offset >> shift
        while granule <= lastGranule && runs.count < maximumRuns {
            let dirty = isDirty(granule: granule)
            let next = min(firstGranule(from: granule + 1, dirty: !dirty, through: lastGranule), lastGranule + 1)
            let start = max(offset, granule << shift)
            let stop = min(end, next << shift)
            runs.append(BitmapRun(offset: start, length: stop - start, dirty: dirty))
            granule = next
        }
        return runs
    }

    /// The first granule at or after `from` (and at most `through + 1`) whose bit equals `dirty`.
    private func firstGranule(from: UInt64, dirty: Bool, through: UInt64) -> UInt64 {
        var g = from
        while g <= through {
            let word = dirty ? storage.base[Int(g >> 6)] : ~storage.base[Int(g >> 6)]
            let masked = word & (~UInt64(0) << (g & 63))
            if masked != 0 { return (g & ~63) + UInt64(masked.trailingZeroBitCount) }
            g = (g & ~63) + 64
        }
        return through + 1
    }

    /// The bitmap data as stored: `byteCount` bytes (the table's clusters), bit k of the bitmap in bit
    /// k % 8 of byte k / 8, zero past the last granule.
    public func bytes(byteCount: Int) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: byteCount)
        let count = min(byteCount, storage.count * 8)
        out.withUnsafeMutableBytes { raw in
            for i in 0..<(count / 8) { raw.storeBytes(of: storage.base[i].littleEndian, toByteOffset: i * 8, as: UInt64.self) }
            if count % 8 != 0 {
                let last = storage.base[count / 8].littleEndian
                withUnsafeBytes(of: last) { raw.baseAddress!.advanced(by: count & ~7).copyMemory(from: $0.baseAddress!, byteCount: count % 8) }
            }
        }
        return out
    }
}
