// Test doubles for the qcow2 read path: an image builder that hand-places header, L1, L2 and data
// clusters in a byte array, and a `Shell` that plays the I/O shell for QCow2Engine: it holds every
// action the engine emits and lets a test choose which one completes next (and whether it fails).
//
// Compressed clusters use a fake codec (a 2-byte big-endian payload length, the payload, then
// whatever follows; "decompressing" tiles the payload over the destination). It exercises the
// engine's plumbing (descriptor read, scratch buffers, partial copies, trailing bytes ignored) without
// zlib, which this test target cannot see; real deflate/zstd is covered by the interop suite.

import BlockDevice
import Foundation
import Testing
@testable import QCow2

// MARK: - Small helpers

/// SplitMix64: deterministic, seedable randomness for reproducible shuffles.
struct SeededRandom: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9e37_79b9_7f4a_7c15
        var z = state
        z = (z ^ (z >> 30)) &* 0xbf58_476d_1ce4_e5b9
        z = (z ^ (z >> 27)) &* 0x94d0_49bb_1331_11eb
        return z ^ (z >> 31)
    }
}

func patternBytes(_ seed: UInt64, _ count: Int) -> [UInt8] {
    var rng = SeededRandom(seed: seed &* 7919 &+ 17)
    var out = [UInt8](repeating: 0, count: count)
    var i = 0
    while i < count {
        let v = rng.next()
        for k in 0..<8 where i + k < count { out[i + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(k))) }
        i += 8
    }
    return out
}

func zeros(_ n: Int) -> [UInt8] { [UInt8](repeating: 0, count: n) }

/// The fake codec's output for `payload`: the payload tiled over `count` bytes.
func tiled(_ payload: [UInt8], _ count: Int) -> [UInt8] {
    (0..<count).map { payload[$0 % payload.count] }
}

/// Fake-codec stream for `payload`.
func fakeCompressed(_ payload: [UInt8]) -> [UInt8] {
    [UInt8(payload.count >> 8), UInt8(payload.count & 0xff)] + payload
}

// MARK: - Image builder

/// A qcow2 image in memory. Layout: cluster 0 header, 1 refcount table, 2 refcount block, 3... L1;
/// everything else is appended. `expected` is what the guest should read where the image itself
/// decides; `fromBacking` marks (per subcluster) what comes from the backing file instead.
struct TestImage {
    var header: Header
    var file: [UInt8]
    let geometry: Geometry
    var expected: [UInt8]
    var fromBacking: [Bool]

    var cs: Int { Int(geometry.clusterSize) }

    init(clusterBits: UInt32 = 9, size: UInt64, extendedL2: Bool = false, version: UInt32 = 3,
         compressionType: UInt8 = 0, backingName: String? = nil) {
        let cs = 1 << Int(clusterBits)
        var incompatible: UInt64 = extendedL2 ? FeatureBit.extendedL2 : 0
        if compressionType == 1 { incompatible |= FeatureBit.compressionType }
        let entryBytes: UInt64 = extendedL2 ? 16 : 8
        let coverage = UInt64(cs) * (UInt64(cs) / entryBytes)
        let l1Size = UInt32((size + coverage - 1) / coverage)
        let l1Clusters = max(1, (Int(l1Size) * 8 + cs - 1) / cs)
        var h = Header(
            version: version, backingFileOffset: 0, backingFileSize: 0, clusterBits: clusterBits, size: size,
            cryptMethod: 0, l1Size: l1Size, l1TableOffset: UInt64(3 * cs), refcountTableOffset: UInt64(cs),
            refcountTableClusters: 1, snapshotCount: 0, snapshotsOffset: 0,
            incompatibleFeatures: version == 3 ? incompatible : 0, compatibleFeatures: 0, autoclearFeatures: 0,
            refcountOrder: 4, headerLength: version == 3 ? 112 : 72, compressionType: version == 3 ? compressionType : 0,
            extensions: [], backingFileName: backingName)
        if backingName != nil {
            h.extensions = [HeaderExtension(type: HeaderExtensionType.backingFormat, data: Array("raw".utf8))]
        }
        var bytes = h.encodeNew()
        bytes += zeros((2 + l1Clusters) * cs)
        bytes.setBE64(UInt64(2 * cs), at: cs)   // reftable[0] -> the refcount block
        file = bytes
        header = try! Header.parse(Array(bytes[0..<cs]))
        geometry = Geometry(header: header)
        expected = zeros(Int(size))
        fromBacking = [Bool](repeating: true, count: Int((size + geometry.subclusterSize - 1) / geometry.subclusterSize))
    }

    var l1: [UInt64] {
        (0..<Int(header.l1Size)).map { file.be64(Int(header.l1TableOffset) + 8 * $0) }
    }

    @discardableResult
    mutating func appendCluster(_ contents: [UInt8]? = nil) -> UInt64 {
        file += zeros((cs - file.count % cs) % cs)   // compressed data may have left the end unaligned
        let offset = UInt64(file.count)
        let c = contents ?? zeros(cs)
        precondition(c.count == cs)
        file += c
        return offset
    }

    /// The L2 table of `l1Index`, allocated (appended) on first use.
    @discardableResult
    mutating func l2Table(_ l1Index: Int) -> UInt64 {
        let at = Int(header.l1TableOffset) + 8 * l1Index
        let existing = file.be64(at) & L1Entry.offsetMask
        if existing != 0 { return existing }
        let table = appendCluster()
        file.setBE64(table | L2Entry.copied, at: at)
        return table
    }

    /// Host offset of guest cluster `cluster`'s L2 entry (allocating its table).
    mutating func l2EntryOffset(_ cluster: Int) -> Int {
        let table = l2Table(cluster / geometry.l2Entries)
        return Int(table) + (cluster % geometry.l2Entries) * geometry.l2EntryBytes
    }

    mutating func setL2(_ cluster: Int, _ raw: UInt64, bitmap: UInt64 = 0) {
        let at = l2EntryOffset(cluster)
        file.setBE64(raw, at: at)
        if geometry.extendedL2 { file.setBE64(bitmap, at: at + 8) }
    }

    private mutating func setExpected(_ cluster: Int, _ bytes: [UInt8]) {
        let start = cluster * cs
        let n = min(cs, expected.count - start)
        expected.replaceSubrange(start..<start + n, with: bytes[0..<n])
        let subs = geometry.subclusters
        for s in 0..<subs where cluster * subs + s < fromBacking.count { fromBacking[cluster * subs + s] = false }
    }

    /// Normal cluster with `contents` at a freshly appended host cluster.
    @discardableResult
    mutating func mapData(_ cluster: Int, _ contents: [UInt8]) -> UInt64 {
        let host = appendCluster(contents)
        setL2(cluster, host | L2Entry.copied, bitmap: geometry.extendedL2 ? 0xffff_ffff : 0)
        setExpected(cluster, contents)
        return host
    }

    /// Normal cluster pointing at an existing host cluster (whose bytes are `contents`).
    mutating func mapExisting(_ cluster: Int, host: UInt64) {
        setL2(cluster, host | L2Entry.copied, bitmap: geometry.extendedL2 ? 0xffff_ffff : 0)
        setExpected(cluster, Array(file[Int(host)..<Int(host) + cs]))
    }

    mutating func mapZero(_ cluster: Int) {
        setL2(cluster, L2Entry.zeroFlag)
        setExpected(cluster, zeros(cs))
    }

    mutating func mapZeroAllocated(_ cluster: Int) {
        let host = appendCluster(patternBytes(99, cs))   // stale bytes that must never be read
        setL2(cluster, host | L2Entry.copied | L2Entry.zeroFlag)
        setExpected(cluster, zeros(cs))
    }

    /// Compressed cluster (fake codec) whose stream starts at the current end of file plus `skew` bytes.
    /// The descriptor covers whole 512-byte sectors, so it may claim bytes past the end of the file.
    @discardableResult
    mutating func mapCompressed(_ cluster: Int, payload: [UInt8], skew: Int = 0, trailing: Int = 0)
        -> (host: UInt64, byteCount: Int) {
        file += patternBytes(7, skew)
        let host = UInt64(file.count)
        let stream = fakeCompressed(payload)
        file += stream
        file += patternBytes(8, trailing)
        let sectors = (Int(host % 512) + stream.count + 511) / 512
        precondition(sectors <= 1 << (geometry.clusterBits - 8), "compressed stream too long for the descriptor")
        let x = geometry.compressedOffsetBits
        setL2(cluster, L2Entry.compressedFlag | (UInt64(sectors - 1) << UInt64(x)) | host)
        setExpected(cluster, tiled(payload, cs))
        return (host, sectors * 512 - Int(host % 512))
    }

    /// Extended L2: a normal cluster whose subclusters are data (`alloc`), zero (`zero`) or unallocated.
    mutating func mapSubclusters(_ cluster: Int, alloc: UInt32, zero: UInt32, contents: [UInt8]) {
        precondition(geometry.extendedL2 && alloc & zero == 0)
        let host = alloc == 0 ? 0 : appendCluster(contents)
        setL2(cluster, host == 0 ? 0 : host | L2Entry.copied, bitmap: UInt64(zero) << 32 | UInt64(alloc))
        let sub = Int(geometry.subclusterSize)
        for s in 0..<32 {
            let unit = cluster * 32 + s
            let start = unit * sub
            if alloc & (1 << UInt32(s)) != 0 {
                expected.replaceSubrange(start..<start + sub, with: contents[s * sub..<(s + 1) * sub])
                fromBacking[unit] = false
            } else if zero & (1 << UInt32(s)) != 0 {
                expected.replaceSubrange(start..<start + sub, with: zeros(sub))
                fromBacking[unit] = false
            }
        }
    }

    /// What a guest read of `offset..<offset+length` must return.
    func guestBytes(_ offset: Int, _ length: Int, backing: [UInt8]?) -> [UInt8] {
        var out = Array(expected[offset..<offset + length])
        let unit = Int(geometry.subclusterSize)
        for i in 0..<length where fromBacking[(offset + i) / unit] {
            let g = offset + i
            out[i] = backing.map { g < $0.count ? $0[g] : 0 } ?? 0
        }
        return out
    }
}

// MARK: - The shell

/// Plays QCow2Driver for the engine: executes actions against in-memory bytes, in an order the test
/// chooses.
final class Shell {
    var file: [UInt8]
    let backing: [UInt8]?
    /// Answer to `.backingStatus(offset, length)`.
    var backingStatus: (UInt64, UInt64) -> [Extent] = { _, length in [Extent(length: length, flags: [], depth: 1)] }
    let engine: QCow2Engine
    /// Actions issued and not yet completed, in issue order.
    private(set) var held: [IOAction] = []
    private(set) var outcomes: [RequestTag: BlockOutcome] = [:]
    /// Request tags in the order they completed.
    private(set) var finished: [RequestTag] = []
    /// Every `.readFile` ever issued, in order.
    private(set) var fileReads: [(offset: UInt64, count: Int)] = []
    private var buffers: [RequestTag: UnsafeMutableRawBufferPointer] = [:]

    init(_ image: TestImage, backing: [UInt8]? = nil, cacheBytes: Int = 1 << 20) throws(QCow2Error) {
        file = image.file
        self.backing = backing
        engine = try QCow2Engine(header: image.header, l1: image.l1, fileSize: UInt64(image.file.count),
                                 backingSize: backing.map { UInt64($0.count) }, cacheBytes: cacheBytes)
    }

    deinit {
        for (_, b) in buffers { b.deallocate() }
    }

    // Requests

    func read(_ tag: RequestTag, _ offset: Int, _ length: Int) {
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: length, alignment: 16)
        buffer.initializeMemory(as: UInt8.self, repeating: 0xee)   // garbage: zero fills must really write
        buffers[tag] = buffer
        engine.read(tag: tag, offset: UInt64(offset), into: buffer)
        pull()
    }

    func status(_ tag: RequestTag, _ offset: Int, _ length: Int) {
        engine.blockStatus(tag: tag, offset: UInt64(offset), length: UInt64(length))
        pull()
    }

    func buffer(_ tag: RequestTag) -> UnsafeMutableRawBufferPointer { buffers[tag]! }

    func bytes(_ tag: RequestTag) -> [UInt8] { Array(buffers[tag]!) }

    func done(_ tag: RequestTag) -> Bool { outcomes[tag] != nil }

    func zeroRanges(_ tag: RequestTag) -> [Range<UInt64>]? {
        if case .read(let z) = outcomes[tag] { return z }
        return nil
    }

    func error(_ tag: RequestTag) -> BlockError? {
        if case .failed(let e) = outcomes[tag] { return e }
        return nil
    }

    func extents(_ tag: RequestTag) -> [Extent]? {
        if case .extents(let e) = outcomes[tag] { return e }
        return nil
    }

    // Actions

    private func pull() {
        for action in engine.takeActions() {
            switch action {
            case .complete(let tag, let outcome):
                precondition(outcomes[tag] == nil, "request \(tag) completed twice")
                outcomes[tag] = outcome
                finished.append(tag)
            case .readFile(_, let offset, let into):
                fileReads.append((offset, into.count))
                held.append(action)
            default:
                held.append(action)
            }
        }
    }

    /// Completes held action `index` (successfully, or with `errno`).
    func run(_ index: Int, fail errno: Int32? = nil) {
        let action = held.remove(at: index)
        let (token, result) = execute(action)
        engine.completed(token, result: errno.map { .failure($0) } ?? result)
        pull()
    }

    enum Order { case fifo, lifo, random(UInt64) }

    /// Completes everything, including actions issued along the way.
    func runAll(_ order: Order = .fifo) {
        var rng = SeededRandom(seed: 1)
        if case .random(let seed) = order { rng = SeededRandom(seed: seed) }
        while !held.isEmpty {
            switch order {
            case .fifo: run(0)
            case .lifo: run(held.count - 1)
            case .random: run(Int.random(in: 0..<held.count, using: &rng))
            }
        }
    }

    /// Indices of held actions matching `predicate`.
    func indices(_ predicate: (IOAction) -> Bool) -> [Int] {
        held.indices.filter { predicate(held[$0]) }
    }

    /// Index of the held `.readFile` at `offset`.
    func heldFileRead(at offset: UInt64) -> Int? {
        indices { if case .readFile(_, let o, _) = $0 { return o == offset } else { return false } }.first
    }

    func fileReadCount(at offset: UInt64) -> Int { fileReads.filter { $0.offset == offset }.count }

    private func execute(_ action: IOAction) -> (IOToken, IOResult) {
        switch action {
        case .readFile(let token, let offset, let into):
            copy(from: file, offset: offset, into: into)
            return (token, .success)
        case .readBacking(let token, let offset, let into):
            guard let backing else { Issue.record("readBacking without a backing image"); return (token, .failure(5)) }
            copy(from: backing, offset: offset, into: into)
            return (token, .success)
        case .backingStatus(let token, let offset, let length):
            if backing == nil { Issue.record("backingStatus without a backing image") }
            return (token, .extents(backingStatus(offset, length)))
        case .decompress(let token, _, let source, let into):
            guard source.count >= 2 else { return (token, .failure(5)) }
            let n = Int(source[0]) << 8 | Int(source[1])
            guard n > 0, source.count >= 2 + n else { return (token, .failure(5)) }
            for i in 0..<into.count { into[i] = source[2 + i % n] }
            return (token, .success)
        case .writeFile(let token, _, _, _), .syncFile(let token), .punchFile(let token, _, _):
            Issue.record("a read-only engine wrote: \(action)")
            return (token, .failure(30))
        case .complete:
            preconditionFailure("completions are not held")
        }
    }

    private func copy(from bytes: [UInt8], offset: UInt64, into: UnsafeMutableRawBufferPointer) {
        for i in 0..<into.count {
            let at = Int(offset) + i
            into[i] = at < bytes.count ? bytes[at] : 0
        }
    }
}

extension IOAction {
    var isReadFile: Bool { if case .readFile = self { true } else { false } }
    var isReadBacking: Bool { if case .readBacking = self { true } else { false } }
    var isDecompress: Bool { if case .decompress = self { true } else { false } }
    var isBackingStatus: Bool { if case .backingStatus = self { true } else { false } }

    /// Destination buffer of a read or decompression.
    var destination: UnsafeMutableRawBufferPointer? {
        switch self {
        case .readFile(_, _, let b), .readBacking(_, _, let b), .decompress(_, _, _, let b): b
        default: nil
        }
    }
}

// MARK: - qemu-img in a temp dir

enum Qemu {
    static let imgPath: String? = ["/usr/bin/qemu-img", "/usr/local/bin/qemu-img"].first {
        FileManager.default.isExecutableFile(atPath: $0)
    }
    static var available: Bool { imgPath != nil && FileManager.default.isExecutableFile(atPath: "/usr/bin/qemu-io") }

    /// Runs a tool from /usr/bin with `args` in `dir`; returns stdout, records an issue on failure.
    @discardableResult
    static func run(_ tool: String, _ args: [String], in dir: URL) throws -> String {
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/" + tool)
        p.arguments = args
        p.currentDirectoryURL = dir
        let out = Pipe()
        let err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        let data = out.fileHandleForReading.readDataToEndOfFile()
        let errData = err.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        guard p.terminationStatus == 0 else {
            throw QemuFailure(text: "\(tool) \(args.joined(separator: " ")): exit \(p.terminationStatus): "
                + String(decoding: errData, as: UTF8.self))
        }
        return String(decoding: data, as: UTF8.self)
    }

    struct QemuFailure: Error, CustomStringConvertible { let text: String; var description: String { text } }

    /// A fresh temp dir, removed by the caller's `defer`.
    static func tempDir() throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("qcow2tests-" + UUID().uuidString)
        try FileManager.default.createDirectory(at: url, withIntermediateDirectories: true)
        return url
    }

    static func bytes(_ url: URL) throws -> [UInt8] { [UInt8](try Data(contentsOf: url)) }
}
