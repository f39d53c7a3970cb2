// Whole negotiations as real clients run them, and a randomized robustness run.

import Testing
@testable import NBDProtocol

/// One option of a scripted negotiation and the exact answer expected.
struct FlowStep: Sendable {
    var option: UInt32
    var payload: [UInt8]
    var expected: HandshakeAction

    init(_ option: NBDOption, _ payload: [UInt8] = [], _ expected: HandshakeAction) {
        self.option = option.rawValue
        self.payload = payload
        self.expected = expected
    }
}

struct Flow: Sendable, CustomTestStringConvertible {
    var name: String
    var exports: [ExportDescriptor]
    var clientFlags: UInt32
    var steps: [FlowStep]
    var testDescription: String { name }

    static func session(_ export: ExportDescriptor, flags: UInt16, sr: Bool, eh: Bool = false,
                        contexts: [(UInt32, String)] = [], honours: Bool) -> NegotiatedSession {
        var e = export
        e.flags = TransmissionFlags(rawValue: flags)
        return NegotiatedSession(export: e, structuredReplies: sr, extendedHeaders: eh,
                                 metaContexts: contexts.map { (id: $0.0, name: $0.1) }, clientHonoursBlockSize: honours)
    }

    static let disk = Fixture.disk
    static let base = Fixture.base

    /// qemu 7.2: flags 3, STRUCTURED_REPLY, SET_META_CONTEXT base:allocation, GO asking for block sizes.
    static let qemu = Flow(name: "qemu 7.2", exports: Fixture.exports, clientFlags: 3, steps: [
        FlowStep(.structuredReply, [], .proceed(reply: hex("0003e889045565a9 00000008 00000001 00000000"))),
        FlowStep(.setMetaContext, metaPayload("disk", [base]), .proceed(reply:
            hex("0003e889045565a9 0000000a 00000004 00000013 00000001") + utf8("base:allocation")
            + hex("0003e889045565a9 0000000a 00000001 00000000"))),
        FlowStep(.go, infoPayload("disk", [3]), .startTransmission(
            reply: hex("0003e889045565a9 00000007 00000003 0000000c 0000 0000000040000000 0ded")
                + hex("0003e889045565a9 00000007 00000003 0000000e 0003 00000200 00001000 02000000")
                + hex("0003e889045565a9 00000007 00000001 00000000"),
            session: session(disk, flags: 0x0ded, sr: true, contexts: [(1, base)], honours: true))),
    ])

    /// qemu ≥ 8.2: EXTENDED_HEADERS first, then the same.
    static let qemuExtended = Flow(name: "qemu 8.2 extended headers", exports: Fixture.exports, clientFlags: 3, steps: [
        FlowStep(.extendedHeaders, [], .proceed(reply: rep(.extendedHeaders, .ack))),
        FlowStep(.setMetaContext, metaPayload("disk", [base, Fixture.depth]), .proceed(reply:
            metaContextReply(.setMetaContext, id: 1, base) + metaContextReply(.setMetaContext, id: 2, Fixture.depth)
            + rep(.setMetaContext, .ack))),
        FlowStep(.go, infoPayload("disk", [3]), .startTransmission(
            reply: rep(.go, .info, infoExport(size: 1 << 30, flags: 0x0ded))
                + rep(.go, .info, infoBlockSize(512, 4096, 32 << 20)) + rep(.go, .ack),
            session: session(disk, flags: 0x0ded, sr: true, eh: true, contexts: [(1, base), (2, Fixture.depth)],
                             honours: true))),
    ])

    /// libnbd (nbdinfo): STRUCTURED_REPLY, LIST, LIST_META_CONTEXT, INFO with full info, SET, GO.
    static let libnbd = Flow(name: "libnbd nbdinfo", exports: Fixture.exports, clientFlags: 3, steps: [
        FlowStep(.structuredReply, [], .proceed(reply: rep(.structuredReply, .ack))),
        FlowStep(.list, [], .proceed(reply:
            hex("0003e889045565a9 00000003 00000002 00000011 00000004") + utf8("disk") + utf8("test disk")
            + hex("0003e889045565a9 00000003 00000002 00000009 00000005") + utf8("other")
            + hex("0003e889045565a9 00000003 00000001 00000000"))),
        FlowStep(.listMetaContext, metaPayload("disk", []), .proceed(reply:
            metaContextReply(.listMetaContext, id: 0, base) + metaContextReply(.listMetaContext, id: 0, Fixture.depth)
            + rep(.listMetaContext, .ack))),
        FlowStep(.info, infoPayload("disk", [1, 2, 3]), .proceed(reply:
            hex("0003e889045565a9 00000006 00000003 0000000c 0000 0000000040000000 0ded")
            + hex("0003e889045565a9 00000006 00000003 00000006 0001") + utf8("disk")
            + hex("0003e889045565a9 00000006 00000003 0000000b 0002") + utf8("test disk")
            + hex("0003e889045565a9 00000006 00000003 0000000e 0003 00000200 00001000 02000000")
            + hex("0003e889045565a9 00000006 00000001 00000000"))),
        FlowStep(.setMetaContext, metaPayload("disk", [base]), .proceed(reply:
            metaContextReply(.setMetaContext, id: 1, base) + rep(.setMetaContext, .ack))),
        FlowStep(.go, infoPayload("disk", [1, 2, 3]), .startTransmission(
            reply: rep(.go, .info, infoExport(size: 1 << 30, flags: 0x0ded)) + rep(.go, .info, infoName("disk"))
                + rep(.go, .info, infoDescription("test disk")) + rep(.go, .info, infoBlockSize(512, 4096, 32 << 20))
                + rep(.go, .ack),
            session: session(disk, flags: 0x0ded, sr: true, contexts: [(1, base)], honours: true))),
    ])

    /// libnbd opt mode against a wrong name first, then the default export: errors keep the loop alive.
    static let libnbdRetry = Flow(name: "libnbd retry after ERR_UNKNOWN", exports: Fixture.exports, clientFlags: 3, steps: [
        FlowStep(.info, infoPayload("missing", [3]), .proceed(reply: rep(6, NBDOptionReply.errorUnknown.rawValue,
                                                                           utf8("no export named \"missing\"")))),
        FlowStep(.go, infoPayload("other", [3]), .startTransmission(
            reply: rep(.go, .info, infoExport(size: 1536, flags: 0x0007)) + rep(.go, .info, infoBlockSize(1, 4096, 32 << 20))
                + rep(.go, .ack),
            session: session(Fixture.other, flags: 0x0007, sr: false, honours: true))),
    ])

    /// nbd-client (Linux kernel path): GO without info requests; simple replies, no DF.
    static let nbdClient = Flow(name: "nbd-client", exports: Fixture.exports, clientFlags: 3, steps: [
        FlowStep(.go, infoPayload("disk"), .startTransmission(
            reply: rep(.go, .info, infoExport(size: 1 << 30, flags: 0x0d6d)) + rep(.go, .info, infoBlockSize(1, 4096, 32 << 20))
                + rep(.go, .ack),
            session: session(disk, flags: 0x0d6d, sr: false, honours: false))),
    ])

    /// An old client: STARTTLS refused, then EXPORT_NAME without NO_ZEROES.
    static let oldClient = Flow(name: "old client, EXPORT_NAME with zeroes", exports: Fixture.exports, clientFlags: 1, steps: [
        FlowStep(.startTLS, [], .proceed(reply: rep(5, NBDOptionReply.errorPolicy.rawValue,
                                                   utf8("TLS is not configured on this server")))),
        FlowStep(.exportName, utf8("disk"), .startTransmission(
            reply: hex("0000000040000000 0d6d") + [UInt8](repeating: 0, count: 124),
            session: session(disk, flags: 0x0d6d, sr: false, honours: false))),
    ])

    /// nbd-client -l: LIST then ABORT.
    static let listAndAbort = Flow(name: "nbd-client -l", exports: Fixture.exports, clientFlags: 3, steps: [
        FlowStep(.list, [], .proceed(reply: serverReply("disk", "test disk") + serverReply("other", "") + rep(.list, .ack))),
        FlowStep(.abort, [], .abort(reply: hex("0003e889045565a9 00000002 00000001 00000000"))),
    ])

    static let all = [qemu, qemuExtended, libnbd, libnbdRetry, nbdClient, oldClient, listAndAbort]
}

@Suite("Handshake: realistic negotiations")
struct NegotiationFlowTests {
    @Test("every reply of a full negotiation", arguments: Flow.all)
    func walk(flow: Flow) {
        var hs = Handshake(exports: flow.exports)
        #expect(hs.receive(be32(flow.clientFlags)) == .proceed(reply: []))
        for (i, step) in flow.steps.enumerated() {
            #expect(hs.bytesNeeded == 16)
            var action = hs.receive(optionHeader(step.option, length: UInt32(step.payload.count)))
            if !step.payload.isEmpty {
                #expect(action == .proceed(reply: []), "step \(i) header")
                #expect(hs.bytesNeeded == step.payload.count)
                action = hs.receive(step.payload)
            }
            #expect(action == step.expected, "step \(i): option \(step.option)")
            if case .startTransmission(let reply, let got) = action,
               case .startTransmission(let wantReply, let want) = step.expected {
                // Field by field, for a readable failure.
                #expect(reply == wantReply)
                #expect(got.export == want.export)
                #expect(got.structuredReplies == want.structuredReplies)
                #expect(got.extendedHeaders == want.extendedHeaders)
                #expect(got.metaContexts.map(\.id) == want.metaContexts.map(\.id))
                #expect(got.metaContexts.map(\.name) == want.metaContexts.map(\.name))
                #expect(got.clientHonoursBlockSize == want.clientHonoursBlockSize)
            }
            switch step.expected {
            case .proceed: #expect(hs.state == .awaitingOptionHeader)
            case .startTransmission: #expect(hs.state == .finished)
            case .abort, .close: #expect(hs.state == .closed)
            case .startTLS: #expect(hs.state == .awaitingTLS)
            }
        }
        #expect(hs.bytesNeeded == 0)
    }

    @Test func negotiatedSessionEqualityLooksAtEveryField() {
        let a = Flow.session(Fixture.disk, flags: 0x0ded, sr: true, contexts: [(1, Fixture.base)], honours: true)
        var b = a
        #expect(a == b)
        b.metaContexts = [(id: 2, name: Fixture.base)]
        #expect(a != b)
        b = a
        b.metaContexts = [(id: 1, name: Fixture.depth)]
        #expect(a != b)
        b = a
        b.clientHonoursBlockSize = false
        #expect(a != b)
        b = a
        b.extendedHeaders = true
        #expect(a != b)
        b = a
        b.structuredReplies = false
        #expect(a != b)
        b = a
        b.export.size += 1
        #expect(a != b)
    }

    @Test func exportDescriptorAlwaysHasFlagsAndDefaults() {
        let e = ExportDescriptor(name: "n", description: "d", size: 1, flags: [])
        #expect(e.flags == .hasFlags)
        #expect(e.minimumBlockSize == 1)
        #expect(e.preferredBlockSize == 4096)
        #expect(e.maximumBlockSize == 32 << 20)
        #expect(e.metaContexts == [MetaContextName.baseAllocation])
        #expect(e.metaContextID(of: MetaContextName.baseAllocation) == 1)
        #expect(e.metaContextID(of: MetaContextName.allocationDepth) == nil)
    }
}

@Suite("Handshake: randomized robustness")
struct HandshakeFuzzTests {
    /// What a chunk fed to the machine was.
    enum Fed {
        case clientFlags
        /// An option header announcing a payload.
        case header
        /// A whole option (a header without payload, or the payload).
        case option(UInt32)

        /// Classifies `chunk` by the state the machine was in before it was fed.
        init(_ state: Handshake.State, _ chunk: [UInt8]) {
            switch state {
            case .awaitingClientFlags: self = .clientFlags
            case .awaitingOptionPayload(let option, _): self = .option(option)
            default:
                let option = UInt32(readBE(chunk[8..<12]))
                self = readBE(chunk[12..<16]) == 0 ? .option(option) : .header
            }
        }
    }

    /// Records an issue when `condition` fails; cheaper than `#expect` in loops of millions of checks.
    static func ensure(_ condition: Bool, _ what: String, seed: UInt64,
                       sourceLocation: SourceLocation = #_sourceLocation) {
        if !condition { Issue.record("\(what) (seed \(seed))", sourceLocation: sourceLocation) }
    }

    /// Checks the invariants every answer must satisfy, given what was just fed. Returns whether the
    /// negotiation goes on.
    @discardableResult
    static func check(_ action: HandshakeAction, _ hs: Handshake, fed: Fed, seed: UInt64) -> Bool {
        switch action {
        case .proceed(let reply):
            ensure(hs.state != .finished && hs.state != .closed, "proceed in an end state", seed: seed)
            ensure(hs.bytesNeeded > 0, "proceed wants no bytes", seed: seed)
            guard case .option(let option) = fed else {
                // Client flags or a header: nothing is answered yet.
                ensure(reply.isEmpty, "reply before the option was complete", seed: seed)
                if case .header = fed { ensure(hs.state != .awaitingOptionHeader, "payload not awaited", seed: seed) }
                return true
            }
            ensure(hs.state == .awaitingOptionHeader, "not back to option headers", seed: seed)
            // Every answer to an option is framed, echoes the option and ends with an ACK or an error;
            // errors carry valid strings.
            guard let parsed = parseReplies(reply), let last = parsed.last else {
                Issue.record("unframed or empty reply (seed \(seed))")
                return false
            }
            ensure(parsed.allSatisfy { $0.option == option }, "reply for another option", seed: seed)
            ensure(last.type == 1 || last.type & 0x8000_0000 != 0, "answer does not end in ACK or error", seed: seed)
            ensure(parsed.dropLast().allSatisfy { $0.type & 0x8000_0000 == 0 && $0.type != 1 },
                   "ACK or error before the end", seed: seed)
            if last.type & 0x8000_0000 != 0 {
                ensure(last.payload.count <= 4096, "error message over 4096 bytes", seed: seed)
                ensure(String(validating: last.payload, as: UTF8.self) != nil, "error message not UTF-8", seed: seed)
            }
            return true
        case .startTransmission(let reply, let session):
            ensure(hs.state == .finished, "transmission but not finished", seed: seed)
            ensure(hs.bytesNeeded == 0, "finished machine wants bytes", seed: seed)
            ensure(!reply.isEmpty, "empty final reply", seed: seed)
            ensure(session.export.flags.contains(.hasFlags), "no HAS_FLAGS", seed: seed)
            ensure(session.structuredReplies || !session.export.flags.contains(.sendDF), "DF without SR", seed: seed)
            ensure(session.structuredReplies || session.metaContexts.isEmpty, "contexts without SR", seed: seed)
            ensure(!session.extendedHeaders || session.structuredReplies, "EH without SR", seed: seed)
            return false
        case .abort(let reply):
            ensure(hs.state == .closed, "abort but not closed", seed: seed)
            ensure(reply == rep(.abort, .ack), "abort without ACK", seed: seed)
            return false
        case .close(let reason):
            ensure(hs.state == .closed, "close but not closed", seed: seed)
            ensure(hs.bytesNeeded == 0, "closed machine wants bytes", seed: seed)
            ensure(!reason.isEmpty, "close without reason", seed: seed)
            return false
        case .startTLS(let reply):
            // Only a whole, empty STARTTLS before TLS gets here, and the machine then takes no bytes.
            ensure(hs.state == .awaitingTLS, "STARTTLS ACK but not awaiting TLS", seed: seed)
            ensure(hs.bytesNeeded == 0, "machine wants bytes while TLS starts", seed: seed)
            ensure(!hs.tlsActive, "STARTTLS accepted twice", seed: seed)
            ensure(reply == rep(.startTLS, .ack), "STARTTLS without ACK", seed: seed)
            if case .option(let option) = fed { ensure(option == NBDOption.startTLS.rawValue, "TLS for another option", seed: seed) }
            return true
        }
    }

    /// Option payloads that are plausible enough to get past the first checks.
    static func payload(for option: UInt32, _ rng: inout SeededRandom) -> [UInt8] {
        let names = ["disk", "other", "", "nope", "dïsk"]
        let name = names.randomElement(using: &rng)!
        let queries = ["base:", "qemu:", "base:allocation", "qemu:allocation-depth", "x:", ""]
        var p: [UInt8]
        switch option {
        case 6, 7:
            p = infoPayload(name, (0..<Int.random(in: 0...4, using: &rng)).map { _ in UInt16.random(in: 0...5, using: &rng) })
        case 9, 10:
            p = metaPayload(name, (0..<Int.random(in: 0...3, using: &rng)).map { _ in queries.randomElement(using: &rng)! })
        case 1:
            p = utf8(name)
        case 5:
            p = []
        default:
            p = .random(count: Int.random(in: 0...40, using: &rng), using: &rng)
        }
        // Damage it now and then: truncate, extend, or flip a byte.
        switch Int.random(in: 0..<8, using: &rng) {
        case 0 where !p.isEmpty: p.removeLast(Int.random(in: 1...p.count, using: &rng))
        case 1: p += [UInt8].random(count: Int.random(in: 1...6, using: &rng), using: &rng)
        case 2 where !p.isEmpty: p[Int.random(in: 0..<p.count, using: &rng)] ^= UInt8.random(in: 1...255, using: &rng)
        default: break
        }
        return p
    }

    /// Random but mostly well-framed input: the machine must answer every chunk and end in a defined way.
    @Test("structured random negotiations", arguments: 0..<4)
    func structuredRandom(shard: UInt64) {
        var limits = HandshakeLimits()
        limits.maximumOptionLength = 256
        limits.maximumOptions = 40
        var endings: [String: Int] = [:]
        var tlsRuns = 0
        for run in 0..<1500 {
            let seed = shard << 32 | UInt64(run)
            var rng = SeededRandom(seed: seed)
            // Every TLS policy, and sometimes a TLS-only export (SELECTIVETLS) or a PSK-user export.
            let policy = TLSPolicy.allCases.randomElement(using: &rng)!
            var rules: [String: ExportTLSRule] = [:]
            if policy != .off {
                switch Int.random(in: 0..<3, using: &rng) {
                case 0: rules["disk"] = ExportTLSRule(tlsRequired: true)
                case 1: rules["disk"] = ExportTLSRule(allowedPSKUsernames: ["alice"])
                default: break
                }
            }
            var hs = Handshake(exports: Fixture.exports, limits: Bool.random(using: &rng) ? limits : HandshakeLimits(),
                               tls: policy, tlsRules: rules)
            var pending: [UInt8] = []
            var ending = "still negotiating"
            steps: for _ in 0..<200 {
                let before = hs.state
                var input: [UInt8]
                switch before {
                case .awaitingClientFlags:
                    input = be32([3, 3, 3, 1, 0, 2, UInt32.random(in: 0 ... .max, using: &rng)].randomElement(using: &rng)!)
                case .awaitingOptionHeader:
                    var option = Int.random(in: 0..<10, using: &rng) == 0
                        ? UInt32.random(in: 0 ... .max, using: &rng) : UInt32.random(in: 0...13, using: &rng)
                    // STARTTLS early and often where TLS is on, so the over-TLS half gets exercised.
                    if policy != .off && !hs.tlsActive && Int.random(in: 0..<4, using: &rng) == 0 { option = 5 }
                    pending = Self.payload(for: option, &rng)
                    var length = UInt32(pending.count)
                    switch Int.random(in: 0..<100, using: &rng) {
                    case 0, 1: length = UInt32.random(in: 0 ... .max, using: &rng)   // mostly over the limit
                    case 2: length = 300
                    default: break
                    }
                    let magic = Int.random(in: 0..<100, using: &rng) == 0 ? UInt64.random(in: 0 ... .max, using: &rng) : NBDMagic.option
                    input = optionHeader(option, length: length, magic: magic)
                case .awaitingOptionPayload(_, let length):
                    input = pending.count == length ? pending : .random(count: length, using: &rng)
                case .awaitingTLS, .finished, .closed:
                    Issue.record("state \(before) without an ending action (seed \(seed))")
                    return
                }
                Self.ensure(input.count == hs.bytesNeeded, "generator out of step", seed: seed)
                let wasTLS = hs.tlsActive
                let fed = Fed(before, input)
                let action = hs.receive(input)
                // FORCEDTLS: before TLS only STARTTLS and ABORT get anything but TLS_REQD (EXPORT_NAME: close).
                if policy == .require, !wasTLS, case .option(let option) = fed, option != 2, option != 5 {
                    if option == 1 {
                        Self.ensure(action.isClose, "EXPORT_NAME before TLS not closed", seed: seed)
                    } else {
                        let last = action.proceedReply.flatMap(parseReplies)?.last
                        Self.ensure(last?.type == NBDOptionReply.errorTLSRequired.rawValue, "option \(option) before TLS not TLS_REQD", seed: seed)
                    }
                }
                if case .startTransmission(_, let session) = action {
                    // A TLS-only export is never entered in the clear, nor by another PSK user.
                    if rules[session.export.name] != nil || policy == .require {
                        Self.ensure(hs.tlsActive, "TLS-only export entered without TLS", seed: seed)
                    }
                }
                if !Self.check(action, hs, fed: fed, seed: seed) {
                    switch action {
                    case .proceed: ending = "proceed"
                    case .startTransmission: ending = "transmission"
                    case .abort: ending = "abort"
                    case .close: ending = "close"
                    case .startTLS: ending = "startTLS"
                    }
                    break steps
                }
                if case .startTLS = action {
                    hs.tlsEstablished(pskUsername: ["alice", "bob", nil].randomElement(using: &rng)!)
                    tlsRuns += 1
                }
            }
            endings[ending, default: 0] += 1
        }
        // The generator reaches every kind of ending.
        #expect(endings["transmission", default: 0] > 100)
        #expect(endings["abort", default: 0] > 50)
        #expect(endings["close", default: 0] > 50)
        #expect(endings["proceed"] == nil)
        #expect(tlsRuns > 20)
    }

    /// Pure noise after valid client flags, fed in `bytesNeeded` chunks until it runs out or the machine ends.
    @Test func randomByteStreams() {
        for run in 0..<3000 {
            let seed = 0xf00d_0000 | UInt64(run)
            var rng = SeededRandom(seed: seed)
            var stream = be32(UInt32([1, 3].randomElement(using: &rng)!))
            // Half the runs get a valid magic up front so the option dispatch sees noise too.
            if Bool.random(using: &rng) {
                stream += be64(NBDMagic.option) + be32(UInt32.random(in: 0...14, using: &rng))
                    + be32(UInt32.random(in: 0...64, using: &rng))
            }
            stream += [UInt8].random(count: Int.random(in: 0...400, using: &rng), using: &rng)
            var hs = Handshake(exports: Fixture.exports)
            var position = 0
            while hs.bytesNeeded > 0, position + hs.bytesNeeded <= stream.count {
                let chunk = Array(stream[position..<position + hs.bytesNeeded])
                position += chunk.count
                let fed = Fed(hs.state, chunk)
                if !Self.check(hs.receive(chunk), hs, fed: fed, seed: seed) { break }
            }
        }
    }

    /// Every option number crossed with every payload length up to a bound, on a fresh machine.
    @Test func everyOptionEveryShortLength() {
        var rng = SeededRandom(seed: 42)
        for option in UInt32(0)...15 {
            for length in 0...40 {
                for _ in 0..<4 {
                    var c = Client()
                    let action = c.send(option, .random(count: length, using: &rng))
                    _ = Self.check(action, c.hs, fed: .option(option), seed: UInt64(option) << 8 | UInt64(length))
                }
            }
        }
    }
}
