// Cluster allocation for offline commands that add structures to an existing image (`qnbd bitmap`):
// first fit over the on-disk refcounts, refcount blocks created where a new cluster has none (placed in
// the first free cluster, covering itself when it must), changes kept in memory until `commit`. The
// refcount table is not grown offline; an image whose table is full is refused with a message.
//
// Ordering (the caller's part, as in qemu): allocate, write the new structures, `commit` (refcount
// blocks, then table entries, each synced) before anything durable points at them; free the old
// structures only after the pointer switch is durable, then `commit` again.

public final class OfflineAllocator {
    public let image: ImageMetadata
    private let file: MetadataFile
    private let geometry: Geometry
    private var reftable: [UInt64]
    private var blocks: [Int: [UInt8]] = [:]
    private var dirtyBlocks = Set<Int>()
    private var dirtyTableEntries = Set<Int>()
    /// Clusters at or past this index are past the end of the file (free, no refcount yet).
    private var endCluster: UInt64
    private var searchFrom: UInt64 = 1

    public init(image: ImageMetadata) throws(QCow2Error) {
        self.image = image
        file = image.file
        geometry = image.geometry
        reftable = try image.reftable()
        endCluster = (image.fileLength + image.clusterSize - 1) / image.clusterSize
        guard !image.header.isDirty else {
            throw .unsupported("header", "the image is dirty (lazy refcounts); repair it first with `qnbd check -r all`")
        }
        guard !image.header.isCorrupt else {
            throw .unsupported("header", "the image is marked corrupt; repair it first with `qnbd check -r all`")
        }
    }

    private var cs: UInt64 { geometry.clusterSize }

    private func block(_ index: Int) throws(QCow2Error) -> [UInt8]? {
        if let b = blocks[index] { return b }
        guard index < reftable.count else { return nil }
        let offset = reftable[index] & RefcountTableEntry.offsetMask
        guard offset != 0 else { return nil }
        guard offset % cs == 0, reftable[index] & RefcountTableEntry.reserved == 0 else {
            throw QCow2Error("refcount table entry \(index)", "block offset \(hex(offset)) is not cluster aligned")
        }
        let bytes = try image.loader.refcountBlock(at: offset, geometry: geometry)
        blocks[index] = bytes
        return bytes
    }

    /// The refcount of host cluster `cluster`, with this session's changes.
    public func refcount(ofCluster cluster: UInt64) throws(QCow2Error) -> UInt64 {
        let (index, slot) = geometry.refcountPosition(ofCluster: cluster)
        guard let b = try block(index) else { return 0 }
        return b.withUnsafeBytes { RefcountEntry.get($0, index: slot, order: geometry.refcountOrder) }
    }

    private func setRefcount(ofCluster cluster: UInt64, _ value: UInt64) throws(QCow2Error) {
        let (index, slot) = geometry.refcountPosition(ofCluster: cluster)
        guard var b = try block(index) else {
            throw QCow2Error("refcount table", "no refcount block covers cluster \(hex(cluster * cs))")
        }
        b.withUnsafeMutableBytes { RefcountEntry.set($0, index: slot, order: geometry.refcountOrder, value: value) }
        blocks[index] = b
        dirtyBlocks.insert(index)
    }

    private func hasBlock(_ cluster: UInt64) throws(QCow2Error) -> Bool {
        try block(geometry.refcountPosition(ofCluster: cluster).table) != nil
    }

    /// `count` contiguous new clusters, refcount 1; returns the first one's offset.
    public func allocate(clusters count: UInt64) throws(QCow2Error) -> UInt64 {
        precondition(count > 0)
        while true {
            let start = try freeRun(count)
            var missing: UInt64?
            for c in start..<(start + count) where try !hasBlock(c) {
                missing = c
                break
            }
            if let missing {
                try createBlock(index: geometry.refcountPosition(ofCluster: missing).table, at: start)
                continue
            }
            for c in start..<(start + count) { try setRefcount(ofCluster: c, 1) }
            endCluster = max(endCluster, start + count)
            return start * cs
        }
    }

    /// Drops one reference to each of `count` clusters at `offset` (after nothing durable points there).
    public func free(_ offset: UInt64, clusters count: UInt64) throws(QCow2Error) {
        for c in (offset / cs)..<(offset / cs + count) {
            let current = try refcount(ofCluster: c)
            guard current > 0 else { throw QCow2Error("refcount block", "freeing cluster \(hex(c * cs)), which is already free") }
            try setRefcount(ofCluster: c, current - 1)
            searchFrom = min(searchFrom, c)
        }
    }

    /// Makes the refcount changes durable: blocks first, then the table entries that point at new blocks.
    public func commit() throws(QCow2Error) {
        guard !dirtyBlocks.isEmpty || !dirtyTableEntries.isEmpty else { return }
        for index in dirtyBlocks.sorted() {
            try file.write(blocks[index]!, at: reftable[index] & RefcountTableEntry.offsetMask)
        }
        try file.sync()
        if !dirtyTableEntries.isEmpty {
            for index in dirtyTableEntries.sorted() {
                var word = [UInt8](repeating: 0, count: 8)
                word.setBE64(reftable[index], at: 0)
                try file.write(word, at: image.header.refcountTableOffset + UInt64(index) * 8)
            }
            try file.sync()
        }
        dirtyBlocks = []
        dirtyTableEntries = []
        image.forgetRefcounts()
    }

    /// The first run of `count` free clusters (first fit), past the end of the file when none is inside.
    private func freeRun(_ count: UInt64) throws(QCow2Error) -> UInt64 {
        var start = searchFrom
        var c = searchFrom
        while c < endCluster {
            if try refcount(ofCluster: c) != 0 {
                c += 1
                start = c
                continue
            }
            c += 1
            if c - start == count { break }
        }
        if c - start < count { start = max(start, endCluster) }
        if count == 1 { searchFrom = start + 1 }
        return start
    }

    private func createBlock(index: Int, at cluster: UInt64) throws(QCow2Error) {
        guard index < reftable.count else {
            throw .unsupported("refcount table", "is full (\(reftable.count) entries); qnbd does not grow it offline")
        }
        blocks[index] = [UInt8](repeating: 0, count: Int(cs))
        reftable[index] = cluster * cs
        dirtyTableEntries.insert(index)
        try setRefcount(ofCluster: cluster, 1)
        endCluster = max(endCluster, cluster + 1)
    }
}
