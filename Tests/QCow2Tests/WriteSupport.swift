// Test doubles for the qcow2 write path: a `WriteShell` that plays the I/O shell for a writable
// QCow2Engine over an in-memory file (writes land when the test completes them, syncs mark durability
// points, punches zero ranges), an `ImageCheck` that walks an image's L1/L2 tables and refcount table
// the way `qemu-img check` does, and helpers to build writable images and read them back.
//
// Durability model: a sync makes durable what had reached the file when the sync was issued. The shell
// keeps that durable copy (`durable`) and calls `onDurable` at every sync completion, so a test can
// check the image a crash at that instant would leave.

import BlockDevice
import Foundation
import Testing
@testable import QCow2

// MARK: - Writable images

extension TestImage {
    /// Fills the refcount block (cluster 2) with the number of references to every cluster, so the
    /// image opens writable with exact counts. Hand-built images are small: one block covers them.
    mutating func countReferences() {
        let check = ImageCheck(file)
        let block = Int(header.refcountTableOffset) + cs   // cluster 2
        precondition(file.be64(Int(header.refcountTableOffset)) == UInt64(block))
        for i in block..<block + cs { file[i] = 0 }
        let coverage = UInt64(geometry.refblockCoverage)
        let order = geometry.refcountOrder
        let cs = self.cs
        for (cluster, n) in check.references {
            precondition(cluster < coverage, "test image too large for one refcount block")
            file.withUnsafeMutableBytes { bytes in
                RefcountEntry.set(UnsafeMutableRawBufferPointer(rebasing: bytes[block..<block + cs]), index: Int(cluster),
                                  order: order, value: UInt64(n))
            }
        }
    }

    /// An image over existing file bytes (for reading back what a writable engine left).
    static func fromFile(_ bytes: [UInt8]) -> TestImage {
        let header = try! Header.parse(Array(bytes[0..<(1 << Int(bytes.be32(20)))]))
        var img = TestImage(clusterBits: header.clusterBits, size: header.size)
        img.file = bytes
        img.header = header
        return img
    }
}

// MARK: - Image check

/// References and refcounts of an image file, and what is wrong with them. Leaks (a refcount higher
/// than the references) are allowed; a referenced cluster with a lower refcount is corruption.
struct ImageCheck {
    let header: Header
    let geometry: Geometry
    /// Cluster → number of references (metadata and data).
    var references: [UInt64: Int] = [:]
    /// Cluster → refcount, for clusters with a nonzero count.
    var refcounts: [UInt64: UInt64] = [:]
    var problems: [String] = []
    /// Offsets of the L2 tables L1 names.
    var l2Tables: [UInt64] = []

    /// `written`: clusters known to hold written bytes; every referenced table and data cluster must be
    /// one of them (a table or data cluster referenced before it was written is data loss).
    init(_ file: [UInt8], written: Set<UInt64>? = nil) {
        let cs = 1 << Int(file.be32(20))
        header = try! Header.parse(Array(file[0..<cs]))
        geometry = Geometry(header: header)
        let c = UInt64(cs)
        func clusterOf(_ offset: UInt64) -> UInt64 { offset / c }
        func refer(_ cluster: UInt64, _ what: String) { references[cluster, default: 0] += 1 }
        func inFile(_ offset: UInt64, _ what: String) -> Bool {
            if offset == 0 || offset % c != 0 || offset >= UInt64(file.count) {
                problems.append("\(what) at \(hex(offset)) is not a cluster inside the file")
                return false
            }
            return true
        }
        func mustBeWritten(_ cluster: UInt64, _ what: String) {
            if let written, !written.contains(cluster) { problems.append("\(what) in cluster \(cluster) was never written") }
        }

        refer(0, "header")
        let tableStart = header.refcountTableOffset
        let tableEntries = Int(header.refcountTableClusters) * cs / 8
        for k in 0..<UInt64(header.refcountTableClusters) { refer(clusterOf(tableStart) + k, "reftable") }
        for t in 0..<tableEntries {
            let at = Int(tableStart) + 8 * t
            let block = at + 8 <= file.count ? file.be64(at) : 0
            guard block != 0 else { continue }
            guard inFile(block, "refcount block \(t)") else { continue }
            refer(clusterOf(block), "refblock")
            mustBeWritten(clusterOf(block), "refcount block \(t)")
            let bytes = Array(file[Int(block)..<min(Int(block) + cs, file.count)]) + zeros(max(0, Int(block) + cs - file.count))
            bytes.withUnsafeBytes { raw in
                for i in 0..<Int(geometry.refblockCoverage) {
                    let n = RefcountEntry.get(raw, index: i, order: geometry.refcountOrder)
                    if n != 0 { refcounts[UInt64(t) * geometry.refblockCoverage + UInt64(i)] = n }
                }
            }
        }
        let l1Clusters = (Int(header.l1Size) * 8 + cs - 1) / cs
        for k in 0..<UInt64(l1Clusters) { refer(clusterOf(header.l1TableOffset) + k, "L1") }
        var copiedChecks: [(UInt64, String)] = []
        for i in 0..<Int(header.l1Size) {
            let raw = file.be64(Int(header.l1TableOffset) + 8 * i)
            let table = raw & L1Entry.offsetMask
            guard table != 0 else { continue }
            guard inFile(table, "L2 table of L1 entry \(i)") else { continue }
            refer(clusterOf(table), "L2")
            mustBeWritten(clusterOf(table), "L2 table of L1 entry \(i)")
            l2Tables.append(table)
            if raw & L2Entry.copied != 0 { copiedChecks.append((clusterOf(table), "L1 entry \(i)")) }
            for j in 0..<geometry.l2Entries {
                let word = file.be64(Int(table) + 8 * j)
                let mapping: ClusterMapping
                do { mapping = try L2Entry.decode(word, geometry: geometry, index: j) } catch {
                    problems.append("L2 table \(hex(table)) entry \(j): \(error)")
                    continue
                }
                switch mapping {
                case .unallocated, .zero: break
                case .normal(let host, let copied), .zeroAllocated(let host, let copied):
                    guard inFile(host, "data of table \(hex(table)) entry \(j)") else { continue }
                    refer(clusterOf(host), "data")
                    if case .normal = mapping { mustBeWritten(clusterOf(host), "data of table \(hex(table)) entry \(j)") }
                    if copied { copiedChecks.append((clusterOf(host), "table \(hex(table)) entry \(j)")) }
                case .compressed(let host, let n):
                    guard host < UInt64(file.count) else {
                        problems.append("compressed data at \(hex(host)) is past the end of the file")
                        continue
                    }
                    for k in clusterOf(host)...clusterOf(host + UInt64(n) - 1) { refer(k, "compressed") }
                }
            }
        }
        for (cluster, n) in references.sorted(by: { $0.key < $1.key }) {
            let rc = refcounts[cluster] ?? 0
            if rc < UInt64(n) { problems.append("cluster \(cluster): refcount \(rc), referenced \(n) times") }
        }
        for (cluster, what) in copiedChecks where refcounts[cluster] != 1 {
            problems.append("\(what): COPIED set on cluster \(cluster) with refcount \(refcounts[cluster] ?? 0)")
        }
    }

    /// Clusters counted more often than referenced.
    var leaks: [UInt64] {
        refcounts.filter { $0.value > UInt64(references[$0.key] ?? 0) }.map(\.key).sorted()
    }

    func refcount(_ cluster: UInt64) -> UInt64 { refcounts[cluster] ?? 0 }
}

/// Records an issue for every problem the check found.
func expectConsistent(_ file: [UInt8], written: Set<UInt64>? = nil, _ what: String = "",
                      sourceLocation: SourceLocation = #_sourceLocation) {
    let check = ImageCheck(file, written: written)
    for p in check.problems.prefix(10) {
        Issue.record(Comment(rawValue: "\(what): \(p)"), sourceLocation: sourceLocation)
    }
}

/// The whole guest disk as a fresh read-only engine reads `file` (completing its actions in order).
func readBack(_ file: [UInt8], backing: [UInt8]? = nil, sourceLocation: SourceLocation = #_sourceLocation) -> [UInt8] {
    let img = TestImage.fromFile(file)
    guard let engine = try? QCow2Engine(header: img.header, l1: img.l1, fileSize: UInt64(file.count),
                                        backingSize: backing.map { UInt64($0.count) }, cacheBytes: 1 << 20) else {
        Issue.record("the image does not open", sourceLocation: sourceLocation)
        return []
    }
    let size = Int(img.header.size)
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 16)
    defer { buffer.deallocate() }
    buffer.initializeMemory(as: UInt8.self, repeating: 0xee)
    func fill(_ into: UnsafeMutableRawBufferPointer, from bytes: [UInt8], at offset: UInt64) {
        into.initializeMemory(as: UInt8.self, repeating: 0)
        let start = min(Int(offset), bytes.count)
        let n = min(into.count, bytes.count - start)
        if n > 0 { bytes.withUnsafeBytes { into.baseAddress!.copyMemory(from: $0.baseAddress! + start, byteCount: n) } }
    }
    var outcome: BlockOutcome?
    var queue: [IOAction] = []
    engine.read(tag: 1, offset: 0, into: buffer)
    queue += engine.takeActions()
    while !queue.isEmpty {
        let action = queue.removeFirst()
        switch action {
        case .complete(_, let o): outcome = o
        case .readFile(let token, let offset, let into):
            fill(into, from: file, at: offset)
            engine.completed(token, result: .success)
        case .readBacking(let token, let offset, let into):
            fill(into, from: backing ?? [], at: offset)
            engine.completed(token, result: .success)
        case .decompress(let token, _, let source, let into):
            let n = source.count >= 2 ? Int(source[0]) << 8 | Int(source[1]) : 0
            if n > 0 && source.count >= 2 + n {
                for i in 0..<into.count { into[i] = source[2 + i % n] }
                engine.completed(token, result: .success)
            } else {
                engine.completed(token, result: .failure(5))
            }
        default:
            Issue.record("unexpected action reading back: \(action)", sourceLocation: sourceLocation)
            return []
        }
        queue += engine.takeActions()
    }
    guard case .read = outcome else {
        Issue.record("reading back failed: \(String(describing: outcome))", sourceLocation: sourceLocation)
        return []
    }
    return Array(buffer)
}

/// Expects `got == want`, naming the first difference.
func expectSameBytes(_ got: [UInt8], _ want: [UInt8], _ what: String = "", sourceLocation: SourceLocation = #_sourceLocation) {
    guard got != want else { return }
    if got.count != want.count {
        Issue.record(Comment(rawValue: "\(what): \(got.count) bytes, want \(want.count)"), sourceLocation: sourceLocation)
        return
    }
    let i = got.indices.first { got[$0] != want[$0] }!
    Issue.record(Comment(rawValue: "\(what): differs first at byte \(i) (cluster \(i / 512)): got \(got[i]) want \(want[i])"),
                 sourceLocation: sourceLocation)
}

// MARK: - The writable shell

/// Plays QCow2Driver for a writable engine: holds every action until the test completes it.
final class WriteShell {
    enum Op: Equatable, CustomStringConvertible {
        case read(UInt64, Int)
        case readBacking(UInt64, Int)
        case write(UInt64, Int)
        case sync
        case punch(UInt64, UInt64)
        case decompress
        case backingStatus

        var description: String {
            switch self {
            case .read(let o, let n): "read \(o)+\(n)"
            case .readBacking(let o, let n): "readBacking \(o)+\(n)"
            case .write(let o, let n): "write \(o)+\(n)"
            case .sync: "sync"
            case .punch(let o, let n): "punch \(o)+\(n)"
            case .decompress: "decompress"
            case .backingStatus: "backingStatus"
            }
        }
    }

    /// What a file write is, by its offset when it was issued.
    enum Kind: Equatable {
        case data, refblock, reftable, header, l2, l1, other
    }

    struct Event: CustomStringConvertible {
        /// Issued by the engine, or completed by the test.
        let issued: Bool
        let op: Op
        let kind: Kind
        /// Identifies the action across its two events.
        let serial: Int
        /// The bytes of a write, when it is small (metadata and short data).
        let bytes: [UInt8]?
        var description: String { (issued ? "+" : "-") + op.description }
    }

    private(set) var file: [UInt8]
    let backing: [UInt8]?
    let engine: QCow2Engine
    let clusterSize: Int
    private(set) var held: [IOAction] = []
    private var serials: [Int] = []
    private var kinds: [Int: Kind] = [:]
    private var nextSerial = 0
    private(set) var log: [Event] = []
    private(set) var outcomes: [RequestTag: BlockOutcome] = [:]
    private(set) var finished: [RequestTag] = []

    /// Keep durable copies at every sync (costly for big files).
    var trackDurability = true
    /// What a crash now would leave (writes made durable by a completed sync).
    private(set) var durable: [UInt8]
    /// Clusters written in the durable image (clusters of the original image count as written).
    private(set) var durableWritten: Set<UInt64>
    /// Clusters written in the file.
    private(set) var written: Set<UInt64>
    private var pendingSyncs: [Int: ([UInt8], Set<UInt64>)] = [:]
    /// Completed syncs.
    private(set) var syncCount = 0
    /// Called with the durable image at every sync completion.
    var onDurable: (([UInt8], Set<UInt64>) -> Void)?
    /// Called after every completion (and after each request call).
    var afterStep: (() -> Void)?

    private var readBuffers: [RequestTag: UnsafeMutableRawBufferPointer] = [:]
    private var writeBuffers: [UnsafeMutableRawBufferPointer] = []

    init(_ image: TestImage, backing: [UInt8]? = nil, cacheBytes: Int = 1 << 20) throws(QCow2Error) {
        file = image.file
        durable = image.file
        self.backing = backing
        clusterSize = Int(image.geometry.clusterSize)
        let all = Set((0..<UInt64((image.file.count + clusterSize - 1) / clusterSize)))
        written = all
        durableWritten = all
        let h = image.header
        let entries = Int(h.refcountTableClusters) * clusterSize / 8
        let table = (0..<entries).map { image.file.be64(Int(h.refcountTableOffset) + 8 * $0) }
        var blocks: [Int: [UInt8]] = [:]
        for (i, offset) in table.enumerated() where offset != 0 {
            blocks[i] = Array(image.file[Int(offset)..<Int(offset) + clusterSize])
        }
        engine = try QCow2Engine(header: h, l1: image.l1, fileSize: UInt64(image.file.count),
                                 backingSize: backing.map { UInt64($0.count) }, cacheBytes: cacheBytes,
                                 refcountTable: table, refcountBlocks: blocks)
    }

    deinit {
        for (_, b) in readBuffers { b.deallocate() }
        for b in writeBuffers { b.deallocate() }
    }

    // MARK: Requests

    func read(_ tag: RequestTag, _ offset: Int, _ length: Int) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 16)
        buffer.initializeMemory(as: UInt8.self, repeating: 0xee)
        readBuffers[tag] = buffer
        engine.read(tag: tag, offset: UInt64(offset), into: buffer)
        pull()
    }

    func write(_ tag: RequestTag, _ offset: Int, _ bytes: [UInt8], fua: Bool = false) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 16)
        buffer.copyBytes(from: bytes)
        writeBuffers.append(buffer)
        engine.write(tag: tag, offset: UInt64(offset), from: UnsafeRawBufferPointer(buffer), fua: fua)
        pull()
    }

    func trim(_ tag: RequestTag, _ offset: Int, _ length: Int) {
        engine.trim(tag: tag, offset: UInt64(offset), length: UInt64(length), fua: false)
        pull()
    }

    func writeZeroes(_ tag: RequestTag, _ offset: Int, _ length: Int, keepAllocation: Bool = false) {
        engine.writeZeroes(tag: tag, offset: UInt64(offset), length: UInt64(length), keepAllocation: keepAllocation,
                           fastOnly: false, fua: false)
        pull()
    }

    func flush(_ tag: RequestTag) {
        engine.flush(tag: tag)
        pull()
    }

    func bytes(_ tag: RequestTag) -> [UInt8] { Array(readBuffers[tag]!) }

    func done(_ tag: RequestTag) -> Bool { outcomes[tag] != nil }

    func succeeded(_ tag: RequestTag) -> Bool {
        switch outcomes[tag] {
        case .done, .read: true
        default: false
        }
    }

    func error(_ tag: RequestTag) -> BlockError? {
        if case .failed(let e) = outcomes[tag] { return e }
        return nil
    }

    // MARK: Actions

    private func pull() {
        for action in engine.takeActions() {
            switch action {
            case .complete(let tag, let outcome):
                precondition(outcomes[tag] == nil, "request \(tag) completed twice")
                outcomes[tag] = outcome
                finished.append(tag)
            default:
                let serial = nextSerial
                nextSerial += 1
                if case .syncFile = action, trackDurability {
                    pendingSyncs[serial] = (file, written)
                }
                var bytes: [UInt8]?
                if case .writeFile(_, _, let from, _) = action, from.count <= 4096 { bytes = Array(from) }
                log.append(Event(issued: true, op: Self.op(action), kind: kind(of: action), serial: serial, bytes: bytes))
                kinds[serial] = log.last!.kind
                held.append(action)
                serials.append(serial)
            }
        }
        afterStep?()
    }

    /// Classifies a write by what the engine's metadata says lives at its offset now.
    func kind(of action: IOAction) -> Kind {
        guard case .writeFile(_, let o, let bytes, _) = action else { return .other }
        let c = UInt64(clusterSize)
        if o == Header.refcountTableFieldsOffset && bytes.count == 12 { return .header }
        let h = engine.header
        if o >= h.l1TableOffset && o < h.l1TableOffset + UInt64(h.l1Size) * 8 { return .l1 }
        let r = engine.writableState!.refcounts
        if o % c == 0 && r.table.contains(o) { return .refblock }
        if o >= r.tableOffset && o < r.tableOffset + UInt64(r.tableClusters) * c { return .reftable }
        if o % c == 0 && engine.l1.contains(where: { $0 & L1Entry.offsetMask == o }) { return .l2 }
        return .data
    }

    static func op(_ action: IOAction) -> Op {
        switch action {
        case .readFile(_, let o, let b): .read(o, b.count)
        case .readBacking(_, let o, let b): .readBacking(o, b.count)
        case .writeFile(_, let o, let b, _): .write(o, b.count)
        case .syncFile: .sync
        case .punchFile(_, let o, let n): .punch(o, n)
        case .decompress: .decompress
        case .backingStatus: .backingStatus
        case .complete: preconditionFailure("completions are not held")
        }
    }

    /// Completes held action `index` (successfully, or with `errno`).
    func run(_ index: Int, fail errno: Int32? = nil) {
        let action = held.remove(at: index)
        let serial = serials.remove(at: index)
        log.append(Event(issued: false, op: Self.op(action), kind: kinds[serial] ?? .other, serial: serial, bytes: nil))
        let (token, result) = execute(action, serial: serial, failing: errno != nil)
        engine.completed(token, result: errno.map { .failure($0) } ?? result)
        pull()
    }

    /// Completes the first held action matching `predicate`; false when there is none.
    @discardableResult
    func run(first predicate: (IOAction) -> Bool, fail errno: Int32? = nil) -> Bool {
        guard let i = held.firstIndex(where: predicate) else { return false }
        run(i, fail: errno)
        return true
    }

    /// Completes everything not matching `keep`, including actions issued along the way.
    func runAll(_ order: Shell.Order = .fifo, keep: (IOAction) -> Bool = { _ in false }) {
        var rng = SeededRandom(seed: 1)
        if case .random(let seed) = order { rng = SeededRandom(seed: seed) }
        while true {
            let candidates = held.indices.filter { !keep(held[$0]) }
            guard !candidates.isEmpty else { return }
            switch order {
            case .fifo: run(candidates.first!)
            case .lifo: run(candidates.last!)
            case .random: run(candidates[Int.random(in: 0..<candidates.count, using: &rng)])
            }
        }
    }

    func indices(_ predicate: (IOAction) -> Bool) -> [Int] { held.indices.filter { predicate(held[$0]) } }

    /// The ops of the log, issued (`+`) and completed (`-`), optionally only those matching.
    func trace(_ include: (Op) -> Bool = { _ in true }) -> [String] {
        log.filter { include($0.op) }.map(\.description)
    }

    private func execute(_ action: IOAction, serial: Int, failing: Bool) -> (IOToken, IOResult) {
        switch action {
        case .readFile(let token, let offset, let into):
            for i in 0..<into.count {
                let at = Int(offset) + i
                into[i] = at < file.count ? file[at] : 0
            }
            return (token, .success)
        case .readBacking(let token, let offset, let into):
            guard let backing else { Issue.record("readBacking without a backing image"); return (token, .failure(5)) }
            for i in 0..<into.count {
                let at = Int(offset) + i
                into[i] = at < backing.count ? backing[at] : 0
            }
            return (token, .success)
        case .backingStatus(let token, _, let length):
            return (token, .extents([Extent(length: length, flags: [], depth: 1)]))
        case .decompress(let token, _, let source, let into):
            guard source.count >= 2 else { return (token, .failure(5)) }
            let n = Int(source[0]) << 8 | Int(source[1])
            guard n > 0, source.count >= 2 + n else { return (token, .failure(5)) }
            for i in 0..<into.count { into[i] = source[2 + i % n] }
            return (token, .success)
        case .writeFile(let token, let offset, let from, _):
            if !failing {
                let end = Int(offset) + from.count
                if file.count < end { file += zeros(end - file.count) }
                file.withUnsafeMutableBytes { (UnsafeMutableRawBufferPointer(rebasing: $0[Int(offset)..<end])).copyMemory(from: from) }
                let c = UInt64(clusterSize)
                for k in offset / c...(UInt64(end) - 1) / c { written.insert(k) }
            }
            return (token, .success)
        case .syncFile(let token):
            if !failing {
                syncCount += 1
                if let (snapshot, w) = pendingSyncs.removeValue(forKey: serial) {
                    durable = snapshot
                    durableWritten = w
                    onDurable?(durable, durableWritten)
                }
            }
            return (token, .success)
        case .punchFile(let token, let offset, let length):
            if !failing {
                let end = min(file.count, Int(offset + length))
                if Int(offset) < end { for i in Int(offset)..<end { file[i] = 0 } }
                let dend = min(durable.count, Int(offset + length))
                if Int(offset) < dend { for i in Int(offset)..<dend { durable[i] = 0 } }
                let c = UInt64(clusterSize)
                for k in offset / c..<(offset + length) / c {
                    written.remove(k)
                    durableWritten.remove(k)
                }
            }
            return (token, .success)
        case .complete:
            preconditionFailure("completions are not held")
        }
    }
}

extension IOAction {
    var isWriteFile: Bool { if case .writeFile = self { true } else { false } }
    var isSync: Bool { if case .syncFile = self { true } else { false } }
    var isPunch: Bool { if case .punchFile = self { true } else { false } }

    /// Offset of a file read, write or punch.
    var fileOffset: UInt64? {
        switch self {
        case .readFile(_, let o, _), .writeFile(_, let o, _, _), .punchFile(_, let o, _): o
        default: nil
        }
    }

    func isWrite(at offset: UInt64) -> Bool {
        if case .writeFile(_, let o, _, _) = self { return o == offset }
        return false
    }

    func isRead(at offset: UInt64) -> Bool {
        if case .readFile(_, let o, _) = self { return o == offset }
        return false
    }
}

// MARK: - Crash-ordering rules over a shell's log

/// Checks O1–O3 on the order of the log: a metadata write is issued only when everything it depends
/// on is durable (written, then covered by a sync issued after the write completed and since completed):
/// refblocks before reftable entries, a new reftable before the header switch, all of those before
/// L2 tables, L2 tables before L1 entries. Data a flush captured is durable before its L2 tables.
func expectCrashOrder(_ log: [WriteShell.Event], sourceLocation: SourceLocation = #_sourceLocation) {
    // When each write became durable: the completion of the first sync issued after it completed.
    var syncIssued: [Int: Int] = [:]
    var syncs: [(issued: Int, completed: Int)] = []
    var completedAt: [Int: Int] = [:]
    for (i, e) in log.enumerated() {
        if e.issued {
            if e.op == .sync { syncIssued[e.serial] = i }
        } else {
            completedAt[e.serial] = i
            if e.op == .sync, let s = syncIssued[e.serial] { syncs.append((s, i)) }
        }
    }
    syncs.sort { $0.issued < $1.issued }
    func durableAt(_ serial: Int) -> Int {
        guard let done = completedAt[serial] else { return Int.max }
        return syncs.filter { $0.issued > done }.map(\.completed).min() ?? Int.max
    }
    let before: [WriteShell.Kind: [WriteShell.Kind]] = [
        .reftable: [.refblock],
        .header: [.refblock, .reftable],
        .l2: [.refblock, .reftable, .header],
        .l1: [.refblock, .reftable, .header, .l2],
    ]
    // Per kind: the latest durability point among the writes issued so far, and which write it is.
    var latest: [WriteShell.Kind: (at: Int, event: Int)] = [:]
    var reported = 0
    for (i, e) in log.enumerated() where e.issued {
        guard case .write = e.op else { continue }
        for need in before[e.kind] ?? [] {
            if let l = latest[need], l.at >= i, reported < 5 {
                reported += 1
                Issue.record(Comment(rawValue: "\(e.kind) write \(e.op) (event \(i)) issued before the \(need) write "
                    + "of event \(l.event) was durable"), sourceLocation: sourceLocation)
            }
        }
        let d = durableAt(e.serial)
        if latest[e.kind].map({ d > $0.at }) ?? true { latest[e.kind] = (d, i) }
    }
}
