// The handshake state machine, option by option.

import Testing
@testable import NBDProtocol

@Suite("Handshake: greeting, client flags, option framing")
struct HandshakeFramingTests {
    @Test func greetingIsEighteenExactBytes() {
        let g = Handshake.greeting
        #expect(g == hex("4e42444d41474943 49484156454f5054 0003"))
        #expect(g.count == 18)
        #expect(Array(g[0..<8]) == utf8("NBDMAGIC"))
        #expect(Array(g[8..<16]) == utf8("IHAVEOPT"))
    }

    @Test func freshMachineWantsFourBytesOfClientFlags() {
        let hs = Handshake(exports: Fixture.exports)
        #expect(hs.state == .awaitingClientFlags)
        #expect(hs.bytesNeeded == 4)
    }

    @Test("known client flags are accepted", arguments: [UInt32(1), 3])
    func knownClientFlags(flags: UInt32) {
        var hs = Handshake(exports: Fixture.exports)
        #expect(hs.receive(be32(flags)) == .proceed(reply: []))
        #expect(hs.state == .awaitingOptionHeader)
        #expect(hs.bytesNeeded == 16)
    }

    @Test("unknown flag bits or no FIXED_NEWSTYLE close the connection",
          arguments: [UInt32(0), 2, 4, 5, 7, 0x8000_0001, 0x0001_0003, 0xffff_fffe, .max])
    func badClientFlags(flags: UInt32) {
        var hs = Handshake(exports: Fixture.exports)
        #expect(hs.receive(be32(flags)).isClose)
        #expect(hs.state == .closed)
        #expect(hs.bytesNeeded == 0)
    }

    @Test("a wrong option magic closes",
          arguments: [UInt64(0), 0x0003_e889_0455_65a9, 0x4e42_444d_4147_4943, 0x5450_4f45_5641_4849,
                      0x4948_4156_454f_5055, .max])
    func badOptionMagic(magic: UInt64) {
        var c = Client()
        #expect(c.hs.receive(optionHeader(NBDOption.go.rawValue, length: 0, magic: magic)).isClose)
        #expect(c.hs.state == .closed)
        #expect(c.hs.bytesNeeded == 0)
    }

    @Test("an option payload over the limit closes before it is read",
          arguments: [UInt32(64 << 10) + 1, 1 << 20, 0x8000_0000, .max])
    func optionTooLong(length: UInt32) {
        var c = Client()
        #expect(c.hs.receive(optionHeader(NBDOption.go.rawValue, length: length)).isClose)
        #expect(c.hs.state == .closed)
        #expect(c.hs.bytesNeeded == 0)
    }

    @Test func optionPayloadAtTheLimitIsReadAndAnswered() {
        var c = Client()
        #expect(c.hs.receive(optionHeader(999, length: 64 << 10)) == .proceed(reply: []))
        #expect(c.hs.state == .awaitingOptionPayload(option: 999, length: 64 << 10))
        #expect(c.hs.bytesNeeded == 64 << 10)
        expectErrorReply(c.hs.receive([UInt8](repeating: 0xee, count: 64 << 10)), option: 999, .errorUnsupported)
        #expect(c.hs.state == .awaitingOptionHeader)
    }

    @Test func customLengthLimitApplies() {
        var limits = HandshakeLimits()
        limits.maximumOptionLength = 8
        var c = Client(limits: limits)
        c.expectError(999, [UInt8](repeating: 0, count: 8), .errorUnsupported)
        #expect(c.send(999, [UInt8](repeating: 0, count: 9)).isClose)
    }

    @Test func defaultLimits() {
        let limits = HandshakeLimits()
        #expect(limits.maximumOptionLength == 65536)
        #expect(limits.maximumOptions == 4096)
        #expect(limits.maximumStringLength == 4096)
    }

    @Test func tooManyOptionsClose() {
        var c = Client()
        for _ in 0..<4096 { c.expectError(999, [], .errorUnsupported) }
        #expect(c.hs.receive(optionHeader(NBDOption.list.rawValue, length: 0)).isClose)
        #expect(c.hs.state == .closed)
    }

    @Test func tooManyOptionsWithCustomLimitCountsEveryKindOfOption() {
        var limits = HandshakeLimits()
        limits.maximumOptions = 3
        var c = Client(limits: limits)
        #expect(c.send(.list).proceedReply != nil)
        c.expectError(.startTLS, [], .errorPolicy)
        c.expectError(.info, infoPayload("nope"), .errorUnknown)
        // The fourth header is refused even though it would be a valid GO.
        #expect(c.send(.go, infoPayload("disk")).isClose)
    }

    @Test func optionPayloadStateCarriesOptionAndLength() {
        var c = Client()
        #expect(c.hs.receive(optionHeader(7, length: 10)) == .proceed(reply: []))
        #expect(c.hs.state == .awaitingOptionPayload(option: 7, length: 10))
        #expect(c.hs.bytesNeeded == 10)
    }
}

@Suite("Handshake: EXPORT_NAME, ABORT, LIST, STARTTLS, unknown options")
struct HandshakeSimpleOptionTests {
    @Test func exportNameWithNoZeroesSendsTenBytes() {
        var c = Client(flags: 3)
        let action = c.send(.exportName, utf8("disk"))
        var seen = Fixture.disk
        seen.flags = TransmissionFlags(rawValue: 0x0d6d)
        let session = NegotiatedSession(export: seen, structuredReplies: false, extendedHeaders: false,
                                        metaContexts: [], clientHonoursBlockSize: false)
        #expect(action == .startTransmission(reply: hex("0000000040000000 0d6d"), session: session))
        #expect(c.hs.state == .finished)
        #expect(c.hs.bytesNeeded == 0)
    }

    @Test func exportNameWithoutNoZeroesSends134Bytes() {
        var c = Client(flags: 1)
        guard case .startTransmission(let reply, let session) = c.send(.exportName, utf8("other")) else {
            Issue.record("EXPORT_NAME did not start transmission")
            return
        }
        #expect(reply.count == 134)
        #expect(reply == be64(3 * 512) + be16(0x0007) + [UInt8](repeating: 0, count: 124))
        #expect(session.export.name == "other")
        #expect(session.export.flags.rawValue == 0x0007)
        #expect(!session.clientHonoursBlockSize)
    }

    @Test func exportNameSelectsTheDefaultExportWithAnEmptyName() {
        let def = ExportDescriptor(name: "", description: "default", size: 4096, flags: [])
        var c = Client([Fixture.disk, def])
        #expect(c.send(.exportName) == .startTransmission(
            reply: be64(4096) + be16(0x0001),
            session: NegotiatedSession(export: def, structuredReplies: false, extendedHeaders: false,
                                       metaContexts: [], clientHonoursBlockSize: false)))
    }

    @Test("EXPORT_NAME for an unknown, malformed or overlong name closes",
          arguments: [utf8("nope"), utf8("Disk"), utf8("disk "), [0xff, 0xfe], [0x64, 0x69, 0x73, 0x6b, 0xc3]])
    func exportNameUnknownCloses(payload: [UInt8]) {
        var c = Client()
        #expect(c.send(.exportName, payload).isClose)
        #expect(c.hs.state == .closed)
        #expect(c.hs.bytesNeeded == 0)
    }

    @Test func exportNameEmptyWithoutDefaultExportCloses() {
        var c = Client()
        #expect(c.send(.exportName).isClose)
    }

    @Test func exportNameLongerThanStringLimitCloses() {
        let long = String(repeating: "n", count: 4097)
        let export = ExportDescriptor(name: long, description: "", size: 512, flags: [])
        var c = Client([export])
        #expect(c.send(.exportName, utf8(long)).isClose)
        // At the limit it is fine.
        let ok = String(repeating: "n", count: 4096)
        var d = Client([ExportDescriptor(name: ok, description: "", size: 512, flags: [])])
        guard case .startTransmission = d.send(.exportName, utf8(ok)) else {
            Issue.record("4096-byte name refused")
            return
        }
    }

    @Test func exportNameAfterStructuredRepliesAdvertisesDFAndCarriesContexts() {
        var c = Client()
        #expect(c.send(.structuredReply) == .proceed(reply: rep(.structuredReply, .ack)))
        _ = c.send(.setMetaContext, metaPayload("disk", [Fixture.base]))
        guard case .startTransmission(let reply, let session) = c.send(.exportName, utf8("disk")) else {
            Issue.record("no transmission")
            return
        }
        #expect(reply == hex("0000000040000000 0ded"))
        #expect(session.structuredReplies)
        #expect(!session.extendedHeaders)
        #expect(session.metaContexts.map(\.id) == [1])
        #expect(session.metaContexts.map(\.name) == [Fixture.base])
    }

    @Test func abortIsAcknowledgedAndEnds() {
        var c = Client()
        #expect(c.send(.abort) == .abort(reply: hex("0003e889045565a9 00000002 00000001 00000000")))
        #expect(c.hs.state == .closed)
        #expect(c.hs.bytesNeeded == 0)
    }

    @Test func abortIgnoresAPayload() {
        var c = Client()
        #expect(c.send(.abort, utf8("junk")) == .abort(reply: rep(.abort, .ack)))
        #expect(c.hs.state == .closed)
    }

    @Test func listSendsOneServerReplyPerExportThenAck() {
        var c = Client()
        let expected = hex("0003e889045565a9 00000003 00000002 00000011 00000004") + utf8("disk") + utf8("test disk")
            + hex("0003e889045565a9 00000003 00000002 00000009 00000005") + utf8("other")
            + hex("0003e889045565a9 00000003 00000001 00000000")
        #expect(c.send(.list) == .proceed(reply: expected))
        #expect(expected == serverReply("disk", "test disk") + serverReply("other", "") + rep(.list, .ack))
        #expect(c.hs.state == .awaitingOptionHeader)
    }

    @Test func listWithNoExportsIsJustAck() {
        var c = Client([])
        #expect(c.send(.list) == .proceed(reply: rep(.list, .ack)))
    }

    @Test func listEncodesMultibyteNamesByByteLength() {
        let e = ExportDescriptor(name: "dïsk→", description: "déscription", size: 512, flags: [])
        var c = Client([e])
        #expect(c.send(.list) == .proceed(reply: serverReply("dïsk→", "déscription") + rep(.list, .ack)))
        #expect(serverReply("dïsk→", "")[20..<24] == [0, 0, 0, 8])
    }

    @Test func listWithPayloadIsInvalidAndNegotiationGoesOn() {
        var c = Client()
        c.expectError(.list, utf8("x"), .errorInvalid)
        c.expectError(.list, [UInt8](repeating: 0, count: 300), .errorInvalid)
        #expect(c.send(.list) == .proceed(reply: serverReply("disk", "test disk") + serverReply("other", "")
                                                + rep(.list, .ack)))
        guard case .startTransmission = c.send(.go, infoPayload("disk")) else {
            Issue.record("GO after a bad LIST failed")
            return
        }
    }

    @Test func startTLSIsRefusedByPolicy() {
        var c = Client()
        c.expectError(.startTLS, [], .errorPolicy)
        c.expectError(.startTLS, utf8("abc"), .errorPolicy)
        #expect(c.send(.list).proceedReply != nil)
    }

    @Test("unknown and withdrawn options get ERR_UNSUP and the loop continues",
          arguments: [UInt32(0), 4, 12, 13, 100, 0x7fff_ffff, 0x8000_0000, 0x8000_0001, .max])
    func unknownOption(option: UInt32) {
        var c = Client()
        c.expectError(option, [], .errorUnsupported)
        c.expectError(option, utf8("payload"), .errorUnsupported)
        #expect(c.send(.list).proceedReply != nil)
    }

    @Test func errorRepliesAreExactlyFramed() {
        var c = Client()
        guard let reply = c.send(.startTLS).proceedReply else {
            Issue.record("no reply")
            return
        }
        #expect(Array(reply[0..<20]) == hex("0003e889045565a9 00000005 80000002") + be32(UInt32(reply.count - 20)))
    }
}

@Suite("Handshake: INFO and GO")
struct HandshakeInfoGoTests {
    static let diskExport = infoExport(size: 1 << 30, flags: 0x0d6d)

    @Test func infoWithoutRequestsSendsExportAndBlockSizeWithMinimumOne() {
        var c = Client()
        let expected = hex("0003e889045565a9 00000006 00000003 0000000c 0000 0000000040000000 0d6d")
            + hex("0003e889045565a9 00000006 00000003 0000000e 0003 00000001 00001000 02000000")
            + hex("0003e889045565a9 00000006 00000001 00000000")
        #expect(c.send(.info, infoPayload("disk")) == .proceed(reply: expected))
        #expect(c.hs.state == .awaitingOptionHeader)
    }

    @Test func infoWithAllRequestsSendsNameDescriptionAndTrueMinimum() {
        var c = Client()
        let expected = rep(.info, .info, Self.diskExport)
            + rep(.info, .info, infoName("disk"))
            + rep(.info, .info, infoDescription("test disk"))
            + rep(.info, .info, infoBlockSize(512, 4096, 32 << 20))
            + rep(.info, .ack)
        #expect(c.send(.info, infoPayload("disk", [1, 2, 3])) == .proceed(reply: expected))
        // The order of the requests does not matter, and unknown request types are ignored.
        #expect(c.send(.info, infoPayload("disk", [99, 3, 0, 2, 0xffff, 1])) == .proceed(reply: expected))
    }

    @Test("INFO_NAME and INFO_DESCRIPTION only when requested", arguments: [
        ([UInt16](), false, false), ([1], true, false), ([2], false, true), ([0], false, false), ([2, 1], true, true),
    ])
    func infoOptionalReplies(requests: [UInt16], name: Bool, description: Bool) {
        var c = Client()
        guard let reply = c.send(.info, infoPayload("disk", requests)).proceedReply,
              let parsed = parseReplies(reply) else {
            Issue.record("no reply")
            return
        }
        let infoTypes = parsed.filter { $0.type == NBDOptionReply.info.rawValue }.map { readBE($0.payload[0..<2]) }
        #expect(infoTypes.contains(0))
        #expect(infoTypes.contains(3))
        #expect(infoTypes.contains(1) == name)
        #expect(infoTypes.contains(2) == description)
        #expect(parsed.last == ParsedReply(option: 6, type: 1, payload: []))
        #expect(parsed.allSatisfy { $0.option == 6 })
    }

    @Test func emptyDescriptionIsNotSentEvenWhenRequested() {
        var c = Client()
        let expected = rep(.info, .info, infoExport(size: 1536, flags: 0x0007))
            + rep(.info, .info, infoName("other"))
            + rep(.info, .info, infoBlockSize(1, 4096, 32 << 20))
            + rep(.info, .ack)
        #expect(c.send(.info, infoPayload("other", [1, 2, 3])) == .proceed(reply: expected))
    }

    @Test func goWithBlockSizeStartsTransmissionHonouringSizes() {
        var c = Client()
        let expected = rep(.go, .info, Self.diskExport) + rep(.go, .info, infoBlockSize(512, 4096, 32 << 20))
            + rep(.go, .ack)
        var seen = Fixture.disk
        seen.flags = TransmissionFlags(rawValue: 0x0d6d)
        let session = NegotiatedSession(export: seen, structuredReplies: false, extendedHeaders: false,
                                        metaContexts: [], clientHonoursBlockSize: true)
        #expect(c.send(.go, infoPayload("disk", [3])) == .startTransmission(reply: expected, session: session))
        #expect(c.hs.state == .finished)
        #expect(c.hs.bytesNeeded == 0)
    }

    @Test func goWithoutBlockSizeAdvertisesMinimumOneAndDoesNotHonour() {
        var c = Client()
        let expected = rep(.go, .info, Self.diskExport) + rep(.go, .info, infoBlockSize(1, 4096, 32 << 20))
            + rep(.go, .ack)
        guard case .startTransmission(let reply, let session) = c.send(.go, infoPayload("disk")) else {
            Issue.record("GO failed")
            return
        }
        #expect(reply == expected)
        #expect(!session.clientHonoursBlockSize)
        #expect(session.export.minimumBlockSize == 512)
        #expect(session.export.name == "disk")
    }

    @Test func goRepeatsWhatInfoSaid() {
        var c = Client()
        _ = c.send(.structuredReply)
        guard let info = c.send(.info, infoPayload("disk", [1, 2, 3])).proceedReply,
              case .startTransmission(let go, _) = c.send(.go, infoPayload("disk", [1, 2, 3])),
              let infoParsed = parseReplies(info), let goParsed = parseReplies(go) else {
            Issue.record("INFO/GO failed")
            return
        }
        #expect(infoParsed.map { [$0.type] + $0.payload.map(UInt32.init) }
                    == goParsed.map { [$0.type] + $0.payload.map(UInt32.init) })
        #expect(goParsed.allSatisfy { $0.option == 7 })
    }

    @Test("unknown export: ERR_UNKNOWN, no INFO replies, negotiation continues",
          arguments: [NBDOption.info, .go], ["nope", "", "DISK", "disk\u{0}"])
    func unknownExport(option: NBDOption, name: String) {
        var c = Client()
        c.expectError(option, infoPayload(name, [1, 2, 3]), .errorUnknown)
        #expect(c.send(.list).proceedReply != nil)
    }

    static let malformed: [(String, [UInt8])] = [
        ("empty", []),
        ("short name length", [0, 0, 0]),
        ("name length only", be32(4)),
        ("name past the end", be32(10) + utf8("disk") + be16(0)),
        ("missing request count", be32(4) + utf8("disk")),
        ("half a request count", be32(4) + utf8("disk") + [0]),
        ("fewer requests than counted", be32(4) + utf8("disk") + be16(2) + be16(3)),
        ("odd trailing byte", be32(4) + utf8("disk") + be16(1) + be16(3) + [0]),
        ("trailing bytes without requests", be32(4) + utf8("disk") + be16(0) + [0, 0]),
        ("huge name length", be32(.max) + utf8("disk") + be16(0)),
        ("name over 4096", be32(4097) + [UInt8](repeating: 0x61, count: 4097) + be16(0)),
        ("name not UTF-8", be32(2) + [0xc3, 0x28] + be16(0)),
        ("request count says all", be32(4) + utf8("disk") + be16(0xffff)),
    ]

    @Test("truncated or overlong INFO/GO payloads are ERR_INVALID",
          arguments: [NBDOption.info, .go], malformed.indices)
    func malformedPayload(option: NBDOption, index: Int) {
        var c = Client()
        c.expectError(option, Self.malformed[index].1, .errorInvalid)
        guard case .startTransmission = c.send(.go, infoPayload("disk")) else {
            Issue.record("GO after \(Self.malformed[index].0) failed")
            return
        }
    }

    @Test func exportFlagsDoNotLeakDFOrFastZeroWithoutTheirPrerequisites() {
        // An export whose driver claims DF and FAST_ZERO but cannot write zeroes.
        let e = ExportDescriptor(name: "x", description: "", size: 512,
                                 flags: [.sendDF, .sendFastZero, .sendFlush])
        var c = Client([e])
        #expect(c.send(.info, infoPayload("x")).proceedReply?.prefix(32).suffix(12)
                    == infoExport(size: 512, flags: 0x0005)[...])
        _ = c.send(.structuredReply)
        guard case .startTransmission(let reply, let session) = c.send(.go, infoPayload("x")) else {
            Issue.record("GO failed")
            return
        }
        #expect(Array(reply[20..<32]) == infoExport(size: 512, flags: 0x0085))
        #expect(session.export.flags == [.hasFlags, .sendFlush, .sendDF])
    }

    @Test func fastZeroStaysWithWriteZeroes() {
        var c = Client()
        guard case .startTransmission(_, let session) = c.send(.go, infoPayload("disk")) else {
            Issue.record("GO failed")
            return
        }
        #expect(session.export.flags.contains([.sendWriteZeroes, .sendFastZero]))
    }

    @Test func longUnknownNameKeepsTheErrorMessageAValidString() {
        // 4096 bytes of two-byte characters: the echoed name alone reaches the string limit.
        let name = String(repeating: "é", count: 2048)
        var c = Client()
        c.expectError(.go, infoPayload(name), .errorUnknown)
        c.expectError(.setMetaContext, metaPayload(name, []), .errorInvalid)
        _ = c.send(.structuredReply)
        c.expectError(.setMetaContext, metaPayload(name, []), .errorUnknown)
    }
}

@Suite("Handshake: STRUCTURED_REPLY and EXTENDED_HEADERS")
struct HandshakeReplyModeTests {
    @Test func structuredReplyIsAcked() {
        var c = Client()
        #expect(c.send(.structuredReply) == .proceed(reply: hex("0003e889045565a9 00000008 00000001 00000000")))
        guard case .startTransmission(_, let s) = c.send(.go, infoPayload("disk")) else {
            Issue.record("GO failed")
            return
        }
        #expect(s.structuredReplies)
        #expect(!s.extendedHeaders)
        #expect(s.export.flags.contains(.sendDF))
    }

    @Test func structuredReplyTwiceIsInvalid() {
        var c = Client()
        #expect(c.send(.structuredReply) == .proceed(reply: rep(.structuredReply, .ack)))
        c.expectError(.structuredReply, [], .errorInvalid)
        guard case .startTransmission(_, let s) = c.send(.go, infoPayload("disk")) else {
            Issue.record("GO failed")
            return
        }
        #expect(s.structuredReplies)
    }

    @Test func structuredReplyWithPayloadIsInvalidAndNotEnabled() {
        var c = Client()
        c.expectError(.structuredReply, [0], .errorInvalid)
        c.expectError(.setMetaContext, metaPayload("disk", [Fixture.base]), .errorInvalid)
        guard case .startTransmission(_, let s) = c.send(.go, infoPayload("disk")) else {
            Issue.record("GO failed")
            return
        }
        #expect(!s.structuredReplies)
        #expect(!s.export.flags.contains(.sendDF))
    }

    @Test func structuredReplyAfterExtendedHeadersNeedsExtendedHeaders() {
        var c = Client()
        #expect(c.send(.extendedHeaders) == .proceed(reply: rep(.extendedHeaders, .ack)))
        c.expectError(.structuredReply, [], .errorExtendedHeaderRequired)
        guard case .startTransmission(_, let s) = c.send(.go, infoPayload("disk")) else {
            Issue.record("GO failed")
            return
        }
        #expect(s.extendedHeaders && s.structuredReplies)
    }

    @Test func extendedHeadersAreAckedAndImplyStructuredReplies() {
        var c = Client()
        #expect(c.send(.extendedHeaders) == .proceed(reply: hex("0003e889045565a9 0000000b 00000001 00000000")))
        // Meta contexts are allowed without an explicit STRUCTURED_REPLY.
        #expect(c.send(.setMetaContext, metaPayload("disk", [Fixture.base]))
                    == .proceed(reply: metaContextReply(.setMetaContext, id: 1, Fixture.base) + rep(.setMetaContext, .ack)))
        guard case .startTransmission(let reply, let s) = c.send(.go, infoPayload("disk", [3])) else {
            Issue.record("GO failed")
            return
        }
        #expect(Array(reply[20..<32]) == infoExport(size: 1 << 30, flags: 0x0ded))
        #expect(s.structuredReplies)
        #expect(s.extendedHeaders)
        #expect(s.clientHonoursBlockSize)
        #expect(s.metaContexts.map(\.name) == [Fixture.base])
        #expect(ReplyStyle(session: s) == .extended)
    }

    @Test func extendedHeadersAfterStructuredRepliesIsAcked() {
        var c = Client()
        _ = c.send(.structuredReply)
        #expect(c.send(.extendedHeaders) == .proceed(reply: rep(.extendedHeaders, .ack)))
    }

    @Test func extendedHeadersTwiceOrWithPayloadIsInvalid() {
        var c = Client()
        c.expectError(.extendedHeaders, [1, 2], .errorInvalid)
        c.expectError(.setMetaContext, metaPayload("disk", []), .errorInvalid)   // still nothing negotiated
        #expect(c.send(.extendedHeaders) == .proceed(reply: rep(.extendedHeaders, .ack)))
        c.expectError(.extendedHeaders, [], .errorInvalid)
    }
}

@Suite("Handshake: LIST_META_CONTEXT and SET_META_CONTEXT")
struct HandshakeMetaContextTests {
    static func go(_ c: inout Client, _ name: String = "disk") -> NegotiatedSession? {
        guard case .startTransmission(_, let s) = c.send(.go, infoPayload(name)) else { return nil }
        return s
    }

    @Test("meta context options before structured replies are invalid",
          arguments: [NBDOption.listMetaContext, .setMetaContext])
    func beforeStructuredReplies(option: NBDOption) {
        var c = Client()
        c.expectError(option, metaPayload("disk", []), .errorInvalid)
        c.expectError(option, metaPayload("disk", [Fixture.base]), .errorInvalid)
        c.expectError(option, [], .errorInvalid)
    }

    @Test func listWithoutQueriesListsEverything() {
        var c = Client()
        _ = c.send(.structuredReply)
        // "The metadata context ID in these replies is reserved and SHOULD be set to zero" (proto.md).
        let expected = hex("0003e889045565a9 00000009 00000004 00000013 00000000") + utf8("base:allocation")
            + hex("0003e889045565a9 00000009 00000004 00000019 00000000") + utf8("qemu:allocation-depth")
            + hex("0003e889045565a9 00000009 00000001 00000000")
        #expect(c.send(.listMetaContext, metaPayload("disk", [])) == .proceed(reply: expected))
        #expect(c.send(.listMetaContext, metaPayload("other", []))
                    == .proceed(reply: metaContextReply(.listMetaContext, id: 0, Fixture.base) + rep(.listMetaContext, .ack)))
    }

    @Test("LIST queries: exact names and namespace wildcards", arguments: [
        (["base:"], ["base:allocation"]),
        (["qemu:"], ["qemu:allocation-depth"]),
        (["base:allocation"], ["base:allocation"]),
        (["qemu:allocation-depth"], ["qemu:allocation-depth"]),
        (["qemu:", "base:"], ["base:allocation", "qemu:allocation-depth"]),
        (["base:", "base:allocation", "base:"], ["base:allocation"]),
        (["nbdkit:", "x-foo:bar"], []),
        ([""], []),
        ([":"], []),
        (["base"], []),
        (["qemu:dirty-bitmap:"], []),
        (["base:alloc"], []),
        (["BASE:"], []),
    ])
    func listQueries(queries: [String], expected: [String]) {
        var c = Client()
        _ = c.send(.structuredReply)
        let want = expected.flatMap { metaContextReply(.listMetaContext, id: 0, $0) } + rep(.listMetaContext, .ack)
        #expect(c.send(.listMetaContext, metaPayload("disk", queries)) == .proceed(reply: want))
    }

    @Test func listDoesNotSelect() {
        var c = Client()
        _ = c.send(.structuredReply)
        _ = c.send(.listMetaContext, metaPayload("disk", [Fixture.base]))
        #expect(Self.go(&c)?.metaContexts.isEmpty == true)
    }

    @Test func setSelectsExactNamesOnlyIgnoringUnknownAndDuplicates() {
        var c = Client()
        _ = c.send(.structuredReply)
        let queries = ["base:", "qemu:", Fixture.depth, "nope:x", Fixture.base, Fixture.base, "qemu:dirty-bitmap:b0"]
        let expected = hex("0003e889045565a9 0000000a 00000004 00000019 00000002") + utf8("qemu:allocation-depth")
            + hex("0003e889045565a9 0000000a 00000004 00000013 00000001") + utf8("base:allocation")
            + hex("0003e889045565a9 0000000a 00000001 00000000")
        #expect(c.send(.setMetaContext, metaPayload("disk", queries)) == .proceed(reply: expected))
        let s = Self.go(&c)
        #expect(s?.metaContexts.map(\.id) == [2, 1])
        #expect(s?.metaContexts.map(\.name) == [Fixture.depth, Fixture.base])
    }

    @Test func setWithOnlyWildcardsSelectsNothing() {
        var c = Client()
        _ = c.send(.structuredReply)
        #expect(c.send(.setMetaContext, metaPayload("disk", ["base:", "qemu:"])) == .proceed(reply: rep(.setMetaContext, .ack)))
        #expect(Self.go(&c)?.metaContexts.isEmpty == true)
    }

    @Test func setWithoutQueriesSelectsNothing() {
        var c = Client()
        _ = c.send(.structuredReply)
        _ = c.send(.setMetaContext, metaPayload("disk", [Fixture.base]))
        #expect(c.send(.setMetaContext, metaPayload("disk", [])) == .proceed(reply: rep(.setMetaContext, .ack)))
        #expect(Self.go(&c)?.metaContexts.isEmpty == true)
    }

    @Test func listIdsAreZeroAndSetIdsAreStable() {
        var c = Client()
        _ = c.send(.structuredReply)
        func ids(_ action: HandshakeAction) -> [String: UInt32] {
            var out: [String: UInt32] = [:]
            for r in parseReplies(action.proceedReply ?? []) ?? [] where r.type == NBDOptionReply.metaContext.rawValue {
                out[String(decoding: r.payload.dropFirst(4), as: UTF8.self)] = UInt32(readBE(r.payload[0..<4]))
            }
            return out
        }
        let listed = ids(c.send(.listMetaContext, metaPayload("disk", [])))
        let setBoth = ids(c.send(.setMetaContext, metaPayload("disk", [Fixture.depth, Fixture.base])))
        let setOne = ids(c.send(.setMetaContext, metaPayload("disk", [Fixture.depth])))
        let listedAgain = ids(c.send(.listMetaContext, metaPayload("disk", ["qemu:"])))
        // LIST ids are reserved and zero; SET hands out real ones, never 0, the same on every SET.
        #expect(listed == [Fixture.base: 0, Fixture.depth: 0])
        #expect(setBoth == [Fixture.base: 1, Fixture.depth: 2])
        #expect(setOne == [Fixture.depth: 2])
        #expect(listedAgain == [Fixture.depth: 0])
        #expect(Fixture.disk.metaContextID(of: Fixture.depth) == 2)
        #expect(Fixture.disk.metaContextID(of: "nope:") == nil)
    }

    @Test func lastSetWins() {
        var c = Client()
        _ = c.send(.structuredReply)
        _ = c.send(.setMetaContext, metaPayload("disk", [Fixture.base, Fixture.depth]))
        _ = c.send(.setMetaContext, metaPayload("disk", [Fixture.depth]))
        let s = Self.go(&c)
        #expect(s?.metaContexts.map(\.name) == [Fixture.depth])
        #expect(s?.metaContexts.map(\.id) == [2])
    }

    @Test func contextsForAnotherExportDoNotCarryIntoGo() {
        var c = Client()
        _ = c.send(.structuredReply)
        _ = c.send(.setMetaContext, metaPayload("other", [Fixture.base]))
        #expect(Self.go(&c, "disk")?.metaContexts.isEmpty == true)

        var d = Client()
        _ = d.send(.structuredReply)
        _ = d.send(.setMetaContext, metaPayload("disk", [Fixture.base]))
        _ = d.send(.info, infoPayload("other"))   // INFO does not change the selection
        #expect(Self.go(&d, "disk")?.metaContexts.map(\.name) == [Fixture.base])

        var e = Client()
        _ = e.send(.structuredReply)
        _ = e.send(.setMetaContext, metaPayload("disk", [Fixture.base]))
        #expect(Self.go(&e, "other")?.metaContexts.isEmpty == true)
    }

    @Test func metaContextsForAnUnknownExportAreErrUnknown() {
        var c = Client()
        _ = c.send(.structuredReply)
        c.expectError(.listMetaContext, metaPayload("nope", []), .errorUnknown)
        c.expectError(.setMetaContext, metaPayload("nope", [Fixture.base]), .errorUnknown)
    }

    @Test func aFailedSetClearsTheSelection() {
        // The spec: SET replaces all previously set contexts, including when it fails.
        var c = Client()
        _ = c.send(.structuredReply)
        _ = c.send(.setMetaContext, metaPayload("disk", [Fixture.base]))
        c.expectError(.setMetaContext, metaPayload("nope", [Fixture.base]), .errorUnknown)
        #expect(Self.go(&c)?.metaContexts.isEmpty == true)

        var d = Client()
        _ = d.send(.structuredReply)
        _ = d.send(.setMetaContext, metaPayload("disk", [Fixture.base]))
        d.expectError(.setMetaContext, metaPayload("disk", [Fixture.base]) + [0], .errorInvalid)
        #expect(Self.go(&d)?.metaContexts.isEmpty == true)
    }

    @Test func aFailedListKeepsTheSelection() {
        var c = Client()
        _ = c.send(.structuredReply)
        _ = c.send(.setMetaContext, metaPayload("disk", [Fixture.base]))
        c.expectError(.listMetaContext, metaPayload("nope", []), .errorUnknown)
        c.expectError(.listMetaContext, [1], .errorInvalid)
        #expect(Self.go(&c)?.metaContexts.map(\.name) == [Fixture.base])
    }

    static let malformed: [(String, [UInt8])] = [
        ("empty", []),
        ("short name length", [0, 0]),
        ("name past the end", be32(5) + utf8("disk")),
        ("missing query count", be32(4) + utf8("disk")),
        ("short query count", be32(4) + utf8("disk") + [0, 0, 1]),
        ("counted query missing", be32(4) + utf8("disk") + be32(1)),
        ("query length short", be32(4) + utf8("disk") + be32(1) + [0, 0]),
        ("query past the end", be32(4) + utf8("disk") + be32(1) + be32(20) + utf8("base:allocation")),
        ("more queries counted than sent", be32(4) + utf8("disk") + be32(2) + be32(15) + utf8("base:allocation")),
        ("huge query count", be32(4) + utf8("disk") + be32(.max)),
        ("trailing bytes", metaPayload("disk", [Fixture.base]) + [0]),
        ("trailing bytes, no queries", metaPayload("disk", []) + [0, 0, 0, 0]),
        ("huge name length", be32(.max) + utf8("disk") + be32(0)),
        ("name over 4096", be32(4097) + [UInt8](repeating: 0x61, count: 4097) + be32(0)),
        ("name not UTF-8", be32(1) + [0x80] + be32(0)),
        ("query not UTF-8", be32(4) + utf8("disk") + be32(1) + be32(2) + [0xc0, 0xaf]),
        ("query over 4096", be32(4) + utf8("disk") + be32(1) + be32(4097) + [UInt8](repeating: 0x61, count: 4097)),
        ("huge query length", be32(4) + utf8("disk") + be32(1) + be32(.max)),
    ]

    @Test("malformed meta context payloads are ERR_INVALID",
          arguments: [NBDOption.listMetaContext, .setMetaContext], malformed.indices)
    func malformedPayload(option: NBDOption, index: Int) {
        var c = Client()
        _ = c.send(.structuredReply)
        c.expectError(option, Self.malformed[index].1, .errorInvalid)
        #expect(c.send(.listMetaContext, metaPayload("disk", [])).proceedReply?.isEmpty == false)
    }

    @Test func queriesAtTheStringLimitAreAccepted() {
        var c = Client()
        _ = c.send(.structuredReply)
        let q = "base:" + String(repeating: "a", count: 4091)
        #expect(c.send(.setMetaContext, metaPayload("disk", [q])) == .proceed(reply: rep(.setMetaContext, .ack)))
    }

    @Test func exportWithoutContextsListsNothing() {
        let e = ExportDescriptor(name: "bare", description: "", size: 512, flags: [], metaContexts: [])
        var c = Client([e])
        _ = c.send(.structuredReply)
        #expect(c.send(.listMetaContext, metaPayload("bare", [])) == .proceed(reply: rep(.listMetaContext, .ack)))
        #expect(c.send(.setMetaContext, metaPayload("bare", [Fixture.base])) == .proceed(reply: rep(.setMetaContext, .ack)))
    }
}
