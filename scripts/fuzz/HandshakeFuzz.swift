// libFuzzer harness for the NBD protocol layer (Sources/NBDProtocol), compiled into one module with it
// by scripts/fuzz/run. The input is what a client sends, after one configuration byte:
//
//   byte 0, bits 0-5: the server's export set (flags, block sizes, contexts); bit 6 set: the rest of the
//   input drives ReplyEncoder directly (random styles, extents, messages) instead of a connection;
//   bit 7 set: TLS is configured, and the next byte says how (see TLSSetup).
//   then: client flags, options and, once transmission starts, request headers and payloads.
//
// With TLS, a STARTTLS the machine accepts is followed at once by `tlsEstablished` (the harness plays
// the TLS layer), so the options after it are the ones a client sends over TLS. The harness traps when
// the machine wants bytes while TLS starts, accepts STARTTLS twice, answers anything but STARTTLS and
// ABORT before TLS under `require`, or lets a client into a TLS-only export without TLS.
//
// The handshake is fed exactly `bytesNeeded` bytes at a time, as Connection does. Once it starts
// transmission the rest is parsed as request headers, each validated against the negotiated session,
// WRITE payloads skipped, and every reply the connection would send built with ReplyEncoder into a
// buffer of exactly the advertised size (so ASan catches any overrun). Beyond crashes, the harness
// traps on broken invariants: option replies must be well framed and answer the option asked,
// executed requests must be in range, encoder sizes must match what was written.

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size > 0 else { return 0 }
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    let config = bytes[0]
    var input = FuzzInput(bytes, from: 1)
    if config & 0x40 != 0 {
        fuzzEncoder(&input)
    } else {
        fuzzConnection(config: config, &input)
    }
    return 0
}

struct FuzzInput {
    let bytes: [UInt8]
    var position: Int
    init(_ bytes: [UInt8], from: Int) { self.bytes = bytes; self.position = from }
    var remaining: Int { bytes.count - position }
    mutating func take(_ n: Int) -> [UInt8]? {
        guard n >= 0, remaining >= n else { return nil }
        defer { position += n }
        return Array(bytes[position..<position + n])
    }
    mutating func u8() -> UInt8 { take(1)?[0] ?? 0 }
    mutating func u32() -> UInt32 { (take(4) ?? [0, 0, 0, 0]).reduce(0) { $0 << 8 | UInt32($1) } }
    mutating func u64() -> UInt64 { (take(8) ?? [UInt8](repeating: 0, count: 8)).reduce(0) { $0 << 8 | UInt64($1) } }
}

func check(_ condition: Bool, _ message: @autoclosure () -> String) {
    if !condition { fatalError("invariant: \(message())") }
}

func be(_ b: ArraySlice<UInt8>) -> UInt64 { b.reduce(0) { $0 << 8 | UInt64($1) } }

// MARK: - Exports

func makeExports(_ config: UInt8) -> [ExportDescriptor] {
    var flags: TransmissionFlags = [.sendFlush, .sendFUA]
    if config & 1 != 0 { flags.insert(.readOnly) }
    if config & 2 != 0 { flags.formUnion([.sendTrim, .sendWriteZeroes, .sendFastZero, .sendCache]) }
    if config & 4 != 0 { flags.formUnion([.sendDF, .canMultiConn]) }
    let minimum: UInt32 = [1, 512, 4096, 65536][Int(config >> 3) & 3]
    let contexts = config & 0x20 != 0
        ? [MetaContextName.baseAllocation, MetaContextName.allocationDepth] : [MetaContextName.baseAllocation]
    return [
        ExportDescriptor(name: "", description: "default export", size: 1 << 20, flags: flags,
                         minimumBlockSize: minimum, metaContexts: contexts),
        ExportDescriptor(name: "disk", description: "", size: (1 << 32) + 4096, flags: flags,
                         minimumBlockSize: minimum, preferredBlockSize: 65536, maximumBlockSize: 32 << 20,
                         metaContexts: contexts),
        ExportDescriptor(name: "tiny\u{e9}", description: String(repeating: "d", count: 5000), size: 0,
                         flags: [.readOnly], minimumBlockSize: 512, maximumBlockSize: 4096, metaContexts: []),
    ]
}

// MARK: - Handshake then transmission

/// Splits option replies; traps when the framing is wrong or a reply answers another option.
func checkOptionReplies(_ reply: [UInt8], option: UInt32) {
    var i = 0
    while i < reply.count {
        check(reply.count - i >= 20, "truncated option reply header")
        check(be(reply[i..<i + 8]) == 0x0003_e889_0455_65a9, "bad option reply magic")
        check(UInt32(be(reply[i + 8..<i + 12])) == option, "reply for another option")
        let type = UInt32(be(reply[i + 12..<i + 16]))
        let length = Int(be(reply[i + 16..<i + 20]))
        check(reply.count - i - 20 >= length, "option reply payload runs past the reply")
        if type & 0x8000_0000 != 0 { check(length <= 4096, "error message longer than 4096 bytes") }
        i += 20 + length
    }
}

/// The TLS byte: bits 0-1 the policy (1: require, otherwise on), bit 2 export "disk" is TLS-only,
/// bit 3 export "disk" only for PSK user alice, bits 4-5 the PSK username TLS reports (none, alice, bob).
struct TLSSetup {
    var policy: TLSPolicy = .off
    var pskUsername: String?
    var rules: [String: ExportTLSRule] = [:]

    init(config: UInt8, _ input: inout FuzzInput) {
        guard config & 0x80 != 0 else { return }
        let byte = input.u8()
        policy = byte & 3 == 1 ? .require : .on
        if byte & 12 != 0 {
            rules["disk"] = ExportTLSRule(tlsRequired: byte & 4 != 0, allowedPSKUsernames: byte & 8 != 0 ? ["alice"] : nil)
        }
        pskUsername = [nil, "alice", "bob", nil][Int(byte >> 4) & 3]
    }
}

func fuzzConnection(config: UInt8, _ input: inout FuzzInput) {
    let exports = makeExports(config)
    let tls = TLSSetup(config: config, &input)
    var handshake = Handshake(exports: exports, tls: tls.policy, tlsRules: tls.rules)
    check(Handshake.greeting.count == 18, "greeting is not 18 bytes")
    var lastOption: UInt32 = 0
    var session: NegotiatedSession?
    loop: while true {
        let n = handshake.bytesNeeded
        check(n > 0, "handshake wants 0 bytes in \(handshake.state)")
        guard let chunk = input.take(n) else { return }
        // Whether this chunk completes an option: a header without payload, or the payload.
        let optionComplete: Bool
        switch handshake.state {
        case .awaitingOptionHeader:
            lastOption = UInt32(be(chunk[8..<12]))
            optionComplete = be(chunk[12..<16]) == 0
        case .awaitingOptionPayload: optionComplete = true
        default: optionComplete = false
        }
        let wasTLS = handshake.tlsActive
        let action = handshake.receive(chunk)
        if tls.policy == .require && !wasTLS && optionComplete
            && lastOption != NBDOption.startTLS.rawValue && lastOption != NBDOption.abort.rawValue {
            switch action {
            case .close: break
            case .proceed(let reply):
                check(reply.count >= 20 && be(reply[12..<16]) == 0x8000_0005 && reply.count == 20 + Int(be(reply[16..<20])),
                      "option \(lastOption) before TLS under require not answered TLS_REQD alone")
            default: check(false, "option \(lastOption) before TLS under require: \(action)")
            }
        }
        switch action {
        case .proceed(let reply):
            checkOptionReplies(reply, option: lastOption)
        case .startTLS(let reply):
            check(tls.policy != .off && !wasTLS, "STARTTLS accepted with TLS off or already active")
            check(lastOption == NBDOption.startTLS.rawValue, "TLS started by option \(lastOption)")
            check(handshake.state == .awaitingTLS && handshake.bytesNeeded == 0, "the machine reads while TLS starts")
            checkOptionReplies(reply, option: lastOption)
            check(reply.count == 20 && be(reply[12..<16]) == 1, "STARTTLS answered with more than an ACK")
            handshake.tlsEstablished(pskUsername: tls.pskUsername)
        case .abort(let reply):
            checkOptionReplies(reply, option: lastOption)
            check(handshake.state == .closed && handshake.bytesNeeded == 0, "abort left the machine open")
            return
        case .close:
            check(handshake.state == .closed && handshake.bytesNeeded == 0, "close left the machine open")
            return
        case .startTransmission(let reply, let s):
            check(handshake.state == .finished && handshake.bytesNeeded == 0, "transmission with the machine open")
            if lastOption != NBDOption.exportName.rawValue { checkOptionReplies(reply, option: lastOption) }
            let rule = tls.rules[s.export.name]
            if tls.policy == .require || rule != nil {
                check(handshake.tlsActive, "TLS-only export \"\(s.export.name)\" entered without TLS")
            }
            if let allowed = rule?.allowedPSKUsernames {
                check(tls.pskUsername.map(allowed.contains) == true, "PSK-only export entered by another user")
            }
            session = s
            break loop
        }
    }
    guard let session else { return }
    check(session.export.flags.contains(.hasFlags), "HAS_FLAGS missing")
    check(session.structuredReplies || !session.export.flags.contains(.sendDF), "SEND_DF without structured replies")
    check(!session.extendedHeaders || session.structuredReplies, "extended headers without structured replies")
    check(exports.contains { $0.name == session.export.name }, "session for an unknown export")
    for c in session.metaContexts {
        check(session.export.metaContextID(of: c.name) == c.id, "meta context id mismatch")
    }
    transmission(session, &input)
}

func transmission(_ session: NegotiatedSession, _ input: inout FuzzInput) {
    let validator = RequestValidator(session: session)
    let encoder = ReplyEncoder(style: ReplyStyle(session: session))
    let extended = session.extendedHeaders
    let headerSize = Request.headerSize(extended: extended)
    let export = session.export
    for _ in 0..<256 {
        guard let header = input.take(headerSize) else { return }
        guard let request = header.withUnsafeBytes({ Request.parse($0, extended: extended) }) else { return }
        check(request.encoded(extended: extended) == header, "request does not round-trip")
        let verdict = validator.validate(request)
        switch verdict {
        case .disconnect, .fatal:
            return
        case .reject(let code, let payload, let reason):
            check(code != .ok, "rejected with OK")
            check(payload >= 0 && UInt64(payload) <= validator.drainLimit, "drain beyond the limit")
            guard input.take(payload) != nil else { return }
            reply(encoder, request, error: code, message: reason, &input)
        case .execute(let command, let payload):
            check(payload >= 0 && UInt64(payload) <= validator.maximumPayload, "payload beyond the maximum")
            if command == .write { check(UInt64(payload) == request.length, "WRITE payload is not its length") }
            else { check(payload == 0, "payload on \(command)") }
            if command == .write || command == .trim || command == .writeZeroes {
                check(!export.flags.contains(.readOnly), "write executed on a read-only export")
            }
            if command != .flush {
                let (end, overflow) = request.offset.addingReportingOverflow(request.length)
                check(!overflow && end <= export.size, "executed request past the end")
            }
            if command == .read || command == .write {
                check(request.length <= UInt64(export.maximumBlockSize), "request above the maximum block size")
            }
            if command == .blockStatus { check(!session.metaContexts.isEmpty && request.length > 0, "bad BLOCK_STATUS") }
            guard input.take(payload) != nil else { return }
            switch command {
            case .read: readReply(encoder, request, &input)
            case .blockStatus: blockStatusReply(encoder, session, request, &input)
            default: reply(encoder, request, error: .ok, message: "", &input)
            }
        }
    }
}

/// The completion Connection would send, into a buffer of exactly `completionSize` bytes.
func reply(_ encoder: ReplyEncoder, _ request: Request, error: NBDErrorCode, message: String, _ input: inout FuzzInput) {
    var text = Array(message.utf8)
    if input.u8() & 1 != 0 { text += [UInt8](repeating: 0x41, count: Int(input.u32() % 9000)) }
    let size = encoder.completionSize(messageLength: text.count)
    let out = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
    defer { out.deallocate() }
    let n = text.withUnsafeBytes {
        encoder.completion(into: out, cookie: request.cookie, requestOffset: request.offset, error: error, message: $0)
    }
    check(n <= size && (error == .ok || n == size), "completion wrote \(n) bytes, completionSize said \(size)")
}

/// A read reply as a mix of data and hole chunks, split where the input says.
func readReply(_ encoder: ReplyEncoder, _ request: Request, _ input: inout FuzzInput) {
    let out = UnsafeMutableRawPointer.allocate(byteCount: ReplyEncoder.maximumHeaderSize, alignment: 8)
    defer { out.deallocate() }
    if encoder.style == .simple {
        let n = encoder.dataHeader(into: out, cookie: request.cookie, requestOffset: request.offset,
                                   dataOffset: request.offset, dataLength: Int(request.length), done: true)
        check(n == 16, "simple data header of \(n) bytes")
        return
    }
    var done: UInt64 = 0
    var chunks = 0
    repeat {
        let left = request.length - done
        let piece = chunks >= 16 ? left : min(left, UInt64(input.u32()) % (left + 1))
        let isHole = input.u8() & 1 != 0
        let last = done + piece == request.length
        let n = isHole
            ? encoder.holeChunk(into: out, cookie: request.cookie, requestOffset: request.offset,
                                holeOffset: request.offset + done, holeLength: UInt32(piece), done: last)
            : encoder.dataHeader(into: out, cookie: request.cookie, requestOffset: request.offset,
                                 dataOffset: request.offset + done, dataLength: Int(piece), done: last)
        check(n <= ReplyEncoder.maximumHeaderSize, "header of \(n) bytes")
        check(n == encoder.chunkHeaderSize + (isHole ? 12 : 8), "chunk of unexpected size \(n)")
        done += piece
        chunks += 1
    } while done < request.length
}

/// BLOCK_STATUS chunks built from extents the input supplies, reduced the way Connection does.
func blockStatusReply(_ encoder: ReplyEncoder, _ session: NegotiatedSession, _ request: Request,
                      _ input: inout FuzzInput) {
    var extents: [(length: UInt64, flags: UInt32, depth: UInt32)] = []
    let count = Int(input.u8() % 40)
    for _ in 0..<count {
        let length = UInt64(input.u32()) + 1
        extents.append((length, input.u32() & 3, input.u32() & 7))
    }
    for (k, context) in session.metaContexts.enumerated() {
        let depth = context.name == MetaContextName.allocationDepth
        var list: [(length: UInt64, flags: UInt32)] = []
        var covered: UInt64 = 0
        for e in extents where covered < request.length {
            let length = min(e.length, request.length - covered)
            let value = depth ? e.depth : e.flags
            covered += length
            if let last = list.last, last.flags == value { list[list.count - 1].length += length }
            else { list.append((length, value)) }
        }
        if list.isEmpty { list = [(request.length, 0)] }
        if request.flags.contains(.requestOne) { list = [list[0]] }
        let size = encoder.blockStatusSize(count: list.count)
        let out = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        let n = encoder.blockStatusChunk(into: out, cookie: request.cookie, requestOffset: request.offset,
                                         contextID: context.id, extents: list, done: k == session.metaContexts.count - 1)
        out.deallocate()
        check(n == size, "block status chunk of \(n) bytes, blockStatusSize said \(size)")
    }
}

// MARK: - ReplyEncoder alone

func fuzzEncoder(_ input: inout FuzzInput) {
    let styles: [ReplyStyle] = [.simple, .structured, .extended]
    while input.remaining > 0 {
        let op = input.u8()
        let style = styles[Int(op >> 4) % 3]
        let encoder = ReplyEncoder(style: style)
        let cookie = input.u64(), offset = input.u64()
        switch op & 3 {
        case 0:
            let code = NBDErrorCode(rawValue: input.u32() % 128) ?? .io
            let length = Int(input.u32() % 10000)
            let message = [UInt8](repeating: 0xc3, count: length)
            let size = encoder.completionSize(messageLength: length)
            let out = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
            let n = message.withUnsafeBytes {
                encoder.completion(into: out, cookie: cookie, requestOffset: offset, error: code, message: $0)
            }
            out.deallocate()
            check(n <= size && (code == .ok || n == size), "completion size")
        case 1:
            let out = UnsafeMutableRawPointer.allocate(byteCount: ReplyEncoder.maximumHeaderSize, alignment: 8)
            let n = encoder.dataHeader(into: out, cookie: cookie, requestOffset: offset, dataOffset: input.u64(),
                                       dataLength: Int(input.u32() % (64 << 20)), done: op & 4 != 0)
            out.deallocate()
            check(n <= ReplyEncoder.maximumHeaderSize, "data header size")
        case 2:
            guard style != .simple else { continue }
            let out = UnsafeMutableRawPointer.allocate(byteCount: ReplyEncoder.maximumHeaderSize, alignment: 8)
            let n = encoder.holeChunk(into: out, cookie: cookie, requestOffset: offset, holeOffset: input.u64(),
                                      holeLength: input.u32(), done: op & 4 != 0)
            out.deallocate()
            check(n == encoder.chunkHeaderSize + 12, "hole chunk size")
        default:
            guard style != .simple else { continue }
            var extents: [(length: UInt64, flags: UInt32)] = []
            for _ in 0..<Int(input.u8() % 64) {
                let length = style == .extended ? input.u64() : UInt64(input.u32())
                extents.append((length, input.u32()))
            }
            let size = encoder.blockStatusSize(count: extents.count)
            let out = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
            let n = encoder.blockStatusChunk(into: out, cookie: cookie, requestOffset: offset, contextID: input.u32(),
                                             extents: extents, done: op & 4 != 0)
            out.deallocate()
            check(n == size, "block status size")
        }
    }
}
