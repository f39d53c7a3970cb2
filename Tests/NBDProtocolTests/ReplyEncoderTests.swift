// ReplyEncoder: exact bytes of every header it writes, in each reply style.

import Testing
@testable import NBDProtocol

/// Runs `body` on a buffer of `capacity` bytes placed at an odd address (so stores must be unaligned-safe),
/// checks it wrote no further than it reports and within capacity, and returns what it wrote.
func encoded(capacity: Int = 256, sourceLocation: SourceLocation = #_sourceLocation,
             _ body: (UnsafeMutableRawPointer) -> Int) -> [UInt8] {
    let slack = 64
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 + capacity + slack, alignment: 16)
    defer { buffer.deallocate() }
    buffer.initializeMemory(as: UInt8.self, repeating: 0xa5)
    let n = body(buffer.baseAddress! + 1)
    #expect(n >= 0 && n <= capacity, sourceLocation: sourceLocation)
    #expect(buffer[0] == 0xa5, "wrote before the buffer", sourceLocation: sourceLocation)
    #expect(buffer[(1 + n)...].allSatisfy { $0 == 0xa5 }, "wrote past the reported length", sourceLocation: sourceLocation)
    return Array(buffer[1..<(1 + n)])
}

func completion(_ style: ReplyStyle, cookie: UInt64 = 0x0102_0304_0506_0708, offset: UInt64 = 0x1000,
                error: NBDErrorCode, message: [UInt8] = []) -> [UInt8] {
    let e = ReplyEncoder(style: style)
    return message.withUnsafeBytes { msg in
        encoded(capacity: e.completionSize(messageLength: message.count)) {
            message.isEmpty
                ? e.completion(into: $0, cookie: cookie, requestOffset: offset, error: error)
                : e.completion(into: $0, cookie: cookie, requestOffset: offset, error: error, message: msg)
        }
    }
}

@Suite("ReplyEncoder")
struct ReplyEncoderTests {
    static let cookie = "0102030405060708"
    static let codes: [NBDErrorCode] = [.notPermitted, .io, .noMemory, .invalid, .noSpace, .overflow, .notSupported, .shutdown]

    @Test func styleFollowsTheSession() {
        func s(_ sr: Bool, _ eh: Bool) -> NegotiatedSession {
            NegotiatedSession(export: Fixture.disk, structuredReplies: sr, extendedHeaders: eh, metaContexts: [],
                              clientHonoursBlockSize: false)
        }
        #expect(ReplyStyle(session: s(false, false)) == .simple)
        #expect(ReplyStyle(session: s(true, false)) == .structured)
        #expect(ReplyStyle(session: s(true, true)) == .extended)
        #expect(ReplyStyle(session: s(false, true)) == .extended)
        #expect(ReplyEncoder(style: .simple).chunkHeaderSize == 16)
        #expect(ReplyEncoder(style: .structured).chunkHeaderSize == 20)
        #expect(ReplyEncoder(style: .extended).chunkHeaderSize == 32)
        #expect(ReplyEncoder(style: .extended).style == .extended)
    }

    @Test func simpleReplySuccess() {
        #expect(completion(.simple, error: .ok) == hex("67446698 00000000" + Self.cookie))
        #expect(ReplyEncoder(style: .simple).completionSize(messageLength: 100) == 16)
    }

    @Test("simple reply errors carry the NBD number and no message", arguments: codes)
    func simpleReplyError(code: NBDErrorCode) {
        #expect(completion(.simple, error: code, message: utf8("ignored")) == hex("67446698") + be32(code.rawValue) + hex(Self.cookie))
    }

    @Test func simpleDataHeaderIsTheSuccessReply() {
        let e = ReplyEncoder(style: .simple)
        for done in [true, false] {
            let bytes = encoded { e.dataHeader(into: $0, cookie: 0xffff_ffff_ffff_ffff, requestOffset: 9, dataOffset: 9,
                                               dataLength: 4096, done: done) }
            #expect(bytes == hex("67446698 00000000 ffffffffffffffff"))
        }
    }

    @Test func noneChunk() {
        #expect(completion(.structured, error: .ok) == hex("668e33ef 0001 0000" + Self.cookie + "00000000"))
        #expect(completion(.extended, error: .ok)
                    == hex("6e8a278c 0001 0000" + Self.cookie + "0000000000001000 0000000000000000"))
        #expect(completion(.extended, offset: .max, error: .ok)
                    == hex("6e8a278c 0001 0000" + Self.cookie + "ffffffffffffffff 0000000000000000"))
    }

    @Test func errorChunkWithMessage() {
        #expect(completion(.structured, error: .invalid, message: utf8("boom"))
                    == hex("668e33ef 0001 8001" + Self.cookie + "0000000a 00000016 0004") + utf8("boom"))
        #expect(completion(.extended, error: .invalid, message: utf8("boom"))
                    == hex("6e8a278c 0001 8001" + Self.cookie + "0000000000001000 000000000000000a 00000016 0004") + utf8("boom"))
    }

    @Test("ERROR chunks without a message, every code", arguments: codes)
    func errorChunkWithoutMessage(code: NBDErrorCode) {
        #expect(completion(.structured, error: code) == hex("668e33ef 0001 8001" + Self.cookie + "00000006") + be32(code.rawValue) + [0, 0])
        #expect(completion(.extended, error: code)
                    == hex("6e8a278c 0001 8001" + Self.cookie + "0000000000001000 0000000000000006") + be32(code.rawValue) + [0, 0])
    }

    @Test("completionSize matches what completion writes", arguments: [ReplyStyle.simple, .structured, .extended])
    func completionSizes(style: ReplyStyle) {
        for length in [0, 1, 100, 4095, 4096, 4097, 10_000] {
            let message = [UInt8](repeating: 0x61, count: length)
            let bytes = completion(style, error: .io, message: message)
            #expect(bytes.count == ReplyEncoder(style: style).completionSize(messageLength: length))
        }
    }

    @Test("messages are capped at the 4096-byte string limit", arguments: [ReplyStyle.structured, .extended])
    func longMessage(style: ReplyStyle) {
        let message = [UInt8](repeating: 0x78, count: 5000)
        let bytes = completion(style, error: .io, message: message)
        let header = style == .structured ? 20 : 32
        #expect(bytes.count == header + 6 + 4096)
        #expect(Array(bytes[(header + 4)..<(header + 6)]) == be16(4096))
        let lengthField = style == .structured ? readBE(bytes[16..<20]) : readBE(bytes[24..<32])
        #expect(lengthField == 6 + 4096)
        #expect(bytes[(header + 6)...].allSatisfy { $0 == 0x78 })
    }

    @Test func offsetDataHeader() {
        let s = ReplyEncoder(style: .structured)
        #expect(encoded { s.dataHeader(into: $0, cookie: 0x0102_0304_0506_0708, requestOffset: 0x1000,
                                       dataOffset: 0x1000, dataLength: 512, done: true) }
                    == hex("668e33ef 0001 0001" + Self.cookie + "00000208 0000000000001000"))
        #expect(encoded { s.dataHeader(into: $0, cookie: 0x0102_0304_0506_0708, requestOffset: 0x1000,
                                       dataOffset: 0x1_0000_0000, dataLength: 32 << 20, done: false) }
                    == hex("668e33ef 0000 0001" + Self.cookie + "02000008 0000000100000000"))
        let x = ReplyEncoder(style: .extended)
        #expect(encoded { x.dataHeader(into: $0, cookie: 0x0102_0304_0506_0708, requestOffset: 0x1000,
                                       dataOffset: 0x3000, dataLength: 512, done: false) }
                    == hex("6e8a278c 0000 0001" + Self.cookie + "0000000000001000 0000000000000208 0000000000003000"))
        #expect(encoded { x.dataHeader(into: $0, cookie: 0x0102_0304_0506_0708, requestOffset: 0x1000,
                                       dataOffset: 0x1000, dataLength: 0, done: true) }.count == 40)
    }

    @Test func offsetHoleChunk() {
        let s = ReplyEncoder(style: .structured)
        #expect(encoded { s.holeChunk(into: $0, cookie: 0x0102_0304_0506_0708, requestOffset: 0, holeOffset: 0x2000,
                                      holeLength: 0x1_0000, done: false) }
                    == hex("668e33ef 0000 0002" + Self.cookie + "0000000c 0000000000002000 00010000"))
        let x = ReplyEncoder(style: .extended)
        #expect(encoded { x.holeChunk(into: $0, cookie: 0x0102_0304_0506_0708, requestOffset: 0x1000, holeOffset: 0x2000,
                                      holeLength: .max, done: true) }
                    == hex("6e8a278c 0001 0002" + Self.cookie + "0000000000001000 000000000000000c 0000000000002000 ffffffff"))
    }

    @Test func blockStatusCompact() {
        let s = ReplyEncoder(style: .structured)
        let extents: [(length: UInt64, flags: UInt32)] = [(4096, 0), (8192, 3)]
        let bytes = encoded { s.blockStatusChunk(into: $0, cookie: 0x0102_0304_0506_0708, requestOffset: 0, contextID: 1,
                                                 extents: extents, done: true) }
        #expect(bytes == hex("668e33ef 0001 0005" + Self.cookie + "00000014 00000001 00001000 00000000 00002000 00000003"))
        #expect(bytes.count == s.blockStatusSize(count: 2))
        let one = encoded { s.blockStatusChunk(into: $0, cookie: 0, requestOffset: 0, contextID: 0xdead_beef,
                                               extents: [(length: UInt64(UInt32.max), flags: 0xffff_ffff)], done: false) }
        #expect(one == hex("668e33ef 0000 0005 0000000000000000 0000000c deadbeef ffffffff ffffffff"))
        #expect(one.count == s.blockStatusSize(count: 1))
    }

    @Test func blockStatusExtended() {
        let x = ReplyEncoder(style: .extended)
        let extents: [(length: UInt64, flags: UInt32)] = [(4096, 0), (8 << 30, 3)]
        let bytes = encoded { x.blockStatusChunk(into: $0, cookie: 0x0102_0304_0506_0708, requestOffset: 0x1000, contextID: 2,
                                                 extents: extents, done: true) }
        #expect(bytes == hex("6e8a278c 0001 0006" + Self.cookie + "0000000000001000 0000000000000028 00000002 00000002"
                             + "0000000000001000 0000000000000000 0000000200000000 0000000000000003"))
        #expect(bytes.count == x.blockStatusSize(count: 2))
    }

    @Test("block status sizes", arguments: [1, 2, 17, 1000])
    func blockStatusSizes(count: Int) {
        let extents = [(length: UInt64, flags: UInt32)](repeating: (512, 1), count: count)
        for style in [ReplyStyle.structured, .extended] {
            let e = ReplyEncoder(style: style)
            let size = e.blockStatusSize(count: count)
            let bytes = encoded(capacity: size) {
                e.blockStatusChunk(into: $0, cookie: 1, requestOffset: 2, contextID: 3, extents: extents, done: true)
            }
            #expect(bytes.count == size)
            let payload = style == .structured ? readBE(bytes[16..<20]) : readBE(bytes[24..<32])
            #expect(Int(payload) == size - e.chunkHeaderSize)
        }
    }

    @Test func maximumHeaderSizeCoversEveryFixedHeader() {
        for style in [ReplyStyle.structured, .extended] {
            let e = ReplyEncoder(style: style)
            let sizes = [
                encoded { e.completion(into: $0, cookie: 0, requestOffset: 0, error: .ok) }.count,
                encoded { e.completion(into: $0, cookie: 0, requestOffset: 0, error: .io) }.count,
                encoded { e.dataHeader(into: $0, cookie: 0, requestOffset: 0, dataOffset: 0, dataLength: 1, done: true) }.count,
                encoded { e.holeChunk(into: $0, cookie: 0, requestOffset: 0, holeOffset: 0, holeLength: 1, done: true) }.count,
            ]
            #expect(sizes.allSatisfy { $0 <= ReplyEncoder.maximumHeaderSize })
        }
    }
}
