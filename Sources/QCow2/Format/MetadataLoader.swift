// Loading an image's metadata through a MetadataRead closure: the header, the L1 table, the refcount
// table and blocks. The tools (blocking pread), the opener and the driver's open (pread before the loop
// runs) and the unit tests (memory) all load through this, so each structure is read one way.

public struct MetadataLoader {
    public let read: MetadataRead

    public init(read: @escaping MetadataRead) {
        self.read = read
    }

    /// What the first bytes of the file are (ImageProbe).
    public func probe() throws(QCow2Error) -> ProbedFormat {
        ImageProbe.probe(try read(0, ImageProbe.bytesNeeded))
    }

    /// Reads and parses the header from cluster 0 (`fileSize`: the file's length; a shorter file is
    /// parsed as far as it goes). Parsing only: `Header.validateOpenable` and `validate` judge it.
    public func header(fileSize: UInt64) throws(QCow2Error) -> Header {
        let prefix = try read(0, Header.version3MinimumLength)
        let needed = Header.bytesNeeded(prefix: prefix)
        let bytes = needed > 0 ? try read(0, needed) : prefix
        return try Header.parse(Array(bytes.prefix(max(Int(clamping: fileSize), Header.version2Length))))
    }

    /// `count` big-endian 64-bit words at `offset`.
    public func words(at offset: UInt64, count: Int) throws(QCow2Error) -> [UInt64] {
        try read(offset, count * 8).be64Words(count: count)
    }

    /// The active L1 table.
    public func l1Table(_ header: Header) throws(QCow2Error) -> [UInt64] {
        try words(at: header.l1TableOffset, count: Int(header.l1Size))
    }

    /// An L2 table as raw words: one per entry, or two (entry, bitmap) with extended L2.
    public func l2Table(at offset: UInt64, geometry: Geometry) throws(QCow2Error) -> [UInt64] {
        try words(at: offset, count: Int(geometry.clusterSize / 8))
    }

    /// The refcount table, every entry of its clusters (qemu's refcount_table_size).
    public func refcountTable(_ header: Header) throws(QCow2Error) -> [UInt64] {
        try words(at: header.refcountTableOffset, count: Int(header.refcountTableClusters) * Int(header.clusterSize) / 8)
    }

    /// One refcount block.
    public func refcountBlock(at offset: UInt64, geometry: Geometry) throws(QCow2Error) -> [UInt8] {
        try read(offset, Int(geometry.clusterSize))
    }

    /// Every refcount block the table names, by table index, for a writable open (RefcountState keeps
    /// them all in memory). Refuses a block outside the file or misaligned, and more than `maximumBytes`
    /// of blocks.
    public func refcountBlocks(table: [UInt64], geometry: Geometry, fileSize: UInt64,
                               maximumBytes: Int) throws(QCow2Error) -> [Int: [UInt8]] {
        let cluster = Int(geometry.clusterSize)
        let used = table.filter { $0 != 0 }.count
        guard used * cluster <= maximumBytes else {
            throw .unsupported("refcount table", "\(used * cluster) bytes of refcount blocks exceed the "
                + "\(maximumBytes >> 20) MiB qnbd loads for writing; serve it with --read-only")
        }
        var blocks: [Int: [UInt8]] = [:]
        for (i, offset) in table.enumerated() where offset != 0 {
            guard offset & RefcountTableEntry.reserved == 0, offset % UInt64(cluster) == 0, offset < fileSize else {
                throw QCow2Error("refcount table entry \(i)", "block offset \(hex(offset)) is not a cluster inside the file")
            }
            blocks[i] = try refcountBlock(at: offset, geometry: geometry)
        }
        return blocks
    }
}
