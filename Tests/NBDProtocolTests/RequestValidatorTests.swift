// RequestValidator: every command and flag, ranges, sizes, payload rules and alignment.

import Testing
@testable import NBDProtocol

/// A verdict without its log reason.
enum Outcome: Equatable, CustomStringConvertible {
    case execute(NBDCommand, payload: Int)
    case reject(NBDErrorCode, payload: Int)
    case disconnect
    case fatal

    var description: String {
        switch self {
        case .execute(let c, let p): "execute(\(c), \(p))"
        case .reject(let e, let p): "reject(\(e), \(p))"
        case .disconnect: "disconnect"
        case .fatal: "fatal"
        }
    }
}

extension RequestVerdict {
    var outcome: Outcome {
        switch self {
        case .execute(let c, let p): .execute(c, payload: p)
        case .reject(let e, let p, _): .reject(e, payload: p)
        case .disconnect: .disconnect
        case .fatal: .fatal
        }
    }
}

enum V {
    static func session(flags: TransmissionFlags = Fixture.rwFlags, size: UInt64 = 1 << 30, sr: Bool = true,
                        extended: Bool = false, contexts: Bool = true, honours: Bool = false,
                        minimum: UInt32 = 1, maximum: UInt32 = 32 << 20) -> NegotiatedSession {
        let export = ExportDescriptor(name: "v", description: "", size: size, flags: flags, minimumBlockSize: minimum,
                                      preferredBlockSize: 4096, maximumBlockSize: maximum)
        return NegotiatedSession(export: export, structuredReplies: sr || extended, extendedHeaders: extended,
                                 metaContexts: contexts ? [(id: UInt32(1), name: Fixture.base)] : [],
                                 clientHonoursBlockSize: honours)
    }

    static func check(_ s: NegotiatedSession, _ command: NBDCommand, flags: CommandFlags = [], offset: UInt64 = 0,
                      length: UInt64) -> Outcome {
        check(s, type: command.rawValue, flags: flags, offset: offset, length: length)
    }

    static func check(_ s: NegotiatedSession, type: UInt16, flags: CommandFlags = [], offset: UInt64 = 0,
                      length: UInt64) -> Outcome {
        RequestValidator(session: s).validate(Request(flags: flags, type: type, cookie: 0xc0ffee, offset: offset, length: length)).outcome
    }
}

@Suite("RequestValidator")
struct RequestValidatorTests {
    struct Config: Sendable, CustomTestStringConvertible {
        var structured: Bool
        var fastZero: Bool
        var extended: Bool
        var testDescription: String { "SR \(structured), FAST_ZERO \(fastZero), extended \(extended)" }
    }

    /// Flags each command accepts (FUA everywhere; see cli-spec and proto.md), before negotiation adjusts them.
    static let allowed: [NBDCommand: CommandFlags] = [
        .read: [.fua, .dontFragment], .write: [.fua], .flush: [.fua], .trim: [.fua], .cache: [.fua],
        .writeZeroes: [.fua, .noHole, .fastZero], .blockStatus: [.fua, .requestOne],
    ]

    static let flagValues: [UInt16] = Array(0..<64) + [1 << 6, 1 << 7, 1 << 8, 1 << 14, 1 << 15, 0x41, 0xffc0, 0xffff]

    @Test("every command with every flag combination", arguments: [
        Config(structured: true, fastZero: true, extended: false),
        Config(structured: false, fastZero: true, extended: false),
        Config(structured: true, fastZero: false, extended: false),
        Config(structured: true, fastZero: true, extended: true),
        Config(structured: true, fastZero: false, extended: true),
    ])
    func commandFlagMatrix(config: Config) {
        var exportFlags = Fixture.rwFlags
        if !config.fastZero { exportFlags.remove(.sendFastZero) }
        let s = V.session(flags: exportFlags, sr: config.structured, extended: config.extended)
        let length: UInt64 = 4096
        for type in UInt16(0)...7 {
            let command = NBDCommand(rawValue: type)!
            for raw in Self.flagValues {
                let flags = CommandFlags(rawValue: raw)
                let offset: UInt64 = command == .flush ? 0 : 8192
                let len: UInt64 = command == .flush ? 0 : length
                let expected: Outcome
                if command == .disconnect {
                    expected = .disconnect
                } else {
                    var payload = 0
                    // Compact: only WRITE carries a payload. Extended: exactly the requests with PAYLOAD_LEN.
                    if config.extended ? flags.contains(.payloadLength) : command == .write { payload = Int(len) }
                    var ok = Self.allowed[command]!
                    if !config.structured { ok.remove(.dontFragment) }
                    if !config.fastZero { ok.remove(.fastZero) }
                    if config.extended && command == .write { ok.insert(.payloadLength) }
                    if !flags.isSubset(of: ok) || (config.extended && command == .write && !flags.contains(.payloadLength)) {
                        expected = .reject(.invalid, payload: payload)
                    } else {
                        expected = .execute(command, payload: payload)
                    }
                }
                let got = V.check(s, command, flags: flags, offset: offset, length: len)
                #expect(got == expected, "\(command) flags 0x\(String(raw, radix: 16))")
            }
        }
    }

    @Test("unknown commands are EINVAL", arguments: [UInt16(8), 9, 100, 0x8000, .max])
    func unknownCommand(type: UInt16) {
        #expect(V.check(V.session(), type: type, length: 512) == .reject(.invalid, payload: 0))
        #expect(V.check(V.session(), type: type, flags: .fua, offset: .max, length: .max) == .reject(.invalid, payload: 0))
        // With extended headers and PAYLOAD_LEN the payload is drained first.
        #expect(V.check(V.session(extended: true), type: type, flags: .payloadLength, length: 100) == .reject(.invalid, payload: 100))
    }

    @Test func disconnectIgnoresEverythingElse() {
        #expect(V.check(V.session(), .disconnect, length: 0) == .disconnect)
        #expect(V.check(V.session(), .disconnect, flags: CommandFlags(rawValue: 0xffff), offset: .max, length: .max) == .disconnect)
        #expect(V.check(V.session(flags: [.readOnly]), .disconnect, length: 0) == .disconnect)
    }

    @Test func readOnlyExportRefusesWritesWithEPERM() {
        let s = V.session(flags: [.readOnly, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes, .sendCache])
        #expect(V.check(s, .write, offset: 0, length: 4096) == .reject(.notPermitted, payload: 4096))
        #expect(V.check(s, .write, flags: .fua, offset: 0, length: 0) == .reject(.notPermitted, payload: 0))
        #expect(V.check(s, .trim, offset: 0, length: 4096) == .reject(.notPermitted, payload: 0))
        #expect(V.check(s, .writeZeroes, offset: 0, length: 4096) == .reject(.notPermitted, payload: 0))
        #expect(V.check(s, .read, offset: 0, length: 4096) == .execute(.read, payload: 0))
        #expect(V.check(s, .flush, length: 0) == .execute(.flush, payload: 0))
        #expect(V.check(s, .cache, offset: 0, length: 4096) == .execute(.cache, payload: 0))
        #expect(V.check(s, .blockStatus, offset: 0, length: 4096) == .execute(.blockStatus, payload: 0))
        // EPERM even where the export would not advertise the command.
        let bare = V.session(flags: [.readOnly])
        #expect(V.check(bare, .trim, offset: 0, length: 512) == .reject(.notPermitted, payload: 0))
        #expect(V.check(bare, .writeZeroes, offset: 0, length: 512) == .reject(.notPermitted, payload: 0))
        // Extended write on a read-only export drains its payload.
        let ext = V.session(flags: [.readOnly], extended: true)
        #expect(V.check(ext, .write, flags: .payloadLength, offset: 0, length: 1000) == .reject(.notPermitted, payload: 1000))
    }

    @Test("commands the export does not advertise are EINVAL",
          arguments: [(NBDCommand.flush, TransmissionFlags.sendFlush), (.trim, .sendTrim), (.writeZeroes, .sendWriteZeroes),
                      (.cache, .sendCache)])
    func notAdvertised(command: NBDCommand, flag: TransmissionFlags) {
        var flags = Fixture.rwFlags
        flags.remove(flag)
        let len: UInt64 = command == .flush ? 0 : 512
        #expect(V.check(V.session(flags: flags), command, length: len) == .reject(.invalid, payload: 0))
        #expect(V.check(V.session(), command, length: len) == .execute(command, payload: 0))
    }

    @Test func readAndWriteNeedNoAdvertisement() {
        let s = V.session(flags: [])
        #expect(V.check(s, .read, length: 512) == .execute(.read, payload: 0))
        #expect(V.check(s, .write, length: 512) == .execute(.write, payload: 512))
        #expect(V.check(s, .write, flags: .fua, length: 512) == .execute(.write, payload: 512))
    }

    static let size: UInt64 = 1 << 20

    @Test("past the end: ENOSPC for WRITE and WRITE_ZEROES, EINVAL otherwise", arguments: [
        (NBDCommand.read, NBDErrorCode.invalid), (.write, .noSpace), (.trim, .invalid), (.writeZeroes, .noSpace),
        (.cache, .invalid), (.blockStatus, .invalid),
    ])
    func pastTheEnd(command: NBDCommand, code: NBDErrorCode) {
        let s = V.session(size: Self.size)
        let payload = command == .write ? 1024 : 0
        #expect(V.check(s, command, offset: Self.size - 512, length: 1024) == .reject(code, payload: payload))
        #expect(V.check(s, command, offset: Self.size, length: 1024) == .reject(code, payload: payload))
        #expect(V.check(s, command, offset: 1 << 40, length: 1024) == .reject(code, payload: payload))
        #expect(V.check(s, command, offset: 0, length: Self.size + 1) == .reject(code, payload: command == .write ? Int(Self.size) + 1 : 0))
        // Up to the last byte is fine.
        #expect(V.check(s, command, offset: Self.size - 1024, length: 1024) == .execute(command, payload: payload))
        #expect(V.check(s, command, offset: 0, length: Self.size) == .execute(command, payload: command == .write ? Int(Self.size) : 0))
        // Offset+length overflowing 64 bits is past the end, not a trap.
        #expect(V.check(s, command, offset: .max - 10, length: 1024) == .reject(code, payload: payload))
        #expect(V.check(s, command, offset: .max, length: 1) == .reject(code, payload: command == .write ? 1 : 0))
    }

    @Test("extended effect lengths near 2^64 never wrap", arguments: [NBDCommand.trim, .writeZeroes, .cache, .blockStatus, .read])
    func extendedOverflow(command: NBDCommand) {
        let s = V.session(size: 1 << 40, extended: true)
        let code: NBDErrorCode = command == .writeZeroes ? .noSpace : .invalid
        #expect(V.check(s, command, offset: 1, length: .max) == .reject(code, payload: 0))
        #expect(V.check(s, command, offset: .max, length: .max) == .reject(code, payload: 0))
        #expect(V.check(s, command, offset: 1 << 39, length: UInt64.max - (1 << 39) + 1) == .reject(code, payload: 0))
    }

    @Test("zero-length requests are no-ops except BLOCK_STATUS",
          arguments: [NBDCommand.read, .write, .trim, .writeZeroes, .cache])
    func zeroLength(command: NBDCommand) {
        let s = V.session(size: Self.size)
        #expect(V.check(s, command, offset: 0, length: 0) == .execute(command, payload: 0))
        #expect(V.check(s, command, offset: Self.size, length: 0) == .execute(command, payload: 0))
        let code: NBDErrorCode = command == .write || command == .writeZeroes ? .noSpace : .invalid
        #expect(V.check(s, command, offset: Self.size + 1, length: 0) == .reject(code, payload: 0))
    }

    @Test func zeroLengthBlockStatusIsInvalid() {
        #expect(V.check(V.session(), .blockStatus, offset: 0, length: 0) == .reject(.invalid, payload: 0))
        #expect(V.check(V.session(extended: true), .blockStatus, offset: 0, length: 0) == .reject(.invalid, payload: 0))
    }

    @Test func flushTakesNoRange() {
        let s = V.session()
        #expect(V.check(s, .flush, length: 0) == .execute(.flush, payload: 0))
        #expect(V.check(s, .flush, flags: .fua, length: 0) == .execute(.flush, payload: 0))
        #expect(V.check(s, .flush, offset: 512, length: 0) == .reject(.invalid, payload: 0))
        #expect(V.check(s, .flush, offset: 0, length: 512) == .reject(.invalid, payload: 0))
        #expect(V.check(s, .flush, offset: .max, length: .max) == .reject(.invalid, payload: 0))
    }

    @Test func readAndWriteLimits() {
        let s = V.session()
        let max: UInt64 = 32 << 20
        let v = RequestValidator(session: s)
        #expect(v.maximumPayload == max)
        #expect(v.drainLimit == 2 * max)
        #expect(v.session == s)
        #expect(V.check(s, .read, length: max) == .execute(.read, payload: 0))
        #expect(V.check(s, .write, length: max) == .execute(.write, payload: Int(max)))
        #expect(V.check(s, .read, length: max + 1) == .reject(.invalid, payload: 0))
        // An oversized WRITE is drained, then refused...
        #expect(V.check(s, .write, length: max + 1) == .reject(.invalid, payload: Int(max) + 1))
        #expect(V.check(s, .write, length: 2 * max) == .reject(.invalid, payload: Int(2 * max)))
        // ...unless it is absurd: then the stream cannot be trusted.
        #expect(V.check(s, .write, length: 2 * max + 1) == .fatal)
        #expect(V.check(s, .write, length: UInt64(UInt32.max)) == .fatal)
        #expect(V.check(s, type: NBDCommand.write.rawValue, flags: CommandFlags(rawValue: 0xffff), length: UInt64(UInt32.max)) == .fatal)
        // Commands without payload may exceed the maximum.
        #expect(V.check(s, .trim, length: 512 << 20) == .execute(.trim, payload: 0))
        #expect(V.check(s, .writeZeroes, length: 512 << 20) == .execute(.writeZeroes, payload: 0))
        #expect(V.check(s, .cache, length: 512 << 20) == .execute(.cache, payload: 0))
        #expect(V.check(s, .blockStatus, length: 1 << 30) == .execute(.blockStatus, payload: 0))
        // An oversized READ past the end is still EINVAL.
        #expect(V.check(V.session(size: 1 << 20), .read, length: max + 1) == .reject(.invalid, payload: 0))
    }

    @Test func customMaximumPayload() {
        let s = V.session(maximum: 1 << 20)
        #expect(V.check(s, .read, length: 1 << 20) == .execute(.read, payload: 0))
        #expect(V.check(s, .read, length: (1 << 20) + 1) == .reject(.invalid, payload: 0))
        #expect(V.check(s, .write, length: 2 << 20) == .reject(.invalid, payload: 2 << 20))
        #expect(V.check(s, .write, length: (2 << 20) + 1) == .fatal)
    }

    @Test func blockStatusNeedsASelectedContext() {
        #expect(V.check(V.session(contexts: false), .blockStatus, length: 4096) == .reject(.invalid, payload: 0))
        #expect(V.check(V.session(contexts: false), .blockStatus, flags: .requestOne, length: 4096) == .reject(.invalid, payload: 0))
        #expect(V.check(V.session(contexts: true), .blockStatus, flags: .requestOne, length: 4096) == .execute(.blockStatus, payload: 0))
    }

    @Test func fastZeroOnlyWhenAdvertised() {
        var flags = Fixture.rwFlags
        #expect(V.check(V.session(flags: flags), .writeZeroes, flags: [.fastZero, .noHole], length: 4096) == .execute(.writeZeroes, payload: 0))
        flags.remove(.sendFastZero)
        #expect(V.check(V.session(flags: flags), .writeZeroes, flags: .fastZero, length: 4096) == .reject(.invalid, payload: 0))
        #expect(V.check(V.session(flags: flags), .writeZeroes, flags: .noHole, length: 4096) == .execute(.writeZeroes, payload: 0))
    }

    @Test func dontFragmentOnlyWithStructuredReplies() {
        #expect(V.check(V.session(sr: true), .read, flags: .dontFragment, length: 4096) == .execute(.read, payload: 0))
        #expect(V.check(V.session(sr: false), .read, flags: .dontFragment, length: 4096) == .reject(.invalid, payload: 0))
        #expect(V.check(V.session(extended: true), .read, flags: .dontFragment, length: 4096) == .execute(.read, payload: 0))
    }

    @Test func extendedPayloadLengthRules() {
        let s = V.session(size: 1 << 40, extended: true)
        // WRITE must carry PAYLOAD_LEN.
        #expect(V.check(s, .write, flags: .payloadLength, length: 4096) == .execute(.write, payload: 4096))
        #expect(V.check(s, .write, flags: [.payloadLength, .fua], length: 4096) == .execute(.write, payload: 4096))
        #expect(V.check(s, .write, flags: .payloadLength, length: 0) == .execute(.write, payload: 0))
        // Without it the length is an effect length and no payload follows (the next bytes are the next
        // header): EINVAL, with nothing to drain.
        #expect(V.check(s, .write, length: 4096) == .reject(.invalid, payload: 0))
        #expect(V.check(s, .write, flags: .fua, length: 64 << 20) == .reject(.invalid, payload: 0))
        // Other commands with PAYLOAD_LEN: the payload is drained, then EINVAL.
        #expect(V.check(s, .read, flags: .payloadLength, length: 512) == .reject(.invalid, payload: 512))
        #expect(V.check(s, .blockStatus, flags: .payloadLength, length: 16) == .reject(.invalid, payload: 16))
        #expect(V.check(s, .trim, flags: .payloadLength, length: 8) == .reject(.invalid, payload: 8))
        #expect(V.check(s, .flush, flags: .payloadLength, length: 8) == .reject(.invalid, payload: 8))
        // An absurd payload closes, whatever the command.
        #expect(V.check(s, .cache, flags: .payloadLength, length: (64 << 20) + 1) == .fatal)
        #expect(V.check(s, .write, flags: .payloadLength, length: .max) == .fatal)
        #expect(V.check(s, .write, length: .max) == .reject(.invalid, payload: 0))
        // A PAYLOAD_LEN beyond the advertised maximum payload is a hard disconnect (the spec's SHOULD),
        // not a drain; up to the maximum it is drained.
        #expect(V.check(s, .write, flags: .payloadLength, length: (32 << 20) + 1) == .fatal)
        #expect(V.check(s, .read, flags: .payloadLength, length: (32 << 20) + 1) == .fatal)
        #expect(V.check(s, .read, flags: .payloadLength, length: 32 << 20) == .reject(.invalid, payload: 32 << 20))
        #expect(V.check(V.session(extended: true, maximum: 1 << 20), .write, flags: .payloadLength,
                        length: (1 << 20) + 1) == .fatal)
        // Without PAYLOAD_LEN the length is an effect length and may exceed 32 bits.
        #expect(V.check(s, .trim, offset: 0, length: 8 << 30) == .execute(.trim, payload: 0))
        #expect(V.check(s, .writeZeroes, offset: 4 << 30, length: 8 << 30) == .execute(.writeZeroes, payload: 0))
        #expect(V.check(s, .blockStatus, offset: 0, length: 1 << 40) == .execute(.blockStatus, payload: 0))
        #expect(V.check(s, .read, offset: 0, length: 8 << 30) == .reject(.invalid, payload: 0))
    }

    @Test func compactHeadersRefusePayloadLength() {
        let s = V.session()
        #expect(V.check(s, .write, flags: .payloadLength, length: 4096) == .reject(.invalid, payload: 4096))
        #expect(V.check(s, .read, flags: .payloadLength, length: 4096) == .reject(.invalid, payload: 0))
        #expect(V.check(s, .blockStatus, flags: .payloadLength, length: 4096) == .reject(.invalid, payload: 0))
    }

    static let alignmentCases: [(NBDCommand, UInt64, UInt64, Bool)] = [
        (.read, 1024, 4096, true), (.read, 512, 511, false), (.read, 1, 512, false), (.read, 0, 0, true),
        (.write, 0, 100, false), (.write, 512, 512, true), (.write, 513, 512, false),
        (.trim, 256, 512, false), (.trim, 0, 1 << 20, true),
        (.writeZeroes, 0, 1, false), (.writeZeroes, 4096, 4096, true),
        (.cache, 1, 1, false), (.cache, 0, 512, true),
        (.blockStatus, 1, 1, true), (.blockStatus, 100, 3, true),
        (.flush, 0, 0, true),
    ]

    @Test("alignment is enforced only when the client asked for block sizes", arguments: alignmentCases)
    func alignment(command: NBDCommand, offset: UInt64, length: UInt64, aligned: Bool) {
        let payload = command == .write ? Int(length) : 0
        let ok = Outcome.execute(command, payload: payload)
        let honoured = V.session(honours: true, minimum: 512)
        #expect(V.check(honoured, command, offset: offset, length: length) == (aligned ? ok : .reject(.invalid, payload: payload)))
        #expect(V.check(V.session(honours: false, minimum: 512), command, offset: offset, length: length) == ok)
        #expect(V.check(V.session(honours: true, minimum: 1), command, offset: offset, length: length) == ok)
    }

    @Test func alignmentToLargerBlocks() {
        let s = V.session(honours: true, minimum: 4096)
        #expect(V.check(s, .read, offset: 512, length: 4096) == .reject(.invalid, payload: 0))
        #expect(V.check(s, .read, offset: 8192, length: 4096) == .execute(.read, payload: 0))
        #expect(V.check(s, .write, offset: 8192, length: 2048) == .reject(.invalid, payload: 2048))
    }

    @Test func verdictsCarryReasons() {
        let s = V.session()
        let v = RequestValidator(session: s)
        if case .reject(_, _, let reason) = v.validate(Request(flags: [], type: 99, cookie: 0, offset: 0, length: 0)) {
            #expect(!reason.isEmpty)
        } else {
            Issue.record("unknown command not rejected")
        }
        if case .fatal(let reason) = v.validate(Request(flags: [], type: 1, cookie: 0, offset: 0, length: 1 << 30)) {
            #expect(!reason.isEmpty)
        } else {
            Issue.record("absurd write not fatal")
        }
    }

    @Test func randomRequestsAlwaysGetAVerdictWithinBounds() {
        var rng = SeededRandom(seed: 7)
        let sessions = [V.session(), V.session(extended: true), V.session(flags: [.readOnly], sr: false, contexts: false),
                        V.session(size: 0), V.session(honours: true, minimum: 512, maximum: 1 << 20)]
        for i in 0..<20000 {
            let s = sessions[i % sessions.count]
            let lengths: [UInt64] = [0, 1, 512, 4096, 32 << 20, (32 << 20) + 1, 64 << 20, (64 << 20) + 1, .max,
                                     .random(in: 0 ... .max, using: &rng), UInt64(UInt32.random(in: 0 ... .max, using: &rng))]
            let offsets: [UInt64] = [0, 1, 512, s.export.size, s.export.size &- 512, .max, .random(in: 0 ... .max, using: &rng)]
            let request = Request(flags: CommandFlags(rawValue: .random(in: 0 ... .max, using: &rng)),
                                  type: UInt16.random(in: 0...9, using: &rng), cookie: 0,
                                  offset: offsets.randomElement(using: &rng)!, length: lengths.randomElement(using: &rng)!)
            let verdict = RequestValidator(session: s).validate(request)
            switch verdict {
            case .execute(let command, let payload):
                let end = request.offset.addingReportingOverflow(request.length)
                if command != .flush { #expect(!end.overflow && end.partialValue <= s.export.size) }
                #expect(payload == 0 || command == .write)
                #expect(UInt64(payload) <= RequestValidator(session: s).maximumPayload)
            case .reject(let code, let payload, _):
                #expect(code != .ok)
                #expect(payload >= 0 && UInt64(payload) <= RequestValidator(session: s).drainLimit)
            case .disconnect:
                #expect(request.type == NBDCommand.disconnect.rawValue)
            case .fatal:
                let v = RequestValidator(session: s)
                let payloadLength = s.extendedHeaders && request.flags.contains(.payloadLength)
                #expect(request.length > v.drainLimit || (payloadLength && request.length > v.maximumPayload))
            }
        }
    }
}
