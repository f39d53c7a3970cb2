// libFuzzer harness for the writable qcow2 engine (Sources/QCow2, plus QCow2Driver's Decompressor),
// compiled into one module with it by scripts/fuzz/run, so it can see which purpose each action has.
//
// Input: an image file followed by `scriptBytes` of script. The image is opened writable the way
// QCow2Driver opens one (header, validate, dirty bit, L1, the refcount table and every block it names,
// zeros past the end of the file), then the script drives 16 operations — writes, FUA writes, zeroes,
// trims and flushes at offsets and lengths it picks — followed by a final flush. An in-memory host
// file plays the I/O shell; completions come back in FIFO, LIFO or pseudo-random order and the
// script may make every Nth file write fail with EIO.
//
// Besides crashes, the harness traps when a request completes twice or never, or when a host write
// or punch lands where it must not:
//   - nothing past the clusters the engine could own (the initial end plus what the operations can
//     allocate), so a hostile offset never grows the file without bound;
//   - in the header cluster only the corrupt bit (8 bytes at 72) or the refcount table switch (12
//     bytes at 48), each from the action meant for it;
//   - data (in place or allocating) and punches never touch a cluster that is metadata right now:
//     the header, the L1 table, the refcount table, a refcount block or an L2 table the engine uses;
//   - metadata writes go to the L1 table's sectors, the current refcount table, or whole clusters
//     that are a current refcount block or L2 table and no header, L1 or refcount table cluster.

import BlockDevice

/// Four bytes per operation, sixteen operations, then the mode byte.
let operationCount = 16
let scriptBytes = operationCount * 4 + 1
/// The most one operation writes, so a 2 MiB-cluster image cannot make a write allocate gigabytes.
let maximumOperationBytes: UInt64 = 1 << 20

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size > scriptBytes + 104 else { return 0 }
    let input = Array(UnsafeBufferPointer(start: data, count: size))
    fuzzWritable(image: Array(input.dropLast(scriptBytes)), script: Array(input.suffix(scriptBytes)))
    return 0
}

func fuzzWritable(image file: [UInt8], script: [UInt8]) {
    let fileSize = UInt64(file.count)
    let prefix = Array(file.prefix(104))
    let clusterBytes = Header.bytesNeeded(prefix: prefix)
    let first = clusterBytes > 0 ? Array(file.prefix(min(clusterBytes, file.count))) : prefix
    guard let header = try? Header.parse(first) else { return }
    do { try header.validate(fileSize: fileSize, writable: true) } catch { return }
    guard !header.isDirty else { return }
    let g = Geometry(header: header)
    let cluster = g.clusterSize
    // Keep each run small and fast: clusters up to 64 KiB (every allocation writes a whole one), and
    // the cache and the refcount blocks are loaded whole.
    guard g.clusterBits <= 16, UInt64(header.refcountTableClusters) * cluster <= 1 << 20, header.l1Size <= 1 << 16 else { return }
    let l1Bytes = fileBytes(file, at: header.l1TableOffset, count: Int(header.l1Size) * 8)
    let l1 = (0..<Int(header.l1Size)).map { l1Bytes.be64($0 * 8) }
    let tableBytes = fileBytes(file, at: header.refcountTableOffset, count: Int(header.refcountTableClusters) * Int(cluster))
    let table = (0..<(tableBytes.count / 8)).map { tableBytes.be64($0 * 8) }
    var blocks: [Int: [UInt8]] = [:]
    for (i, offset) in table.enumerated() where offset != 0 {
        // QCow2Driver refuses the image otherwise.
        guard offset % cluster == 0, offset < fileSize else { return }
        blocks[i] = fileBytes(file, at: offset, count: Int(cluster))
    }
    guard blocks.count <= 64 else { return }
    let backingSize: UInt64? = header.backingFileName != nil ? header.size : nil
    let cacheBytes = min(QCow2Engine.defaultCacheBytes(header: header), 4 * Int(cluster))
    // The snapshot table is parsed as QCow2Driver does; its clusters are protected like other metadata.
    guard let snapshots = try? SnapshotMetadata(header: header, fileSize: fileSize, read: { (offset, count) throws(QCow2Error) in
        fileBytes(file, at: offset, count: count)
    }) else { return }
    guard let engine = try? QCow2Engine(header: header, l1: l1, fileSize: fileSize, backingSize: backingSize,
                                        cacheBytes: cacheBytes, refcountTable: table, refcountBlocks: blocks,
                                        snapshots: snapshots) else { return }
    let disk = header.size
    guard disk > 0 else { return }

    let shell = WriteShell(engine: engine, file: file, mode: script[scriptBytes - 1])
    var ownedClusters = engine.writableState!.refcounts.endCluster + 16
    for k in 0..<operationCount {
        let op = Array(script[(4 * k)..<(4 * k + 4)])
        // Offset: a cluster picked by op[1], sometimes shifted by sectors; length: sectors or clusters.
        var offset = (UInt64(op[1]) << UInt64(g.clusterBits)) % disk
        if op[2] & 0x80 != 0 { offset = (offset + UInt64(op[2] & 0x7f) * 512) % disk }
        let unit: UInt64 = op[3] & 0x80 != 0 ? 512 : cluster
        let length = min(UInt64(op[3] & 0x1f) * unit + (op[3] & 0x40 != 0 ? 0 : unit), disk - offset, maximumOperationBytes)
        // Every cluster written, plus its L2 table, refcount block and refcount table growth.
        ownedClusters += 4 * (length / cluster + 2) + UInt64(engine.writableState!.refcounts.tableClusters) * 2
        switch op[0] % 8 {
        case 0, 1: shell.write(offset: offset, length: length, fill: op[2], fua: false)
        case 2: shell.write(offset: offset, length: length, fill: op[2], fua: true)
        case 3: shell.zeroes(offset: offset, length: length, keep: op[0] & 0x10 != 0, fastOnly: op[0] & 0x20 != 0)
        case 4: shell.trim(offset: offset, length: length)
        case 5: shell.flush()
        case 6: shell.drain(ownedClusters: ownedClusters)
        default: shell.write(offset: offset, length: length, fill: op[2], fua: op[0] & 0x40 != 0)
        }
        if op[0] & 0x80 != 0 { shell.drain(ownedClusters: ownedClusters) }
    }
    shell.flush()
    shell.drain(ownedClusters: ownedClusters)
    shell.finish()
    check(engine.activeRequests == 0, "\(engine.activeRequests) requests still active")
    check(!engine.hasActions, "actions left over")
}

final class WriteShell {
    let engine: QCow2Engine
    let geometry: Geometry
    var file: [UInt8]
    var order: CompletionOrder
    /// Every Nth file write fails with EIO (0: none).
    let failEvery: Int
    var writesSeen = 0
    var held: [IOAction] = []
    var outcomes: [RequestTag: BlockOutcome] = [:]
    var issued: Set<RequestTag> = []
    var buffers: [UnsafeMutableRawBufferPointer] = []
    var nextTag: RequestTag = 1
    let l1Range: Range<UInt64>
    let l1Clusters: Range<UInt64>

    init(engine: QCow2Engine, file: [UInt8], mode: UInt8) {
        self.engine = engine
        self.geometry = engine.geometry
        self.file = file
        self.order = CompletionOrder(seed: UInt64(mode & 3))
        self.failEvery = mode & 0x80 != 0 ? Int(mode >> 2 & 7) + 2 : 0
        let h = engine.header
        let l1End = h.l1TableOffset + (UInt64(h.l1Size) * 8 + 511) / 512 * 512
        l1Range = h.l1TableOffset..<l1End
        let c = engine.geometry.clusterSize
        l1Clusters = (h.l1TableOffset / c)..<((l1End + c - 1) / c)
    }

    private func tag() -> RequestTag {
        defer { nextTag += 1 }
        issued.insert(nextTag)
        return nextTag
    }

    func write(offset: UInt64, length: UInt64, fill: UInt8, fua: Bool) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(length), alignment: 16)
        buffer.initializeMemory(as: UInt8.self, repeating: fill)
        buffers.append(buffer)
        engine.write(tag: tag(), offset: offset, from: UnsafeRawBufferPointer(buffer), fua: fua)
        pull()
    }

    func zeroes(offset: UInt64, length: UInt64, keep: Bool, fastOnly: Bool) {
        engine.writeZeroes(tag: tag(), offset: offset, length: length, keepAllocation: keep, fastOnly: fastOnly, fua: false)
        pull()
    }

    func trim(offset: UInt64, length: UInt64) {
        engine.trim(tag: tag(), offset: offset, length: length, fua: false)
        pull()
    }

    func flush() {
        engine.flush(tag: tag())
        pull()
    }

    /// Completes every held action, and those issued meanwhile, in the script's order.
    func drain(ownedClusters: UInt64) {
        while !held.isEmpty {
            let action = held.remove(at: order.nextIndex(count: held.count))
            let (token, result) = execute(action, ownedClusters: ownedClusters)
            engine.completed(token, result: result)
            pull()
        }
    }

    func finish() {
        for t in issued { check(outcomes[t] != nil, "request \(t) never completed") }
        for b in buffers { b.deallocate() }
        buffers = []
    }

    /// Takes the engine's new actions, checking each write and punch where it is issued: the engine's
    /// state right then says what is metadata.
    private func pull() {
        for action in engine.takeActions() {
            switch action {
            case .complete(let tag, let outcome):
                check(outcomes[tag] == nil, "request \(tag) completed twice")
                outcomes[tag] = outcome
            case .writeFile(let token, let offset, let from, _):
                checkWrite(purpose: engine.tokens[token], offset: offset, count: UInt64(from.count))
                held.append(action)
            case .punchFile(_, let offset, let length):
                checkData(offset: offset, count: length, what: "punch")
                held.append(action)
            default:
                held.append(action)
            }
        }
    }

    // MARK: - Where writes may land

    private var c: UInt64 { geometry.clusterSize }

    private func clusters(_ offset: UInt64, _ count: UInt64) -> ClosedRange<UInt64> {
        (offset / c)...((offset + max(count, 1) - 1) / c)
    }

    /// Clusters that hold metadata the engine uses now.
    private func metadataClusters() -> Set<UInt64> {
        var set: Set<UInt64> = [0]
        for k in l1Clusters { set.insert(k) }
        let refs = engine.writableState!.refcounts
        let tableClusters = UInt64(refs.tableClusters)
        for k in 0..<tableClusters { set.insert(refs.tableOffset / c + k) }
        if let moved = refs.movedTable {
            for k in 0..<UInt64(moved.clusters) { set.insert(moved.offset / c + k) }
        }
        for offset in refs.table where offset != 0 { set.insert(offset / c) }
        for l2 in l2Clusters() { set.insert(l2) }
        set.formUnion(engine.writableState!.snapshotClusters)
        return set
    }

    private func l2Clusters() -> Set<UInt64> {
        var set: Set<UInt64> = []
        for e in engine.l1 where e & L1Entry.offsetMask != 0 { set.insert((e & L1Entry.offsetMask) / c) }
        for (_, slot) in engine.cache.slots { set.insert(slot.hostOffset / c) }
        return set
    }

    private func checkData(offset: UInt64, count: UInt64, what: String) {
        let metadata = metadataClusters()
        for k in clusters(offset, count) {
            check(!metadata.contains(k), "\(what) of \(count) bytes at \(hex(offset)) hits metadata cluster \(k)")
        }
    }

    private func checkWrite(purpose: QCow2Engine.TokenPurpose, offset: UInt64, count: UInt64) {
        check(count > 0, "empty write at \(hex(offset))")
        let end = offset + count
        switch purpose {
        case .headerUpdate:
            check(offset == Header.incompatibleFeaturesOffset && count == 8, "header update of \(count) bytes at \(hex(offset))")
            return
        case .writeInPlace, .allocationWrite:
            checkData(offset: offset, count: count, what: "data write")
        case .flushStep:
            if offset == Header.refcountTableFieldsOffset && count == 12 { return }
            check(offset >= c, "metadata write of \(count) bytes at \(hex(offset)) in the header cluster")
            if l1Range.contains(offset) {
                check(offset % 512 == 0 && count == 512 && end <= l1Range.upperBound,
                      "L1 write of \(count) bytes at \(hex(offset)) outside the table's sectors")
                return
            }
            let refs = engine.writableState!.refcounts
            let table = refs.tableOffset..<(refs.tableOffset + UInt64(refs.tableClusters) * c)
            if table.contains(offset) {
                check(end <= table.upperBound, "refcount table write of \(count) bytes at \(hex(offset)) runs past the table")
                return
            }
            check(offset % c == 0 && count == c, "metadata write of \(count) bytes at \(hex(offset)) is not one cluster")
            let k = offset / c
            check(!l1Clusters.contains(k) && !table.contains(offset), "metadata write into the L1 or refcount table at \(hex(offset))")
            check(refs.table.contains(offset) || l2Clusters().contains(k),
                  "metadata write at \(hex(offset)) is neither a refcount block nor an L2 table")
            let blocks = Set(refs.table.filter { $0 != 0 }).contains(offset)
            check(!(blocks && l2Clusters().contains(k)), "cluster \(k) is both a refcount block and an L2 table")
        default:
            fatalError("a write for \(purpose)")
        }
    }

    // MARK: - The host file

    private func execute(_ action: IOAction, ownedClusters: UInt64) -> (IOToken, IOResult) {
        switch action {
        case .readFile(let token, let offset, let into):
            into.copyBytes(from: fileBytes(file, at: offset, count: into.count))
            return (token, .success)
        case .writeFile(let token, let offset, let from, _):
            let end = offset + UInt64(from.count)
            check(end <= ownedClusters * c, "write up to \(hex(end)) past the \(ownedClusters) clusters the engine may own")
            writesSeen += 1
            if failEvery > 0 && writesSeen % failEvery == 0 { return (token, .failure(5)) }
            if end > UInt64(file.count) { file += [UInt8](repeating: 0, count: Int(end) - file.count) }
            file.withUnsafeMutableBytes { ($0.baseAddress! + Int(offset)).copyMemory(from: from.baseAddress!, byteCount: from.count) }
            return (token, .success)
        case .syncFile(let token):
            return (token, .success)
        case .punchFile(let token, let offset, let length):
            check(offset + length <= ownedClusters * c, "punch past the clusters the engine may own")
            let from = Int(min(offset, UInt64(file.count)))
            let to = Int(min(offset + length, UInt64(file.count)))
            file.replaceSubrange(from..<to, with: [UInt8](repeating: 0, count: to - from))
            return (token, .success)
        case .readBacking(let token, let offset, let into):
            check(engine.backingSize != nil, "backing read without a backing image")
            check(offset + UInt64(into.count) <= engine.backingSize!, "backing read past the backing size")
            into.initializeMemory(as: UInt8.self, repeating: 0x6b)
            return (token, .success)
        case .backingStatus(let token, _, let length):
            return (token, .extents([Extent(length: length, flags: [], depth: 1)]))
        case .decompress(let token, let algorithm, let source, let into):
            let r = Decompressor.run(algorithm, source: source, into: into)
            return (token, r == 0 ? .success : .failure(5))
        case .complete:
            fatalError("completions are not held")
        }
    }
}
