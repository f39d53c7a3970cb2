// Reads a persistent bitmap's bits over a guest range: dirty and clean runs at the bitmap's granularity,
// as `qemu:dirty-bitmap:NAME` reports them (one bit per granule; bit k of the bitmap data is bit k % 8,
// least significant first, of byte k / 8; each table entry holds one cluster of that data).

/// One run of granules that are all dirty or all clean.
public struct BitmapRun: Equatable, Sendable {
    public var offset: UInt64
    public var length: UInt64
    public var dirty: Bool

    public init(offset: UInt64, length: UInt64, dirty: Bool) {
        self.offset = offset
        self.length = length
        self.dirty = dirty
    }
}

public final class BitmapReader {
    public let entry: BitmapEntry
    public let virtualSize: UInt64
    private let clusterSize: UInt64
    private let table: [BitmapTableEntry.Kind]
    private let read: MetadataRead
    private var cached: (offset: UInt64, bytes: [UInt8]) = (0, [])

    /// Loads and checks `entry`'s table. Refuses an in_use bitmap: its bits are not to be trusted (qemu
    /// calls it inconsistent and will not export it).
    public init(entry: BitmapEntry, header: Header, fileSize: UInt64, read: @escaping MetadataRead) throws(QCow2Error) {
        guard !entry.isInUse else {
            throw .unsupported("bitmap '\(entry.name)'", "is inconsistent (in use: the image was not closed cleanly); remove it or clear it")
        }
        try BitmapValidation.validate(entry, header: header, fileSize: fileSize)
        self.entry = entry
        virtualSize = header.size
        clusterSize = header.clusterSize
        self.read = read
        table = try BitmapValidation.table(of: entry, clusterSize: header.clusterSize, fileSize: fileSize,
                                           regions: MetadataRegions(header: header), read: read)
    }

    private var bitsPerCluster: UInt64 { clusterSize * 8 }

    /// Whether granule `index` is dirty.
    public func isDirty(granule index: UInt64) throws(QCow2Error) -> Bool {
        switch table[Int(index / bitsPerCluster)] {
        case .allZeros: return false
        case .allOnes: return true
        case .data(let offset):
            let bit = index % bitsPerCluster
            return try cluster(at: offset)[Int(bit / 8)] & (1 << UInt8(bit % 8)) != 0
        }
    }

    /// The runs covering `offset..<offset+length` (clipped to the disk), first run starting at `offset`.
    public func runs(offset: UInt64, length: UInt64) throws(QCow2Error) -> [BitmapRun] {
        let end = min(virtualSize, offset + length)
        guard offset < end else { return [] }
        let shift = UInt64(entry.granularityBits)
        var runs: [BitmapRun] = []
        var granule = offset >> shift
        let lastGranule = (end - 1) >> shift
        while granule <= lastGranule {
            let dirty = try isDirty(granule: granule)
            var next = granule + 1
            scan: while next <= lastGranule {
                // Whole clusters of one kind are skipped at once; data clusters byte by byte where uniform.
                let tableIndex = Int(next / bitsPerCluster)
                switch table[tableIndex] {
                case .allZeros where !dirty, .allOnes where dirty:
                    next = UInt64(tableIndex + 1) * bitsPerCluster
                    continue
                case .allZeros, .allOnes:
                    break
                case .data(let offset):
                    let bytes = try cluster(at: offset)
                    let bit = next % bitsPerCluster
                    if bit % 8 == 0, bytes[Int(bit / 8)] == (dirty ? 0xff : 0) {
                        next += 8
                        continue
                    }
                    if (bytes[Int(bit / 8)] & (1 << UInt8(bit % 8)) != 0) == dirty {
                        next += 1
                        continue
                    }
                }
                break scan
            }
            let start = max(offset, granule << shift)
            let stop = min(end, min(next, lastGranule + 1) << shift)
            runs.append(BitmapRun(offset: start, length: stop - start, dirty: dirty))
            granule = next
        }
        return runs
    }

    /// Every bit, one byte per 8 granules (the bitmap's data, all clusters concatenated and trimmed).
    public func allBits() throws(QCow2Error) -> [UInt8] {
        let bits = BitmapEntry.bitCount(virtualSize: virtualSize, granularityBits: entry.granularityBits)
        var out: [UInt8] = []
        out.reserveCapacity(Int(clusterSize) * table.count)
        for kind in table {
            switch kind {
            case .allZeros: out += [UInt8](repeating: 0, count: Int(clusterSize))
            case .allOnes: out += [UInt8](repeating: 0xff, count: Int(clusterSize))
            case .data(let offset): out += try read(offset, Int(clusterSize))
            }
        }
        out.removeLast(out.count - Int((bits + 7) / 8))
        if bits % 8 != 0 { out[out.count - 1] &= UInt8((1 << (bits % 8)) - 1) }
        return out
    }

    private func cluster(at offset: UInt64) throws(QCow2Error) -> [UInt8] {
        if cached.offset != offset || cached.bytes.isEmpty { cached = (offset, try read(offset, Int(clusterSize))) }
        return cached.bytes
    }
}
