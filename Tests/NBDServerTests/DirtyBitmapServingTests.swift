// `qemu:dirty-bitmap:NAME` served over a real socket by a real Server: an in-memory device that keeps
// bitmaps (the DirtyBitmapDevice seam, as the qcow2 driver implements it) marks granules on every
// write; BLOCK_STATUS must answer one chunk per selected context, in context-id order, each covering
// what its source returned, with 32-bit extents under structured replies and 64-bit ones under
// extended headers. Startup refuses names the device lacks or cannot trust, as qemu-nbd does.

import BlockDevice
import Foundation
import NBDProtocol
@testable import NBDServer
import Synchronization
import Testing
import UVCore
#if canImport(Glibc)
import Glibc
#endif

// MARK: - A device that keeps bitmaps in memory

/// Zeros everywhere; the first half of the disk reads as data, the second as a hole. Each bitmap has
/// one bit per granule, set by writes, zeroes and trims while it is enabled. `runLimit` caps the runs
/// one dirtyBitmapStatus returns, so a source covers a prefix of what was asked; bitmap "fails"
/// fails every status call.
final class MemoryBitmapDevice: DirtyBitmapDevice {
    struct Bitmap {
        var info: DirtyBitmapInfo
        var bits: [Bool]
    }

    let size: UInt64
    var bitmaps: [Bitmap]
    let runLimit: Int

    init(size: UInt64, bitmaps: [DirtyBitmapInfo], runLimit: Int = .max) {
        self.size = size
        self.runLimit = runLimit
        self.bitmaps = bitmaps.map { Bitmap(info: $0, bits: Array(repeating: false, count: Int((size + $0.granularity - 1) / $0.granularity))) }
    }

    var capabilities: BlockCapabilities {
        BlockCapabilities(writable: true, canTrim: true, canZero: true, canFastZero: false, preferredBlockSize: 4096)
    }
    var summary: String { "memory bitmap device, \(size) bytes" }
    var dirtyBitmaps: [DirtyBitmapInfo] { bitmaps.map(\.info) }

    private func mark(_ offset: UInt64, _ length: UInt64) {
        for k in bitmaps.indices where bitmaps[k].info.enabled && length > 0 {
            let g = bitmaps[k].info.granularity
            for bit in Int(offset / g)...Int((offset + length - 1) / g) { bitmaps[k].bits[bit] = true }
        }
    }

    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, tag: UInt64, handler: BlockIOHandler) {
        buffer.initializeMemory(as: UInt8.self, repeating: 0)
        handler.blockIOCompleted(tag: tag, outcome: .read(zeroRanges: []))
    }
    func write(offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool, tag: UInt64, handler: BlockIOHandler) {
        mark(offset, UInt64(buffer.count))
        handler.blockIOCompleted(tag: tag, outcome: .done)
    }
    func writeZeroes(offset: UInt64, length: UInt64, options: ZeroOptions, tag: UInt64, handler: BlockIOHandler) {
        mark(offset, length)
        handler.blockIOCompleted(tag: tag, outcome: .done)
    }
    func trim(offset: UInt64, length: UInt64, fua: Bool, tag: UInt64, handler: BlockIOHandler) {
        mark(offset, length)
        handler.blockIOCompleted(tag: tag, outcome: .done)
    }
    func flush(tag: UInt64, handler: BlockIOHandler) { handler.blockIOCompleted(tag: tag, outcome: .done) }
    func cache(offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler) {
        handler.blockIOCompleted(tag: tag, outcome: .done)
    }
    func blockStatus(offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler) {
        let half = size / 2
        let extent = offset < half
            ? Extent(length: min(half - offset, length), flags: [], depth: 1)
            : Extent(length: length, flags: [.hole, .zero], depth: 0)
        handler.blockIOCompleted(tag: tag, outcome: .extents([extent]))
    }
    func dirtyBitmapStatus(name: String, offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler) {
        guard name != "fails", let bitmap = bitmaps.first(where: { $0.info.name == name && !$0.info.inconsistent }) else {
            return handler.blockIOCompleted(tag: tag, outcome: .failed(.invalid))
        }
        let g = bitmap.info.granularity
        var extents: [Extent] = []
        var position = offset
        let end = offset + length
        while position < end && extents.count < runLimit {
            let dirty = bitmap.bits[Int(position / g)]
            var next = (position / g + 1) * g
            while next < end && bitmap.bits[Int(next / g)] == dirty { next += g }
            next = min(next, end)
            extents.append(Extent(length: next - position, flags: ExtentFlags(rawValue: dirty ? 1 : 0), depth: 0))
            position = next
        }
        handler.blockIOCompleted(tag: tag, outcome: .extents(extents))
    }
}

// MARK: - A client that negotiates meta contexts and reads block-status chunks

/// One block-status chunk: context id and (length, flags) pairs.
struct StatusChunk: Equatable {
    var id: UInt32
    var extents: [[UInt64]]
}

extension TestClient {
    /// Structured replies (or extended headers), SET_META_CONTEXT with `queries`, GO. Returns the
    /// selected contexts' ids by name, or nil if negotiation failed.
    func negotiate(extended: Bool, queries: [String], export: String = "") -> [String: UInt32]? {
        guard let greeting = receive(18), greeting.prefix(8).elementsEqual(bytes(NBDMagic.greeting)) else { return nil }
        send(bytes(UInt32(3)))
        func option(_ option: NBDOption, _ payload: [UInt8]) -> [(type: UInt32, body: [UInt8])]? {
            send(bytes(NBDMagic.option) + bytes(option.rawValue) + bytes(UInt32(payload.count)) + payload)
            var replies: [(type: UInt32, body: [UInt8])] = []
            while let header = receive(20) {
                let type = be32(header, 12)
                guard let body = receive(Int(be32(header, 16))) else { return nil }
                replies.append((type, body))
                if type == NBDOptionReply.ack.rawValue { return replies }
                if type & 0x8000_0000 != 0 { return nil }
            }
            return nil
        }
        guard option(extended ? .extendedHeaders : .structuredReply, []) != nil else { return nil }
        var payload = bytes(UInt32(export.utf8.count)) + Array(export.utf8) + bytes(UInt32(queries.count))
        for q in queries { payload += bytes(UInt32(q.utf8.count)) + Array(q.utf8) }
        guard let replies = option(.setMetaContext, payload) else { return nil }
        var ids: [String: UInt32] = [:]
        for r in replies where r.type == NBDOptionReply.metaContext.rawValue {
            ids[String(decoding: r.body.dropFirst(4), as: UTF8.self)] = be32(r.body, 0)
        }
        guard option(.go, bytes(UInt32(export.utf8.count)) + Array(export.utf8) + bytes(UInt16(0))) != nil else { return nil }
        return ids
    }

    func request(_ command: NBDCommand, flags: CommandFlags = [], cookie: UInt64, offset: UInt64, length: UInt64,
                 extended: Bool, payload: [UInt8] = []) {
        // Extended headers: a WRITE says its payload length (PAYLOAD_LEN).
        let flags = extended && command == .write ? flags.union(.payloadLength) : flags
        let r = Request(flags: flags, type: command.rawValue, cookie: cookie, offset: offset, length: length)
        send(r.encoded(extended: extended) + payload)
    }

    /// Chunks of one structured or extended reply up to the one flagged DONE: block-status chunks, or
    /// the errno of an error chunk.
    func statusReply(extended: Bool) -> (chunks: [StatusChunk], error: UInt32)? {
        var chunks: [StatusChunk] = []
        var error: UInt32 = 0
        while true {
            guard let header = receive(extended ? 32 : 20) else { return nil }
            let magic = be32(header, 0)
            guard magic == (extended ? NBDMagic.extendedReply : NBDMagic.structuredReply) else { return nil }
            let flags = be16(header, 4), type = be16(header, 6)
            let length = extended ? Int(be64(header, 24)) : Int(be32(header, 16))
            guard let body = receive(length) else { return nil }
            switch type {
            case 5:
                let n = (body.count - 4) / 8
                chunks.append(StatusChunk(id: be32(body, 0), extents: (0..<n).map { [UInt64(be32(body, 4 + 8 * $0)), UInt64(be32(body, 8 + 8 * $0))] }))
            case 6:
                let n = Int(be32(body, 4))
                #expect(body.count == 8 + 16 * n)
                chunks.append(StatusChunk(id: be32(body, 0), extents: (0..<n).map { [be64(body, 8 + 16 * $0), be64(body, 16 + 16 * $0)] }))
            case 0x8001: error = be32(body, 0)
            case 0: break
            default: Issue.record("unexpected chunk type \(type)")
            }
            if flags & 1 != 0 { return (chunks, error) }
        }
    }

    /// A data-less reply (write, trim): its error.
    func plainReply(extended: Bool) -> UInt32? {
        if let r = statusReply(extended: extended) { return r.error }
        return nil
    }
}

// MARK: - Tests

@Suite(.serialized) struct DirtyBitmapServingTests {
    static let mib: UInt64 = 1 << 20

    /// A server for a memory device registered under the image path, serving `bitmaps`.
    static func serve(_ name: String, size: UInt64 = 8 << 20, bitmaps: [String], runLimit: Int = .max,
                      device infos: [DirtyBitmapInfo]) throws -> RunningServer {
        try RunningServer(image: name, limits: ConnectionLimits(), size: 0) { configuration in
            let path = configuration.exports[0].imagePath
            ImageOpener.registeredDevices.withLock {
                $0[path] = { _ in MemoryBitmapDevice(size: size, bitmaps: infos, runLimit: runLimit) }
            }
            configuration.exports[0].bitmaps = bitmaps
            // Two loops: a test's first client is served on the device's own loop, a second one (while
            // the first is connected) on the other loop, through a ProxyDevice.
            configuration.loops = 2
        }
    }

    static let standard = [
        DirtyBitmapInfo(name: "fine", granularity: 64 << 10, enabled: true, inconsistent: false),
        DirtyBitmapInfo(name: "coarse", granularity: 1 << 20, enabled: true, inconsistent: false),
        DirtyBitmapInfo(name: "frozen", granularity: 512, enabled: false, inconsistent: false),
        DirtyBitmapInfo(name: "broken", granularity: 65536, enabled: true, inconsistent: true),
        DirtyBitmapInfo(name: "fails", granularity: 65536, enabled: true, inconsistent: false),
    ]

    @Test func planOrdersContextsByIdAndAsksEachBitmapOnce() {
        let plan = BlockStatusPlan(selected: [(5, "qemu:dirty-bitmap:b"), (1, "base:allocation"),
                                              (3, "qemu:dirty-bitmap:a"), (2, "qemu:allocation-depth")])
        #expect(plan.contexts.map(\.id) == [1, 2, 3, 5])
        #expect(plan.contexts.map(\.source) == [.allocation, .allocationDepth, .dirtyBitmap(index: 0), .dirtyBitmap(index: 1)])
        #expect(plan.bitmaps == ["a", "b"])
        #expect(plan.needsAllocation && plan.steps == 3)
        #expect(plan.bitmap(atStep: 0) == nil && plan.bitmap(atStep: 1) == "a" && plan.bitmap(atStep: 2) == "b")
        let bitmapsOnly = BlockStatusPlan(selected: [(4, "qemu:dirty-bitmap:x")])
        #expect(!bitmapsOnly.needsAllocation && bitmapsOnly.steps == 1 && bitmapsOnly.bitmap(atStep: 0) == "x")
    }

    @Test func chunksClipMergeHonourRequestOneAndSplitPast32Bits() {
        let dirty = ExtentFlags(rawValue: 1)
        let e = [Extent(length: 4096, flags: dirty, depth: 0), Extent(length: 4096, flags: dirty, depth: 0),
                 Extent(length: 1 << 20, flags: [], depth: 0)]
        func pairs(_ l: [(length: UInt64, flags: UInt32)]) -> [[UInt64]] { l.map { [$0.length, UInt64($0.flags)] } }
        let src = BlockStatusSource.dirtyBitmap(index: 0)
        #expect(pairs(BlockStatusPlan.chunk(e, source: src, length: 10000, requestOne: false, maximumLength: .max)) == [[8192, 1], [1808, 0]])
        #expect(pairs(BlockStatusPlan.chunk(e, source: src, length: 1 << 30, requestOne: true, maximumLength: .max)) == [[8192, 1]])
        #expect(pairs(BlockStatusPlan.chunk([], source: src, length: 512, requestOne: false, maximumLength: .max)) == [[512, 0]])
        let huge = [Extent(length: 10 << 30, flags: [], depth: 2)]
        #expect(pairs(BlockStatusPlan.chunk(huge, source: .allocationDepth, length: 10 << 30, requestOne: false, maximumLength: .max)) == [[10 << 30, 2]])
        let piece: UInt64 = 0xffff_f000
        #expect(pairs(BlockStatusPlan.chunk(huge, source: .allocation, length: 10 << 30, requestOne: false,
                                            maximumLength: UInt64(UInt32.max))) == [[piece, 0], [piece, 0], [(10 << 30) - 2 * piece, 0]])
        #expect(pairs(BlockStatusPlan.chunk(huge, source: .allocation, length: 10 << 30, requestOne: true,
                                            maximumLength: UInt64(UInt32.max))) == [[piece, 0]])
    }

    @Test(arguments: [false, true])
    func writesShowInEachSelectedBitmapAtItsGranularity(extended: Bool) throws {
        let server = try Self.serve("map-\(extended).img", bitmaps: ["fine", "coarse", "frozen"], device: Self.standard)
        defer { _ = server.shutdown() }
        let client = try TestClient(path: server.socketPath)
        let ids = try #require(client.negotiate(extended: extended, queries: [
            "qemu:dirty-bitmap:frozen", "qemu:dirty-bitmap:coarse", "base:allocation", "qemu:dirty-bitmap:fine"]))
        #expect(ids == ["base:allocation": 1, "qemu:dirty-bitmap:fine": 2, "qemu:dirty-bitmap:coarse": 3, "qemu:dirty-bitmap:frozen": 4])
        // A write of 4 KiB at 100 KiB, zeroes over 3 MiB + 10 bytes at 5 MiB, a trim at the last byte.
        client.request(.write, cookie: 1, offset: 100 << 10, length: 4096, extended: extended,
                       payload: [UInt8](repeating: 7, count: 4096))
        #expect(client.plainReply(extended: extended) == 0)
        client.request(.writeZeroes, cookie: 2, offset: 5 * Self.mib, length: 10, extended: extended)
        #expect(client.plainReply(extended: extended) == 0)
        client.request(.trim, cookie: 3, offset: 8 * Self.mib - 1, length: 1, extended: extended)
        #expect(client.plainReply(extended: extended) == 0)

        client.request(.blockStatus, cookie: 9, offset: 0, length: 8 * Self.mib, extended: extended)
        let reply = try #require(client.statusReply(extended: extended))
        #expect(reply.error == 0)
        #expect(reply.chunks.map(\.id) == [1, 2, 3, 4], "one chunk per context, in context-id order")
        let k: UInt64 = 1 << 10
        #expect(reply.chunks[0].extents == [[4 * Self.mib, 0]], "the device answers one allocation extent a call")
        #expect(reply.chunks[1].extents == [[64 * k, 0], [64 * k, 1], [5 * Self.mib - 128 * k, 0], [64 * k, 1],
                                            [3 * Self.mib - 128 * k, 0], [64 * k, 1]])
        #expect(reply.chunks[2].extents == [[Self.mib, 1], [4 * Self.mib, 0], [Self.mib, 1], [Self.mib, 0], [Self.mib, 1]])
        #expect(reply.chunks[3].extents == [[8 * Self.mib, 0]], "a disabled bitmap records nothing")

        // REQ_ONE: one extent per context, each the first of its own map.
        client.request(.blockStatus, flags: .requestOne, cookie: 10, offset: 96 * k, length: 4 * Self.mib, extended: extended)
        let one = try #require(client.statusReply(extended: extended))
        #expect(one.chunks.map(\.extents) == [[[4 * Self.mib - 96 * k, 0]], [[32 * k, 1]], [[Self.mib - 96 * k, 1]], [[4 * Self.mib, 0]]])
    }

    @Test func eachContextCoversWhatItsSourceReturned() throws {
        let server = try Self.serve("prefix.img", bitmaps: ["fine"], runLimit: 2, device: Self.standard)
        defer { _ = server.shutdown() }
        let client = try TestClient(path: server.socketPath)
        let ids = try #require(client.negotiate(extended: false, queries: ["qemu:dirty-bitmap:fine", "base:allocation"]))
        #expect(ids == ["base:allocation": 1, "qemu:dirty-bitmap:fine": 2])
        for (cookie, offset) in [(1, Self.mib), (2, 3 * Self.mib)] {
            client.request(.write, cookie: UInt64(cookie), offset: offset, length: 512, extended: false, payload: [UInt8](repeating: 1, count: 512))
            #expect(client.plainReply(extended: false) == 0)
        }
        client.request(.blockStatus, cookie: 3, offset: 0, length: 8 * Self.mib, extended: false)
        let reply = try #require(client.statusReply(extended: false))
        // Allocation covers the first half (one extent a call); the bitmap source stopped after two runs.
        #expect(reply.chunks == [StatusChunk(id: 1, extents: [[4 * Self.mib, 0]]),
                                 StatusChunk(id: 2, extents: [[Self.mib, 0], [64 << 10, 1]])])
    }

    @Test func bitmapsOverFourGiBGet64BitExtentsOnlyWithExtendedHeaders() throws {
        let size: UInt64 = 12 << 30
        let infos = [DirtyBitmapInfo(name: "big", granularity: 1 << 20, enabled: true, inconsistent: false)]
        let server = try Self.serve("big.img", size: size, bitmaps: ["big"], device: infos)
        defer { _ = server.shutdown() }
        let wide = try TestClient(path: server.socketPath)
        #expect(try #require(wide.negotiate(extended: true, queries: ["qemu:dirty-bitmap:big"])) == ["qemu:dirty-bitmap:big": 2])
        wide.request(.write, cookie: 1, offset: size - 4096, length: 4096, extended: true, payload: [UInt8](repeating: 9, count: 4096))
        #expect(wide.plainReply(extended: true) == 0)
        wide.request(.blockStatus, cookie: 2, offset: 0, length: size, extended: true)
        #expect(try #require(wide.statusReply(extended: true)).chunks == [StatusChunk(id: 2, extents: [[size - (1 << 20), 0], [1 << 20, 1]])])

        let narrow = try TestClient(path: server.socketPath)
        _ = try #require(narrow.negotiate(extended: false, queries: ["qemu:dirty-bitmap:big"]))
        narrow.request(.blockStatus, cookie: 3, offset: 0, length: UInt64(UInt32.max) - 511, extended: false)
        #expect(try #require(narrow.statusReply(extended: false)).chunks == [StatusChunk(id: 2, extents: [[UInt64(UInt32.max) - 511, 0]])])
    }

    @Test func aFailingBitmapFailsTheRequestAndTheConnectionGoesOn() throws {
        let server = try Self.serve("fails.img", bitmaps: ["fine", "fails"], device: Self.standard)
        defer { _ = server.shutdown() }
        let client = try TestClient(path: server.socketPath)
        _ = try #require(client.negotiate(extended: false, queries: ["base:allocation", "qemu:dirty-bitmap:fails"]))
        client.request(.blockStatus, cookie: 1, offset: 0, length: 4096, extended: false)
        let failed = try #require(client.statusReply(extended: false))
        #expect(failed.error == UInt32(EINVAL) && failed.chunks.isEmpty)
        client.request(.blockStatus, cookie: 2, offset: 0, length: 4096, extended: false)
        #expect(try #require(client.statusReply(extended: false)).error == UInt32(EINVAL))
        let other = try TestClient(path: server.socketPath)
        _ = try #require(other.negotiate(extended: false, queries: ["qemu:dirty-bitmap:fine"]))
        other.request(.blockStatus, cookie: 3, offset: 0, length: 4096, extended: false)
        #expect(try #require(other.statusReply(extended: false)).chunks == [StatusChunk(id: 2, extents: [[4096, 0]])])
    }

    @Test func onlyTheExposedBitmapsAreListedAndSelectable() throws {
        let server = try Self.serve("list.img", bitmaps: ["coarse"], device: Self.standard)
        defer { _ = server.shutdown() }
        let client = try TestClient(path: server.socketPath)
        let ids = try #require(client.negotiate(extended: false, queries: ["qemu:dirty-bitmap:fine", "qemu:dirty-bitmap:coarse", "qemu:"]))
        #expect(ids == ["qemu:dirty-bitmap:coarse": 2])
    }

    @Test(arguments: [
        (["nope"], "Bitmap 'nope' is not found in"),
        (["broken"], "Bitmap 'broken' is inconsistent and cannot be used"),
        (["fine", "fine"], "Bitmap 'fine' is named twice"),
    ])
    func startupRefusesBitmapsItCannotServe(names: [String], message: String) {
        do {
            let server = try Self.serve("refuse-\(names.joined()).img", bitmaps: names, device: Self.standard)
            _ = server.shutdown()
            Issue.record("the server started with bitmaps \(names)")
        } catch let failure as ServerStartFailure {
            #expect(failure.message.contains(message), "\(failure.message)")
        } catch {
            Issue.record("\(error)")
        }
    }

    @Test func aRawImageHasNoBitmaps() {
        do {
            let server = try RunningServer(image: "plain.img", limits: ConnectionLimits()) { $0.exports[0].bitmaps = ["b0"] }
            _ = server.shutdown()
            Issue.record("a raw image served a bitmap")
        } catch let failure as ServerStartFailure {
            #expect(failure.message.contains("Bitmap 'b0' is not found"), "\(failure.message)")
            #expect(failure.message.contains("raw image"), "\(failure.message)")
        } catch {
            Issue.record("\(error)")
        }
    }

    @Test func aChangedBitmapListIsAChangedExport() {
        var a = ExportConfiguration(name: "x", imagePath: "/i")
        var b = a
        #expect(!a.differsInService(from: b))
        b.bitmaps = ["b0"]
        #expect(a.differsInService(from: b))
        a.bitmaps = ["b0", "b1"]
        #expect(a.differsInService(from: b))
        b.bitmaps = ["b0", "b1"]
        b.origin = "f:1"
        #expect(!a.differsInService(from: b))
    }
}
