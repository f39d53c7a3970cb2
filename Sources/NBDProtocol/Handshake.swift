// The fixed-newstyle handshake as a pure state machine.
//
// The connection sends `greeting`, then feeds the machine exactly `bytesNeeded` bytes at a time and acts
// on what `receive` returns: bytes to send, and whether to keep negotiating, enter transmission or close.
// Asking for an exact byte count keeps the connection's buffering trivial and means the machine never
// sees bytes that belong to the transmission phase.
//
// Peer mistakes are never preconditions. An option the server can answer wrongly formed gets an error
// reply and the loop goes on (the spec's rule); only what would desynchronise the stream or exceed a
// resource bound closes the connection.

/// Bounds that keep a hostile client from making the handshake expensive.
public struct HandshakeLimits: Sendable {
    /// Longest option payload accepted; a longer one closes the connection without reading it.
    public var maximumOptionLength: Int = 64 << 10
    /// Options per handshake; a client that keeps negotiating past this is cut off.
    public var maximumOptions: Int = 4096
    /// The spec's hard limit for names, descriptions and context queries.
    public var maximumStringLength: Int = 4096

    public init() {}
}

/// Whether and how the server offers TLS (NBD_OPT_STARTTLS).
public enum TLSPolicy: String, Sendable, Equatable, CaseIterable {
    /// No TLS: STARTTLS is refused with ERR_POLICY.
    case off
    /// TLS is offered; exports marked TLS-only (SELECTIVETLS) need it, the others work without.
    case on
    /// Nothing but STARTTLS and ABORT is answered before TLS (the spec's FORCEDTLS).
    case require
}

/// How TLS limits one export. Kept out of ExportDescriptor, which the transmission phase copies.
public struct ExportTLSRule: Sendable, Equatable {
    /// Only over TLS (SELECTIVETLS): before STARTTLS, LIST leaves it out, INFO, GO and the meta-context
    /// options answer NBD_REP_ERR_TLS_REQD, EXPORT_NAME closes.
    public var tlsRequired: Bool
    /// If set, only these PSK usernames may use the export (which makes it TLS-only).
    public var allowedPSKUsernames: [String]?

    public init(tlsRequired: Bool = false, allowedPSKUsernames: [String]? = nil) {
        self.tlsRequired = tlsRequired
        self.allowedPSKUsernames = allowedPSKUsernames
    }
}

/// What the connection should do after feeding the machine.
public enum HandshakeAction: Equatable, Sendable {
    /// Send `reply` (possibly empty) and keep feeding `bytesNeeded` bytes.
    case proceed(reply: [UInt8])
    /// Send `reply`, then switch to the transmission phase with `session`.
    case startTransmission(reply: [UInt8], session: NegotiatedSession)
    /// Send `reply` (the ACK to NBD_OPT_ABORT) and close the connection.
    case abort(reply: [UInt8])
    /// Close the connection without a reply; `reason` is for the log.
    case close(reason: String)
    /// Send `reply` (the ACK to STARTTLS), drop every byte already received after the request (it is
    /// plaintext that must never be parsed: the injection attack), start the TLS handshake and call
    /// `tlsEstablished` once it completes.
    case startTLS(reply: [UInt8])
}

public struct Handshake: Sendable {
    /// Where the negotiation is. Each case names what the machine waits for.
    public enum State: Equatable, Sendable {
        /// Waiting for the 4-byte client flags after the greeting.
        case awaitingClientFlags
        /// Waiting for a 16-byte option header.
        case awaitingOptionHeader
        /// Waiting for the payload of option `option`.
        case awaitingOptionPayload(option: UInt32, length: Int)
        /// STARTTLS was acknowledged; no input until `tlsEstablished` (the TLS handshake runs).
        case awaitingTLS
        /// Transmission has started; the machine takes no more input.
        case finished
        /// The connection is being closed; the machine takes no more input.
        case closed
    }

    public private(set) var state: State = .awaitingClientFlags
    private let exports: [ExportDescriptor]
    private let limits: HandshakeLimits
    /// Whether LIST answers (nbd-server's `allowlist`); ERR_POLICY otherwise.
    private let listAllowed: Bool
    private let tlsPolicy: TLSPolicy
    /// Per-export TLS limits, by export name (exports not named have none).
    private let tlsRules: [String: ExportTLSRule]
    /// True once the TLS handshake completed; options are then read over TLS.
    public private(set) var tlsActive = false
    /// The PSK username TLS authenticated, checked against exports' `allowedPSKUsernames`.
    private var pskUsername: String?
    private var clientFlags: ClientFlags = []
    private var optionsSeen = 0
    private var structuredReplies = false
    private var extendedHeaders = false
    /// Meta contexts chosen by the last SET_META_CONTEXT, and the export they were chosen for.
    private var selectedContexts: [(id: UInt32, name: String)] = []
    private var contextsExport: String?

    public init(exports: [ExportDescriptor], limits: HandshakeLimits = HandshakeLimits(), listAllowed: Bool = true,
                tls: TLSPolicy = .off, tlsRules: [String: ExportTLSRule] = [:]) {
        self.exports = exports
        self.limits = limits
        self.listAllowed = listAllowed
        self.tlsPolicy = tls
        self.tlsRules = tlsRules
    }

    /// The TLS handshake that STARTTLS began completed. The spec: everything negotiated before TLS
    /// (structured replies, extended headers, meta contexts, the export name they were chosen for) is
    /// forgotten, and the client negotiates again over TLS. `pskUsername` is who PSK authenticated.
    public mutating func tlsEstablished(pskUsername: String?) {
        precondition(state == .awaitingTLS, "TLS established in \(state)")
        tlsActive = true
        self.pskUsername = pskUsername
        structuredReplies = false
        extendedHeaders = false
        selectedContexts = []
        contextsExport = nil
        state = .awaitingOptionHeader
    }

    /// The 18 bytes the server sends first.
    public static var greeting: [UInt8] {
        var w = WireWriter()
        w.u64(NBDMagic.greeting)
        w.u64(NBDMagic.option)
        w.u16(HandshakeFlags([.fixedNewstyle, .noZeroes]).rawValue)
        return w.bytes
    }

    /// How many bytes `receive` wants next.
    public var bytesNeeded: Int {
        switch state {
        case .awaitingClientFlags: return 4
        case .awaitingOptionHeader: return 16
        case .awaitingOptionPayload(_, let length): return length
        case .awaitingTLS, .finished, .closed: return 0
        }
    }

    /// Feeds exactly `bytesNeeded` bytes.
    public mutating func receive(_ input: [UInt8]) -> HandshakeAction {
        precondition(input.count == bytesNeeded, "handshake fed \(input.count) bytes in \(state)")
        var reader = WireReader(input)
        switch state {
        case .awaitingClientFlags:
            let flags = ClientFlags(rawValue: reader.u32()!)
            guard flags.isSubset(of: .known) else {
                return close("unknown client flags 0x\(String(flags.rawValue, radix: 16))")
            }
            guard flags.contains(.fixedNewstyle) else {
                return close("client does not speak fixed newstyle")
            }
            clientFlags = flags
            state = .awaitingOptionHeader
            return .proceed(reply: [])

        case .awaitingOptionHeader:
            let magic = reader.u64()!
            let option = reader.u32()!
            let length = reader.u32()!
            guard magic == NBDMagic.option else {
                return close("bad option magic 0x\(String(magic, radix: 16))")
            }
            optionsSeen += 1
            guard optionsSeen <= limits.maximumOptions else {
                return close("more than \(limits.maximumOptions) options")
            }
            guard length <= limits.maximumOptionLength else {
                return close("option \(option) payload of \(length) bytes exceeds \(limits.maximumOptionLength)")
            }
            if length == 0 { return handle(option: option, payload: []) }
            state = .awaitingOptionPayload(option: option, length: Int(length))
            return .proceed(reply: [])

        case .awaitingOptionPayload(let option, _):
            state = .awaitingOptionHeader
            return handle(option: option, payload: input)

        case .awaitingTLS, .finished, .closed:
            preconditionFailure("handshake input while it takes none (\(state))")
        }
    }

    private mutating func close(_ reason: String) -> HandshakeAction {
        state = .closed
        return .close(reason: reason)
    }

    // MARK: - Options

    private mutating func handle(option raw: UInt32, payload: [UInt8]) -> HandshakeAction {
        state = .awaitingOptionHeader
        // FORCEDTLS: before TLS only STARTTLS and ABORT are answered, unknown options included.
        // EXPORT_NAME has no error reply.
        if tlsPolicy == .require && !tlsActive && raw != NBDOption.startTLS.rawValue && raw != NBDOption.abort.rawValue {
            if raw == NBDOption.exportName.rawValue { return close("EXPORT_NAME before TLS on a server that requires TLS") }
            return .proceed(reply: Self.error(.errorTLSRequired, option: raw, "this server requires TLS: use STARTTLS"))
        }
        guard let option = NBDOption(rawValue: raw) else {
            return .proceed(reply: Self.error(.errorUnsupported, option: raw, "option \(raw) is not supported"))
        }
        switch option {
        case .exportName: return exportName(payload)
        case .abort:
            state = .closed
            return .abort(reply: Self.reply(.ack, option: raw))
        case .list: return list(payload)
        case .startTLS: return startTLS(payload)
        case .info, .go: return infoOrGo(option, payload)
        case .structuredReply: return enableStructuredReplies(payload)
        case .extendedHeaders: return enableExtendedHeaders(payload)
        case .listMetaContext, .setMetaContext: return metaContext(option, payload)
        case .peekExport:
            return .proceed(reply: Self.error(.errorUnsupported, option: raw, "option \(raw) is not supported"))
        }
    }

    /// NBD_OPT_EXPORT_NAME: the old way in. No error reply exists, so an unknown name closes.
    private mutating func exportName(_ payload: [UInt8]) -> HandshakeAction {
        guard let name = String(validating: payload, as: UTF8.self), payload.count <= limits.maximumStringLength,
              let export = export(named: name) else {
            return close("EXPORT_NAME for an unknown export")
        }
        if let refusal = export.refusal { return close("EXPORT_NAME refused: \(refusal)") }
        if needsTLS(export) { return close("EXPORT_NAME before TLS for TLS-only export \"\(name)\"") }
        if let refusal = pskRefusal(export) { return close("EXPORT_NAME refused: \(refusal)") }
        var w = WireWriter()
        w.u64(export.size)
        w.u16(advertisedFlags(export).rawValue)
        if !clientFlags.contains(.noZeroes) { w.zeros(124) }
        return finish(export: export, reply: w.bytes, honoursBlockSize: false)
    }

    private mutating func list(_ payload: [UInt8]) -> HandshakeAction {
        guard payload.isEmpty else {
            return .proceed(reply: Self.error(.errorInvalid, option: NBDOption.list.rawValue, "LIST takes no payload"))
        }
        guard listAllowed else {
            return .proceed(reply: Self.error(.errorPolicy, option: NBDOption.list.rawValue, "this server does not list its exports"))
        }
        var out: [UInt8] = []
        // TLS-only exports are not shown to a client that has not started TLS (SELECTIVETLS).
        for export in exports where export.refusal == nil && !needsTLS(export) && pskRefusal(export) == nil {
            var w = WireWriter()
            let name = Array(export.name.utf8)
            w.u32(UInt32(name.count))
            w.raw(name)
            w.raw(export.description.utf8)
            out += Self.reply(.server, option: NBDOption.list.rawValue, payload: w.bytes)
        }
        out += Self.reply(.ack, option: NBDOption.list.rawValue)
        return .proceed(reply: out)
    }

    private mutating func infoOrGo(_ option: NBDOption, _ payload: [UInt8]) -> HandshakeAction {
        let raw = option.rawValue
        var reader = WireReader(payload)
        guard let nameLength = reader.u32(), nameLength <= limits.maximumStringLength,
              let nameBytes = reader.bytes(Int(nameLength)), let requestCount = reader.u16(),
              reader.remaining == Int(requestCount) * 2 else {
            return .proceed(reply: Self.error(.errorInvalid, option: raw, "malformed \(option) payload"))
        }
        guard let name = String(validating: nameBytes, as: UTF8.self) else {
            return .proceed(reply: Self.error(.errorInvalid, option: raw, "export name is not UTF-8"))
        }
        var requested: [UInt16] = []
        for _ in 0..<requestCount { requested.append(reader.u16()!) }
        guard let export = export(named: name) else {
            return .proceed(reply: Self.error(.errorUnknown, option: raw, "no export named \"\(name)\""))
        }
        if let refusal = export.refusal { return .proceed(reply: Self.error(.errorPolicy, option: raw, refusal)) }
        if let reply = tlsRefusal(export, option: raw) { return .proceed(reply: reply) }
        var out: [UInt8] = []
        var w = WireWriter()
        w.u16(NBDInfoType.export.rawValue)
        w.u64(export.size)
        w.u16(advertisedFlags(export).rawValue)
        out += Self.reply(.info, option: raw, payload: w.bytes)
        if requested.contains(NBDInfoType.name.rawValue) {
            var w = WireWriter()
            w.u16(NBDInfoType.name.rawValue)
            w.raw(export.name.utf8)
            out += Self.reply(.info, option: raw, payload: w.bytes)
        }
        if requested.contains(NBDInfoType.description.rawValue), !export.description.isEmpty {
            var w = WireWriter()
            w.u16(NBDInfoType.description.rawValue)
            w.raw(export.description.utf8)
            out += Self.reply(.info, option: raw, payload: w.bytes)
        }
        // Block sizes are always sent: clients that did not ask may ignore them, and the kernel and qemu
        // both size their requests better knowing the preferred size.
        let honours = requested.contains(NBDInfoType.blockSize.rawValue)
        var b = WireWriter()
        b.u16(NBDInfoType.blockSize.rawValue)
        b.u32(honours ? export.minimumBlockSize : 1)
        b.u32(export.preferredBlockSize)
        b.u32(export.maximumBlockSize)
        out += Self.reply(.info, option: raw, payload: b.bytes)
        out += Self.reply(.ack, option: raw)
        if option == .info { return .proceed(reply: out) }
        return finish(export: export, reply: out, honoursBlockSize: honours)
    }

    private mutating func enableStructuredReplies(_ payload: [UInt8]) -> HandshakeAction {
        let raw = NBDOption.structuredReply.rawValue
        guard payload.isEmpty else {
            return .proceed(reply: Self.error(.errorInvalid, option: raw, "STRUCTURED_REPLY takes no payload"))
        }
        if extendedHeaders {
            return .proceed(reply: Self.error(.errorExtendedHeaderRequired, option: raw,
                                              "extended headers already negotiated"))
        }
        guard !structuredReplies else {
            return .proceed(reply: Self.error(.errorInvalid, option: raw, "structured replies already negotiated"))
        }
        structuredReplies = true
        return .proceed(reply: Self.reply(.ack, option: raw))
    }

    private mutating func enableExtendedHeaders(_ payload: [UInt8]) -> HandshakeAction {
        let raw = NBDOption.extendedHeaders.rawValue
        guard payload.isEmpty else {
            return .proceed(reply: Self.error(.errorInvalid, option: raw, "EXTENDED_HEADERS takes no payload"))
        }
        guard !extendedHeaders else {
            return .proceed(reply: Self.error(.errorInvalid, option: raw, "extended headers already negotiated"))
        }
        extendedHeaders = true
        structuredReplies = true
        return .proceed(reply: Self.reply(.ack, option: raw))
    }

    private mutating func metaContext(_ option: NBDOption, _ payload: [UInt8]) -> HandshakeAction {
        let raw = option.rawValue
        if option == .setMetaContext {
            // SET replaces the selection even when it fails, so a failed SET leaves nothing selected.
            selectedContexts = []
            contextsExport = nil
        }
        guard structuredReplies else {
            return .proceed(reply: Self.error(.errorInvalid, option: raw, "negotiate structured replies first"))
        }
        var reader = WireReader(payload)
        guard let nameLength = reader.u32(), nameLength <= limits.maximumStringLength,
              let nameBytes = reader.bytes(Int(nameLength)),
              let name = String(validating: nameBytes, as: UTF8.self), let queryCount = reader.u32() else {
            return .proceed(reply: Self.error(.errorInvalid, option: raw, "malformed meta context payload"))
        }
        var queries: [String] = []
        for _ in 0..<queryCount {
            guard let length = reader.u32(), length <= limits.maximumStringLength,
                  let query = reader.string(length: Int(length), maximum: limits.maximumStringLength) else {
                return .proceed(reply: Self.error(.errorInvalid, option: raw, "malformed meta context query"))
            }
            queries.append(query)
        }
        guard reader.remaining == 0 else {
            return .proceed(reply: Self.error(.errorInvalid, option: raw, "trailing bytes in meta context payload"))
        }
        guard let export = export(named: name) else {
            return .proceed(reply: Self.error(.errorUnknown, option: raw, "no export named \"\(name)\""))
        }
        if let refusal = export.refusal { return .proceed(reply: Self.error(.errorPolicy, option: raw, refusal)) }
        if let reply = tlsRefusal(export, option: raw) { return .proceed(reply: reply) }
        var matches: [String] = []
        if option == .listMetaContext {
            // LIST with no query lists everything; "base:", "qemu:" and "qemu:dirty-bitmap:" are
            // wildcards (MetaContextQuery); replies follow the export's order, each context once.
            for context in export.metaContexts where queries.isEmpty || queries.contains(where: {
                MetaContextQuery.listMatches($0, context)
            }) {
                matches.append(context)
            }
        } else {
            // SET selects exact names only, in the client's order; unknown names are ignored, not errors.
            for query in queries where !matches.contains(query) {
                guard let context = export.metaContexts.first(where: { MetaContextQuery.setMatches(query, $0) }) else { continue }
                matches.append(context)
            }
            selectedContexts = matches.map { (export.metaContextID(of: $0)!, $0) }
            contextsExport = name
        }
        var out: [UInt8] = []
        for context in matches {
            var w = WireWriter()
            // LIST: "The metadata context ID in these replies is reserved and SHOULD be set to zero;
            // clients MUST disregard it." Only SET hands out ids the transmission phase uses.
            w.u32(option == .listMetaContext ? 0 : export.metaContextID(of: context)!)
            w.raw(context.utf8)
            out += Self.reply(.metaContext, option: raw, payload: w.bytes)
        }
        out += Self.reply(.ack, option: raw)
        return .proceed(reply: out)
    }

    /// NBD_OPT_STARTTLS: ACK and hand over to TLS, or the error the spec names.
    private mutating func startTLS(_ payload: [UInt8]) -> HandshakeAction {
        let raw = NBDOption.startTLS.rawValue
        guard tlsPolicy != .off else {
            return .proceed(reply: Self.error(.errorPolicy, option: raw, "TLS is not configured on this server"))
        }
        guard payload.isEmpty else {
            return .proceed(reply: Self.error(.errorInvalid, option: raw, "STARTTLS takes no payload"))
        }
        guard !tlsActive else {
            return .proceed(reply: Self.error(.errorInvalid, option: raw, "TLS is already active"))
        }
        state = .awaitingTLS
        return .startTLS(reply: Self.reply(.ack, option: raw))
    }

    // MARK: - Helpers

    /// True when the export may only be used over TLS and TLS has not started. An export with allowed
    /// PSK usernames is TLS-only too: without TLS there is no username to check.
    private func needsTLS(_ export: ExportDescriptor) -> Bool {
        guard !tlsActive else { return false }
        guard tlsPolicy != .require else { return true }
        guard let rule = tlsRules[export.name] else { return false }
        return rule.tlsRequired || rule.allowedPSKUsernames != nil
    }

    /// Over TLS, why this client's PSK username may not use the export (nil: it may).
    private func pskRefusal(_ export: ExportDescriptor) -> String? {
        guard tlsActive, let allowed = tlsRules[export.name]?.allowedPSKUsernames else { return nil }
        guard let user = pskUsername else { return "export \"\(export.name)\" is only for PSK users" }
        return allowed.contains(user) ? nil : "PSK user \"\(user)\" may not use export \"\(export.name)\""
    }

    /// The error reply for an INFO, GO or meta-context option on an export TLS keeps from this client.
    private func tlsRefusal(_ export: ExportDescriptor, option raw: UInt32) -> [UInt8]? {
        if needsTLS(export) {
            return Self.error(.errorTLSRequired, option: raw, "export \"\(export.name)\" requires TLS")
        }
        if let refusal = pskRefusal(export) { return Self.error(.errorPolicy, option: raw, refusal) }
        return nil
    }

    /// The export's flags as this negotiation advertises them. SEND_DF MUST be clear without structured
    /// replies, and SEND_FAST_ZERO MUST be clear without SEND_WRITE_ZEROES, whatever the export says.
    private func advertisedFlags(_ export: ExportDescriptor) -> TransmissionFlags {
        var flags = export.flags
        if structuredReplies { flags.insert(.sendDF) } else { flags.remove(.sendDF) }
        if !flags.contains(.sendWriteZeroes) { flags.remove(.sendFastZero) }
        return flags
    }

    private func export(named name: String) -> ExportDescriptor? {
        exports.first { $0.name == name }
    }

    private mutating func finish(export: ExportDescriptor, reply: [UInt8], honoursBlockSize: Bool) -> HandshakeAction {
        state = .finished
        var exportSeen = export
        exportSeen.flags = advertisedFlags(export)
        // Contexts selected for another export do not carry over (the spec ties them to the name).
        let contexts = contextsExport == export.name ? selectedContexts : []
        let session = NegotiatedSession(export: exportSeen, structuredReplies: structuredReplies,
                                        extendedHeaders: extendedHeaders, metaContexts: contexts,
                                        clientHonoursBlockSize: honoursBlockSize)
        return .startTransmission(reply: reply, session: session)
    }

    static func reply(_ type: NBDOptionReply, option: UInt32, payload: [UInt8] = []) -> [UInt8] {
        var w = WireWriter()
        w.u64(NBDMagic.optionReply)
        w.u32(option)
        w.u32(type.rawValue)
        w.u32(UInt32(payload.count))
        w.raw(payload)
        return w.bytes
    }

    /// Error replies carry a human-readable message, which the spec allows and clients print.
    /// Messages are strings, so at most 4096 bytes; a longer one (it may echo a client's name) is cut
    /// at a character boundary.
    static func error(_ type: NBDOptionReply, option: UInt32, _ message: String) -> [UInt8] {
        var text = Array(message.utf8)
        if text.count > 4096 {
            var end = 4096
            while end > 0 && text[end] & 0xc0 == 0x80 { end -= 1 }
            text.removeSubrange(end...)
        }
        return reply(type, option: option, payload: text)
    }
}
