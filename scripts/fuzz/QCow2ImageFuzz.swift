// libFuzzer harness for the qcow2 parser and read engine (Sources/QCow2, plus QCow2Driver's
// Decompressor for real deflate/zstd), compiled into one module with them by scripts/fuzz/run.
//
// The input is the image file. It is opened the way QCow2Driver opens one (first 104 bytes, then the
// first cluster, Header.parse, validate, the L1 table), then a read-only QCow2Engine serves a fixed
// set of reads and block-status queries while an in-memory shell plays the I/O shell: `.readFile`
// reads the input (zeros past its end), `.readBacking` returns zeros, `.backingStatus` answers "all
// data, depth 1", `.decompress` runs the real decompressor. Completions are fed back in FIFO, LIFO or
// a pseudo-random order chosen from the input. Besides crashes, the harness traps when the engine
// breaks its contract: a write from a read-only engine, a request completed twice or never, extents
// that are empty or overrun the query, zero ranges outside the read or not zero in the buffer.

import BlockDevice

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    let file = Array(UnsafeBufferPointer(start: data, count: size))
    fuzzImage(file)
    return 0
}

func fuzzImage(_ file: [UInt8]) {
    let fileSize = UInt64(file.count)
    // Open as QCow2Driver does.
    let prefix = Array(file.prefix(104))
    let clusterBytes = Header.bytesNeeded(prefix: prefix)
    let first = clusterBytes > 0 ? Array(file.prefix(min(clusterBytes, file.count))) : prefix
    guard let header = try? Header.parse(first) else { return }
    _ = header.backingFormat
    _ = header.featureName(type: 0, bit: 5)
    _ = try? header.validate(fileSize: fileSize, writable: true)
    do { try header.validate(fileSize: fileSize, writable: false) } catch { return }
    let g = Geometry(header: header)
    let l1Start = Int(header.l1TableOffset)
    let l1 = (0..<Int(header.l1Size)).map { file.be64(l1Start + 8 * $0) }
    decodeEntries(file, geometry: g)
    fuzzBitmaps(file, header: header)

    let backingSize: UInt64? = header.backingFileName != nil ? header.size : nil
    let cacheBytes = min(QCow2Engine.defaultCacheBytes(header: header), 2 * Int(g.clusterSize))
    guard let engine = try? QCow2Engine(header: header, l1: l1, fileSize: fileSize, backingSize: backingSize,
                                        cacheBytes: cacheBytes) else { return }
    let shell = FuzzShell(engine: engine, file: file, order: file.reduce(0) { $0 &+ UInt64($1) })

    let disk = header.size
    guard disk > 0 else { return }
    // Reads: the start of the disk, an unaligned straddling read, the tail, and the start of each
    // L2 table's coverage for the first few mapped L1 entries.
    var reads: [(UInt64, UInt64)] = [(0, min(disk, 128 << 10))]
    let odd = UInt64(1234) % disk
    reads.append((odd, min(disk - odd, g.clusterSize * 2 + 777)))
    reads.append((disk - min(disk, 8192), min(disk, 8192)))
    var starts: [UInt64] = [0]
    for (i, e) in l1.enumerated() where e & L1Entry.offsetMask != 0 && starts.count < 8 {
        let at = UInt64(i) * g.l2Coverage
        guard at < disk else { break }
        starts.append(at)
        reads.append((at, min(disk - at, 64 << 10)))
    }
    for (offset, length) in reads where length > 0 { shell.read(offset: offset, length: length) }
    shell.drain()
    // Block status: walk from each start, as a client would, continuing from where each answer ended.
    for start in starts {
        var position = start
        let end = min(disk, start + (64 << 20))
        var queries = 0
        while position < end && queries < 64 {
            let extents = shell.status(offset: position, length: end - position)
            guard let extents else { break }
            position += extents.reduce(0) { $0 + $1.length }
            queries += 1
        }
    }
    // The same reads once more with a warm (and evicting) cache, two at a time.
    for (offset, length) in reads.reversed() where length > 0 { shell.read(offset: offset, length: length) }
    shell.drain()
    check(engine.activeRequests == 0, "\(engine.activeRequests) requests still active")
    check(!engine.hasActions, "actions left over")
}

func isZero(_ b: UnsafeRawBufferPointer) -> Bool {
    var i = 0
    while i + 8 <= b.count {
        if b.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
        i += 8
    }
    while i < b.count { if b[i] != 0 { return false }; i += 1 }
    return true
}

/// L1/L2 decoding of the words right after the header cluster (where qemu puts the first tables)
/// under this geometry; the engine decodes the tables it actually loads.
/// The bitmaps extension: the directory validated as every reader validates it, then each bitmap's
/// runs over the start of the disk. Traps when the runs do not tile the query exactly, do not alternate,
/// or disagree with the bit lookup at their start.
func fuzzBitmaps(_ file: [UInt8], header: Header) {
    let read: MetadataRead = { (offset, count) throws(QCow2Error) in
        var out = [UInt8](repeating: 0, count: count)
        guard offset < UInt64(file.count) else { return out }
        let n = min(count, file.count - Int(offset))
        out.replaceSubrange(0..<n, with: file[Int(offset)..<(Int(offset) + n)])
        return out
    }
    let fileSize = UInt64(file.count)
    guard let entries = try? BitmapValidation.load(header: header, fileSize: fileSize, read: read) else { return }
    for entry in entries {
        guard let reader = try? BitmapReader(entry: entry, header: header, fileSize: fileSize, read: read) else { continue }
        let length = min(header.size, 64 << 20)
        guard let runs = try? reader.runs(offset: 0, length: length) else { continue }
        var position: UInt64 = 0
        for (i, run) in runs.enumerated() {
            check(run.offset == position && run.length > 0, "bitmap run \(i) at \(run.offset) (expected \(position))")
            check(i == 0 || runs[i - 1].dirty != run.dirty, "bitmap runs \(i - 1) and \(i) do not alternate")
            let dirty = try? reader.isDirty(granule: run.offset >> UInt64(entry.granularityBits))
            check(dirty == run.dirty, "bitmap run \(i) disagrees with its first bit")
            position += run.length
        }
        check(position == length, "bitmap runs cover \(position) of \(length) bytes")
    }
}

func decodeEntries(_ file: [UInt8], geometry g: Geometry) {
    var at = Int(g.clusterSize)
    var index = 0
    while at + 16 <= min(file.count, Int(g.clusterSize) + 4096) {
        let word = file.be64(at)
        _ = try? L1Entry.decode(word, geometry: g, index: index)
        if let mapping = try? L2Entry.decode(word, geometry: g, index: index) {
            if case .compressed(let host, let byteCount) = mapping {
                check(host != 0 && byteCount > 0, "compressed descriptor decoded to nothing")
            }
            if g.extendedL2 {
                let bitmap = file.be64(at + 8)
                for sub in [0, 1, 17, 31] {
                    _ = try? L2Entry.subclusterState(mapping: mapping, bitmap: bitmap, sub: sub, index: index)
                }
            }
        }
        at += g.extendedL2 ? 16 : 8
        index += 1
    }
}

final class FuzzShell {
    let engine: QCow2Engine
    let file: [UInt8]
    var order: CompletionOrder
    var held: [IOAction] = []
    var outcomes: [RequestTag: BlockOutcome] = [:]
    var reads: [RequestTag: (offset: UInt64, buffer: UnsafeMutableRawBufferPointer)] = [:]
    var statusLengths: [RequestTag: UInt64] = [:]
    var nextTag: RequestTag = 1

    init(engine: QCow2Engine, file: [UInt8], order: UInt64) {
        self.engine = engine
        self.file = file
        self.order = CompletionOrder(seed: order)
    }

    func read(offset: UInt64, length: UInt64) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Int(length), alignment: 16)
        buffer.initializeMemory(as: UInt8.self, repeating: 0xee)
        let tag = nextTag
        nextTag += 1
        reads[tag] = (offset, buffer)
        engine.read(tag: tag, offset: offset, into: buffer)
        pull()
    }

    /// One block-status query, run to completion; nil when it failed.
    func status(offset: UInt64, length: UInt64) -> [Extent]? {
        let tag = nextTag
        nextTag += 1
        statusLengths[tag] = length
        engine.blockStatus(tag: tag, offset: offset, length: length)
        pull()
        drain()
        guard case .extents(let e) = outcomes[tag] else {
            check(outcomes[tag] != nil, "block status never completed")
            return nil
        }
        return e
    }

    /// Completes every held action (and those issued meanwhile) in the input's order.
    func drain() {
        while !held.isEmpty {
            let action = held.remove(at: order.nextIndex(count: held.count))
            let (token, result) = execute(action)
            engine.completed(token, result: result)
            pull()
        }
        for (tag, r) in reads {
            check(outcomes[tag] != nil, "read \(tag) never completed")
            r.buffer.deallocate()
        }
        reads.removeAll()
    }

    private func pull() {
        for action in engine.takeActions() {
            if case .complete(let tag, let outcome) = action {
                check(outcomes[tag] == nil, "request \(tag) completed twice")
                outcomes[tag] = outcome
                checkOutcome(tag, outcome)
            } else {
                held.append(action)
            }
        }
    }

    private func checkOutcome(_ tag: RequestTag, _ outcome: BlockOutcome) {
        switch outcome {
        case .read(let zeroRanges):
            guard let r = reads[tag] else { fatalError("read outcome for a status query") }
            var last: UInt64 = 0
            for z in zeroRanges {
                check(z.lowerBound >= last && z.upperBound <= UInt64(r.buffer.count) && !z.isEmpty,
                      "zero range \(z) out of order or outside a \(r.buffer.count)-byte read")
                last = z.upperBound
                check(isZero(UnsafeRawBufferPointer(rebasing: r.buffer[Int(z.lowerBound)..<Int(z.upperBound)])),
                      "zero range \(z) not zero in the buffer")
            }
        case .extents(let extents):
            guard let length = statusLengths[tag] else { fatalError("extents for a read") }
            check(!extents.isEmpty, "no extents")
            var total: UInt64 = 0
            for e in extents {
                check(e.length > 0, "empty extent")
                total += e.length
            }
            check(total <= length, "extents cover \(total) bytes of a \(length)-byte query")
        case .failed:
            break
        case .done:
            fatalError("read-only request completed as .done")
        }
    }

    private func execute(_ action: IOAction) -> (IOToken, IOResult) {
        switch action {
        case .readFile(let token, let offset, let into):
            into.initializeMemory(as: UInt8.self, repeating: 0)
            if offset < UInt64(file.count) {
                let n = min(into.count, file.count - Int(offset))
                file.withUnsafeBytes { into.baseAddress!.copyMemory(from: $0.baseAddress! + Int(offset), byteCount: n) }
            }
            return (token, .success)
        case .readBacking(let token, let offset, let into):
            check(engine.backingSize != nil, "backing read without a backing image")
            check(offset + UInt64(into.count) <= engine.backingSize!, "backing read past the backing size")
            into.initializeMemory(as: UInt8.self, repeating: 0)
            return (token, .success)
        case .backingStatus(let token, let offset, let length):
            check(engine.backingSize != nil && length > 0, "backing status without a backing image")
            check(offset + length <= engine.backingSize!, "backing status past the backing size")
            return (token, .extents([Extent(length: length, flags: [], depth: 1)]))
        case .decompress(let token, let algorithm, let source, let into):
            let r = Decompressor.run(algorithm, source: source, into: into)
            return (token, r == 0 ? .success : .failure(5))
        case .writeFile, .syncFile, .punchFile:
            fatalError("a read-only engine issued \(action)")
        case .complete:
            fatalError("completions are not held")
        }
    }
}
