// The qcow2 engine: image metadata and request state machines, with no I/O of its own.
//
// Calls (`read`, `blockStatus`) and completions (`completed`) are events; each may append actions to
// the outbox, which the I/O shell drains (`takeActions`) and executes, feeding every completion back
// with its token. Everything runs on the shell's loop thread; nothing here blocks, sleeps or locks.
//
// Reads walk their range cluster by cluster. A cluster whose L2 table is not in memory parks the request
// on that table's slot (see L2Cache); the request resumes exactly where it stopped once the table is
// in. Runs of clusters that are contiguous on the host become one file read; zero and unallocated runs
// are filled in memory and reported as zero ranges so the protocol can send holes; unallocated runs of
// a backed image read from the backing image; compressed clusters are read and then inflated on the
// thread pool.

import BlockDevice

public final class QCow2Engine {
    public let header: Header
    public let geometry: Geometry
    /// Whether reads of unallocated clusters go to a backing image, and how big it is.
    public let backingSize: UInt64?
    private let fileSize: UInt64
    private let l1: [UInt64]
    private var cache: L2Cache
    private var reads = Slab<ReadRequest>()
    private var statuses = Slab<StatusRequest>()
    private var tokens = Slab<TokenPurpose>()
    private var outbox: [IOAction] = []
    private let compression: CompressionAlgorithm

    /// Why an action was issued.
    private enum TokenPurpose {
        case loadL2(l1Index: Int)
        case readData(request: Int)
        case readCompressed(request: Int, source: UnsafeMutableRawBufferPointer, destination: UnsafeMutableRawBufferPointer,
                            copyFrom: Int, copyTo: Int, count: Int)
        case decompress(request: Int, source: UnsafeMutableRawBufferPointer, destination: UnsafeMutableRawBufferPointer,
                        copyFrom: Int, copyTo: Int, count: Int)
        case backingStatus(request: Int, length: UInt64)
    }

    /// - Parameters:
    ///   - l1: the L1 table as read from the file (big-endian entries already decoded to integers).
    ///   - backingSize: the backing image's size, or nil when there is none.
    ///   - cacheBytes: budget for L2 tables in memory.
    public init(header: Header, l1: [UInt64], fileSize: UInt64, backingSize: UInt64?, cacheBytes: Int) throws(QCow2Error) {
        self.header = header
        self.geometry = Geometry(header: header)
        self.l1 = l1
        self.fileSize = fileSize
        self.backingSize = backingSize
        self.compression = header.compressionType == 1 ? .zstd : .deflate
        self.cache = L2Cache(tableSize: Int(geometry.clusterSize), budgetBytes: cacheBytes)
        for (i, raw) in l1.enumerated() {
            let (offset, _) = try L1Entry.decode(raw, geometry: geometry, index: i)
            if offset != 0 && (offset < geometry.clusterSize || offset + geometry.clusterSize > fileSize + geometry.clusterSize) {
                throw QCow2Error("L1 entry \(i)", "L2 table offset \(hex(offset)) outside the image file")
            }
        }
        outbox.reserveCapacity(64)
    }

    /// Default L2 cache budget: enough to map the whole disk, capped at 64 MiB (512 GiB of disk with
    /// 64 KiB clusters). Beyond that, random reads over a huge disk cost an extra metadata read each
    /// time a table has been evicted, which is the qemu trade-off too.
    public static func defaultCacheBytes(header: Header) -> Int {
        let g = Geometry(header: header)
        let tables = (header.size + g.l2Coverage - 1) / g.l2Coverage
        return Int(min(tables * g.clusterSize, 64 << 20))
    }

    /// Hands the pending actions to the shell.
    public func takeActions() -> [IOAction] {
        defer { outbox.removeAll(keepingCapacity: true) }
        return outbox
    }

    public var hasActions: Bool { !outbox.isEmpty }

    /// Requests still in flight.
    public var activeRequests: Int { reads.count + statuses.count }

    private func issue(_ purpose: TokenPurpose) -> IOToken {
        IOToken(raw: UInt32(tokens.insert(purpose)))
    }

    // MARK: - L2 resolution

    private enum Resolution {
        /// No L2 table: every cluster it would map is unallocated.
        case none
        case table(L2Slot)
        /// The request was parked on a loading slot.
        case parked
    }

    private func resolveL2(_ l1Index: Int, waiter: Waiter) -> Resolution {
        guard l1Index < l1.count else { return .none }
        let offset = l1[l1Index] & L1Entry.offsetMask
        if offset == 0 { return .none }
        if let slot = cache[l1Index] {
            switch slot.state {
            case .ready:
                cache.touch(slot)
                return .table(slot)
            case .loading:
                slot.waiters.append(waiter)
                return .parked
            }
        }
        let slot = cache.startLoading(l1Index: l1Index, hostOffset: offset)
        slot.waiters.append(waiter)
        let token = issue(.loadL2(l1Index: l1Index))
        outbox.append(.readFile(token, offset: offset, into: slot.table))
        return .parked
    }

    // MARK: - Reads

    public func read(tag: RequestTag, offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) {
        let id = reads.insert(ReadRequest(tag: tag, offset: offset, buffer: buffer))
        continueRead(id)
    }

    private func continueRead(_ id: Int) {
        reads[id].state = .resolving
        while reads[id].position < reads[id].length {
            let guest = reads[id].offset + reads[id].position
            let l1Index = geometry.l1Index(guest)
            let tableEnd = (UInt64(l1Index) + 1) * geometry.l2Coverage
            let remaining = reads[id].length - reads[id].position
            switch resolveL2(l1Index, waiter: .read(id)) {
            case .parked:
                reads[id].state = .waitingForL2(l1Index: l1Index)
                return
            case .none:
                readUnallocated(id, length: min(remaining, tableEnd - guest))
            case .table(let slot):
                do {
                    try readMapped(id, slot: slot, limit: min(remaining, tableEnd - guest))
                } catch {
                    fail(id, BlockError(errno: EIO_, message: error.description))
                    return
                }
            }
        }
        reads[id].state = .draining
        finishReadIfDone(id)
    }

    /// Fills or fetches `length` unallocated bytes at the cursor.
    private func readUnallocated(_ id: Int, length: UInt64) {
        let guest = reads[id].offset + reads[id].position
        var fromBacking: UInt64 = 0
        if let backingSize, guest < backingSize {
            fromBacking = min(length, backingSize - guest)
            let start = Int(reads[id].position)
            let token = issue(.readData(request: id))
            reads[id].pending += 1
            outbox.append(.readBacking(token, offset: guest,
                                       into: UnsafeMutableRawBufferPointer(rebasing: reads[id].buffer[start..<start + Int(fromBacking)])))
            reads[id].position += fromBacking
        }
        if length > fromBacking {
            fillZero(id, length: length - fromBacking)
        }
    }

    private func fillZero(_ id: Int, length: UInt64) {
        let start = reads[id].position
        let slice = UnsafeMutableRawBufferPointer(rebasing: reads[id].buffer[Int(start)..<Int(start + length)])
        slice.initializeMemory(as: UInt8.self, repeating: 0)
        reads[id].noteZero(start..<start + length)
        reads[id].position += length
    }

    /// Handles the run of clusters at the cursor that one L2 table maps, up to `limit` bytes.
    private func readMapped(_ id: Int, slot: L2Slot, limit: UInt64) throws(QCow2Error) {
        let g = geometry
        let guest = reads[id].offset + reads[id].position
        let index = g.l2Index(guest)
        let (word, bitmap) = slot.entry(index, extended: g.extendedL2)
        let mapping = try L2Entry.decode(word, geometry: g, index: index)
        let inCluster = g.offsetInCluster(guest)
        let clusterLeft = min(g.clusterSize - inCluster, limit)

        if g.extendedL2, case .compressed = mapping {} else if g.extendedL2 {
            // Subclusters: take the run of equal state within this cluster.
            let sub = Int(inCluster / g.subclusterSize)
            let state = try L2Entry.subclusterState(mapping: mapping, bitmap: bitmap, sub: sub, index: index)
            var end = (UInt64(sub) + 1) * g.subclusterSize
            var next = sub + 1
            while end < inCluster + clusterLeft && next < g.subclusters,
                  try L2Entry.subclusterState(mapping: mapping, bitmap: bitmap, sub: next, index: index) == state {
                end += g.subclusterSize
                next += 1
            }
            let length = min(end, inCluster + clusterLeft) - inCluster
            switch state {
            case .unallocated: readUnallocated(id, length: length)
            case .zero: fillZero(id, length: length)
            case .data:
                guard case .normal(let host, _) = mapping else { preconditionFailure("data subcluster without host") }
                try readHost(id, host: host + inCluster, length: length)
            case .compressed: preconditionFailure("compressed handled below")
            }
            return
        }

        switch mapping {
        case .unallocated, .zero, .zeroAllocated:
            // Extend over following clusters of the same kind: one fill or one backing read.
            let unallocated = mapping == .unallocated
            var length = clusterLeft
            var next = index + 1
            while length < limit && next < g.l2Entries {
                let m = try L2Entry.decode(slot.entry(next, extended: false).word, geometry: g, index: next)
                let same: Bool
                switch m {
                case .unallocated: same = unallocated
                case .zero, .zeroAllocated: same = !unallocated
                default: same = false
                }
                guard same else { break }
                length += min(g.clusterSize, limit - length)
                next += 1
            }
            if unallocated { readUnallocated(id, length: length) } else { fillZero(id, length: length) }
        case .normal(let host, _):
            // Extend over clusters that follow on the host too: one file read.
            var length = clusterLeft
            var next = index + 1
            var expected = host + g.clusterSize
            while length < limit && next < g.l2Entries {
                guard case .normal(let h, _) = try L2Entry.decode(slot.entry(next, extended: false).word, geometry: g, index: next),
                      h == expected else { break }
                length += min(g.clusterSize, limit - length)
                expected += g.clusterSize
                next += 1
            }
            try readHost(id, host: host + inCluster, length: length)
        case .compressed(let host, let byteCount):
            try readCompressed(id, host: host, byteCount: byteCount, inCluster: inCluster, length: clusterLeft)
        }
    }

    private func readHost(_ id: Int, host: UInt64, length: UInt64) throws(QCow2Error) {
        guard host >= geometry.clusterSize, host + length <= fileSize + geometry.clusterSize else {
            throw QCow2Error("L2 table", "data cluster at \(hex(host)) lies outside the image file")
        }
        let start = Int(reads[id].position)
        let token = issue(.readData(request: id))
        reads[id].pending += 1
        outbox.append(.readFile(token, offset: host,
                                into: UnsafeMutableRawBufferPointer(rebasing: reads[id].buffer[start..<start + Int(length)])))
        reads[id].position += length
    }

    private func readCompressed(_ id: Int, host: UInt64, byteCount: Int, inCluster: UInt64, length: UInt64) throws(QCow2Error) {
        let cluster = Int(geometry.clusterSize)
        guard byteCount <= 2 * cluster + 512, host < fileSize else {
            throw QCow2Error("L2 table", "compressed cluster at \(hex(host)) (\(byteCount) bytes) is invalid")
        }
        // The descriptor may claim bytes past the end of the file (its last sector); read what exists.
        let available = Int(min(UInt64(byteCount), fileSize - host))
        let source = UnsafeMutableRawBufferPointer.allocate(byteCount: available, alignment: 16)
        let start = Int(reads[id].position)
        let whole = inCluster == 0 && length == geometry.clusterSize
        // A whole-cluster read inflates straight into the caller's buffer; a partial one needs scratch.
        let destination = whole
            ? UnsafeMutableRawBufferPointer(rebasing: reads[id].buffer[start..<start + cluster])
            : UnsafeMutableRawBufferPointer.allocate(byteCount: cluster, alignment: 16)
        let token = issue(.readCompressed(request: id, source: source, destination: destination,
                                          copyFrom: whole ? -1 : Int(inCluster), copyTo: start, count: Int(length)))
        reads[id].pending += 1
        outbox.append(.readFile(token, offset: host, into: source))
        reads[id].position += length
    }

    private func fail(_ id: Int, _ error: BlockError) {
        if reads[id].error == nil { reads[id].error = error }
        reads[id].position = reads[id].length
        reads[id].state = .draining
        finishReadIfDone(id)
    }

    private func finishReadIfDone(_ id: Int) {
        guard case .draining = reads[id].state, reads[id].pending == 0 else { return }
        let r = reads.remove(id)
        if let error = r.error {
            outbox.append(.complete(r.tag, .failed(error)))
        } else {
            outbox.append(.complete(r.tag, .read(zeroRanges: r.zeroRanges)))
        }
    }

    // MARK: - Block status

    /// Extents for a prefix of the range: stops at the end of one L2 table's coverage or where the
    /// answer would need the backing image after something else, so one query does bounded work.
    public func blockStatus(tag: RequestTag, offset: UInt64, length: UInt64) {
        let id = statuses.insert(StatusRequest(tag: tag, offset: offset, length: length))
        continueStatus(id)
    }

    private func continueStatus(_ id: Int) {
        let g = geometry
        statuses[id].state = .resolving
        let start = statuses[id].offset + statuses[id].covered
        let l1Index = g.l1Index(start)
        let tableEnd = min((UInt64(l1Index) + 1) * g.l2Coverage, statuses[id].offset + statuses[id].length)
        switch resolveL2(l1Index, waiter: .status(id)) {
        case .parked:
            statuses[id].state = .waitingForL2(l1Index: l1Index)
            return
        case .none:
            statusUnallocated(id, length: tableEnd - start)
        case .table(let slot):
            do {
                var position = start
                while position < tableEnd {
                    let index = g.l2Index(position)
                    let (word, bitmap) = slot.entry(index, extended: g.extendedL2)
                    let mapping = try L2Entry.decode(word, geometry: g, index: index)
                    let inCluster = g.offsetInCluster(position)
                    var runEnd = min(position - inCluster + g.clusterSize, tableEnd)
                    var flags: ExtentFlags = []
                    var depth: UInt32 = 1
                    var unallocated = false
                    if g.extendedL2, mapping != .unallocated || bitmap != 0 {
                        if case .compressed = mapping {} else {
                            let sub = Int(inCluster / g.subclusterSize)
                            let state = try L2Entry.subclusterState(mapping: mapping, bitmap: bitmap, sub: sub, index: index)
                            runEnd = min(position - inCluster + (UInt64(sub) + 1) * g.subclusterSize, tableEnd)
                            switch state {
                            case .unallocated: unallocated = true
                            case .zero: flags = mapping == .unallocated ? [.hole, .zero] : [.zero]
                            case .data, .compressed: break
                            }
                        }
                    } else {
                        switch mapping {
                        case .unallocated: unallocated = true
                        case .zero: flags = [.hole, .zero]
                        case .zeroAllocated: flags = [.zero]
                        case .normal, .compressed: break
                        }
                    }
                    if unallocated {
                        if backingSize != nil {
                            // Ask the backing image, but only as the first thing this reply says.
                            if statuses[id].covered == 0 {
                                var end = runEnd
                                while end < tableEnd {
                                    let i = g.l2Index(end)
                                    let e = slot.entry(i, extended: g.extendedL2)
                                    guard e.word == 0 && e.bitmap == 0 else { break }
                                    end = min(end + g.clusterSize, tableEnd)
                                }
                                statusUnallocated(id, length: end - position)
                                return
                            }
                            break
                        }
                        flags = [.hole, .zero]
                        depth = 0
                    }
                    statuses[id].append(length: runEnd - position, flags: flags, depth: depth)
                    position = runEnd
                }
            } catch {
                let r = statuses.remove(id)
                outbox.append(.complete(r.tag, .failed(BlockError(errno: EIO_, message: error.description))))
                return
            }
            finishStatus(id)
        }
    }

    /// An unallocated run at the cursor: zeros without a backing image, the backing image's answer
    /// (one level deeper) with one.
    private func statusUnallocated(_ id: Int, length: UInt64) {
        let start = statuses[id].offset + statuses[id].covered
        if let backingSize, start < backingSize {
            let n = min(length, backingSize - start)
            statuses[id].state = .waitingForBacking
            let token = issue(.backingStatus(request: id, length: n))
            outbox.append(.backingStatus(token, offset: start, length: n))
            return
        }
        statuses[id].append(length: length, flags: [.hole, .zero], depth: 0)
        finishStatus(id)
    }

    private func finishStatus(_ id: Int) {
        let r = statuses.remove(id)
        outbox.append(.complete(r.tag, .extents(r.extents)))
    }

    // MARK: - Completions

    public func completed(_ token: IOToken, result: IOResult) {
        let purpose = tokens.remove(Int(token.raw))
        switch purpose {
        case .loadL2(let l1Index):
            guard let slot = cache[l1Index] else { preconditionFailure("L2 load for a missing slot") }
            let waiters = slot.waiters
            slot.waiters.removeAll()
            if case .failure(let errno) = result {
                cache.remove(l1Index)
                for w in waiters { failWaiter(w, BlockError(errno: errno, message: "reading the L2 table at \(hex(slot.hostOffset))")) }
                return
            }
            slot.state = .ready
            for w in waiters {
                switch w {
                case .read(let id): continueRead(id)
                case .status(let id): continueStatus(id)
                }
            }

        case .readData(let id):
            if case .failure(let errno) = result, reads[id].error == nil { reads[id].error = BlockError(errno: errno) }
            reads[id].pending -= 1
            finishReadIfDone(id)

        case .readCompressed(let id, let source, let destination, let copyFrom, let copyTo, let count):
            if case .failure(let errno) = result {
                source.deallocate()
                if copyFrom >= 0 { destination.deallocate() }
                if reads[id].error == nil { reads[id].error = BlockError(errno: errno) }
                reads[id].pending -= 1
                finishReadIfDone(id)
                return
            }
            let token = issue(.decompress(request: id, source: source, destination: destination,
                                          copyFrom: copyFrom, copyTo: copyTo, count: count))
            outbox.append(.decompress(token, compression, source: UnsafeRawBufferPointer(source), into: destination))

        case .decompress(let id, let source, let destination, let copyFrom, let copyTo, let count):
            source.deallocate()
            if case .failure = result {
                if reads[id].error == nil {
                    reads[id].error = BlockError(errno: EIO_, message: "qcow2 compressed cluster: cannot decompress")
                }
            } else if copyFrom >= 0 {
                (reads[id].buffer.baseAddress! + copyTo).copyMemory(from: destination.baseAddress! + copyFrom, byteCount: count)
            }
            if copyFrom >= 0 { destination.deallocate() }
            reads[id].pending -= 1
            finishReadIfDone(id)

        case .backingStatus(let id, let length):
            switch result {
            case .extents(let extents):
                var covered: UInt64 = 0
                for e in extents where covered < length {
                    let n = min(e.length, length - covered)
                    // One level deeper; "nowhere" stays 0.
                    statuses[id].append(length: n, flags: e.flags, depth: e.depth == 0 ? 0 : e.depth + 1)
                    covered += n
                }
                if covered == 0 { statuses[id].append(length: length, flags: [], depth: 2) }
                finishStatus(id)
            case .failure(let errno):
                let r = statuses.remove(id)
                outbox.append(.complete(r.tag, .failed(BlockError(errno: errno))))
            case .success:
                preconditionFailure("backing status completed without extents")
            }
        }
    }

    private func failWaiter(_ w: Waiter, _ error: BlockError) {
        switch w {
        case .read(let id): fail(id, error)
        case .status(let id):
            let r = statuses.remove(id)
            outbox.append(.complete(r.tag, .failed(error)))
        }
    }
}

/// EIO without importing Glibc into the pure module.
let EIO_: Int32 = 5
