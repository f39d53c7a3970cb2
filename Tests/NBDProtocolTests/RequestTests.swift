// Request headers: parsing both styles, and the encoder used by tests and clients.

import Testing
@testable import NBDProtocol

func parse(_ bytes: [UInt8], extended: Bool) -> Request? {
    bytes.withUnsafeBytes { Request.parse($0, extended: extended) }
}

@Suite("Request headers")
struct RequestTests {
    @Test func headerSizes() {
        #expect(Request.headerSize(extended: false) == 28)
        #expect(Request.headerSize(extended: true) == 32)
    }

    @Test func parsesACompactHeader() {
        let raw = hex("25609513 0005 0001 0102030405060708 1112131415161718 a1b2c3d4")
        #expect(raw.count == 28)
        let r = parse(raw, extended: false)
        #expect(r == Request(flags: [.fua, .dontFragment], type: 1, cookie: 0x0102_0304_0506_0708,
                             offset: 0x1112_1314_1516_1718, length: 0xa1b2_c3d4))
        #expect(r?.command == .write)
    }

    @Test func parsesAnExtendedHeaderWith64BitLength() {
        let raw = hex("21e41c71 0020 0007 ffffffffffffffff 0000000000000200 0000000100000000")
        #expect(raw.count == 32)
        let r = parse(raw, extended: true)
        #expect(r == Request(flags: .payloadLength, type: 7, cookie: .max, offset: 512, length: 1 << 32))
        #expect(r?.command == .blockStatus)
    }

    @Test("a wrong magic is nil", arguments: [
        (UInt32(0x21e4_1c71), false), (0x2560_9513, true), (0, false), (0, true), (0x6744_6698, false),
        (0x1256_0953, false), (0x2560_9514, false), (0x1395_6025, false), (0x711c_e421, true), (.max, true),
    ])
    func badMagic(magic: UInt32, extended: Bool) {
        let raw = be32(magic) + [UInt8](repeating: 0, count: extended ? 28 : 24)
        #expect(parse(raw, extended: extended) == nil)
    }

    @Test func parsesFromUnalignedMemoryWithTrailingPayload() {
        let header = Request(flags: [], type: 1, cookie: 7, offset: 4096, length: 3).encoded(extended: false)
        let raw: [UInt8] = [0xee] + header + [1, 2, 3]
        let r = raw.withUnsafeBytes { Request.parse(UnsafeRawBufferPointer(rebasing: $0[1...]), extended: false) }
        #expect(r == Request(flags: [], type: 1, cookie: 7, offset: 4096, length: 3))
    }

    @Test func encodesExactBytes() {
        let r = Request(flags: [.fua, .noHole], type: 6, cookie: 0xdead_beef, offset: 1 << 40, length: 65536)
        #expect(r.encoded(extended: false) == hex("25609513 0003 0006 00000000deadbeef 0000010000000000 00010000"))
        #expect(r.encoded(extended: true) == hex("21e41c71 0003 0006 00000000deadbeef 0000010000000000 0000000000010000"))
    }

    @Test func commandNumbers() {
        let expected: [(UInt16, NBDCommand?)] = [(0, .read), (1, .write), (2, .disconnect), (3, .flush), (4, .trim),
                                                 (5, .cache), (6, .writeZeroes), (7, .blockStatus), (8, nil),
                                                 (9, nil), (0x8000, nil), (.max, nil)]
        for (type, command) in expected {
            #expect(Request(flags: [], type: type, cookie: 0, offset: 0, length: 0).command == command)
        }
    }

    @Test("round trip through encoded(extended:)", arguments: [false, true])
    func roundTrip(extended: Bool) {
        var rng = SeededRandom(seed: extended ? 2 : 1)
        for _ in 0..<5000 {
            let r = Request(flags: CommandFlags(rawValue: .random(in: 0 ... .max, using: &rng)),
                            type: .random(in: 0 ... .max, using: &rng), cookie: .random(in: 0 ... .max, using: &rng),
                            offset: .random(in: 0 ... .max, using: &rng),
                            length: extended ? .random(in: 0 ... .max, using: &rng) : UInt64(UInt32.random(in: 0 ... .max, using: &rng)))
            let bytes = r.encoded(extended: extended)
            #expect(bytes.count == Request.headerSize(extended: extended))
            #expect(parse(bytes, extended: extended) == r)
            // The other style never accepts it.
            #expect(parse(bytes + [0, 0, 0, 0], extended: !extended) == nil)
        }
    }

    @Test func compactEncodingTruncatesLengthTo32Bits() {
        let r = Request(flags: [], type: 0, cookie: 0, offset: 0, length: 0x1_0000_0200)
        #expect(parse(r.encoded(extended: false), extended: false)?.length == 0x200)
    }

    @Test func randomBytesNeverTrap() {
        var rng = SeededRandom(seed: 99)
        for i in 0..<5000 {
            let extended = i % 2 == 0
            var raw = [UInt8].random(count: Request.headerSize(extended: extended), using: &rng)
            if i % 3 == 0 { raw.replaceSubrange(0..<4, with: be32(extended ? 0x21e4_1c71 : 0x2560_9513)) }
            let r = parse(raw, extended: extended)
            #expect((r != nil) == (readBE(raw[0..<4]) == (extended ? 0x21e4_1c71 : 0x2560_9513)))
            if let r { #expect(r.encoded(extended: extended) == raw) }
        }
    }
}
