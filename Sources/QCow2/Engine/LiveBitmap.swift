// A persistent dirty bitmap while the image is served: its bits in memory, one per granule, marked by
// every write, zero and trim and read back as dirty/clean runs for `qemu:dirty-bitmap:NAME`.
//
// The bits are 64-bit words whose bit j of word w is granule 64w + j. Read as little-endian bytes that
// is exactly the on-disk bitmap data (bit k is bit k % 8 of byte k / 8), so loading and storing are
// byte copies. Marking sets whole words where it can: a 4 KiB write is a shift, a mask and an OR.

public struct LiveBitmap: Sendable {
    public let name: String
    public let granularityBits: UInt8
    /// Records writes (the auto flag).
    public let enabled: Bool
    /// In use when the image opened: the bits are unknown, nothing is marked or served, and the entry
    /// is kept as it is (in use) when the image is stored.
    public let inconsistent: Bool
    /// One bit per granule of the virtual disk; empty for an inconsistent bitmap.
    public private(set) var words: [UInt64]
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
        var words = [UInt64](repeating: 0, count: inconsistent ? 0 : Int((bits + 63) / 64))
        let count = min(bytes.count, words.count * 8)
        words.withUnsafeMutableBytes { raw in
            bytes.withUnsafeBytes { raw.baseAddress!.copyMemory(from: $0.baseAddress!, byteCount: count) }
        }
        for i in words.indices { words[i] = UInt64(littleEndian: words[i]) }
        self.words = words
    }

    public var granularity: UInt64 { 1 << UInt64(granularityBits) }
    /// Whether writes mark this bitmap.
    public var records: Bool { enabled && !inconsistent }

    /// Marks every granule that `offset..<offset+length` touches (clipped to the disk).
    @inline(__always)
    public mutating func mark(offset: UInt64, length: UInt64) {
        let end = min(offset &+ length, virtualSize)
        guard offset < end else { return }
        let first = offset >> UInt64(granularityBits)
        let last = (end - 1) >> UInt64(granularityBits)
        words.withUnsafeMutableBufferPointer { w in
            let firstWord = Int(first >> 6), lastWord = Int(last >> 6)
            let low = ~UInt64(0) << (first & 63)
            let high = ~UInt64(0) >> (63 - (last & 63))
            if firstWord == lastWord {
                w[firstWord] |= low & high
                return
            }
            w[firstWord] |= low
            var i = firstWord + 1
            while i < lastWord {
                w[i] = ~0
                i += 1
            }
            w[lastWord] |= high
        }
    }

    /// Whether granule `index` is dirty.
    public func isDirty(granule index: UInt64) -> Bool {
        words[Int(index >> 6)] & (1 << (index & 63)) != 0
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
            let word = dirty ? words[Int(g >> 6)] : ~words[Int(g >> 6)]
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
        let count = min(byteCount, words.count * 8)
        out.withUnsafeMutableBytes { raw in
            for i in 0..<(count / 8) { raw.storeBytes(of: words[i].littleEndian, toByteOffset: i * 8, as: UInt64.self) }
            if count % 8 != 0 {
                let last = words[count / 8].littleEndian
                withUnsafeBytes(of: last) { raw.baseAddress!.advanced(by: count & ~7).copyMemory(from: $0.baseAddress!, byteCount: count % 8) }
            }
        }
        return out
    }
}
