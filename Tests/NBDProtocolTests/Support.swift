// Helpers shared by the NBDProtocol tests. Expected wire bytes are built here independently of the
// module's own writers (WireWriter), so the tests do not check the code against itself.

import Testing
@testable import NBDProtocol

// MARK: - Big-endian builders

func be16(_ v: UInt16) -> [UInt8] { [UInt8(v >> 8), UInt8(v & 0xff)] }
func be32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (24 - 8 * $0)) } }
func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * $0)) } }
func utf8(_ s: String) -> [UInt8] { Array(s.utf8) }

/// Bytes from a hex string; spaces and underscores are ignored ("0003e889 0455_65a9").
func hex(_ s: String) -> [UInt8] {
    let digits = s.filter { $0.isHexDigit }
    precondition(digits.count % 2 == 0, "odd hex string")
    var out: [UInt8] = []
    var i = digits.startIndex
    while i < digits.endIndex {
        let j = digits.index(i, offsetBy: 2)
        out.append(UInt8(digits[i..<j], radix: 16)!)
        i = j
    }
    return out
}

func readBE(_ b: ArraySlice<UInt8>) -> UInt64 { b.reduce(0) { $0 << 8 | UInt64($1) } }

// MARK: - Option requests and replies

func optionHeader(_ option: UInt32, length: UInt32, magic: UInt64 = 0x4948_4156_454f_5054) -> [UInt8] {
    be64(magic) + be32(option) + be32(length)
}

/// Expected option reply bytes.
func rep(_ option: UInt32, _ type: UInt32, _ payload: [UInt8] = []) -> [UInt8] {
    be64(0x0003_e889_0455_65a9) + be32(option) + be32(type) + be32(UInt32(payload.count)) + payload
}

func rep(_ option: NBDOption, _ type: NBDOptionReply, _ payload: [UInt8] = []) -> [UInt8] {
    rep(option.rawValue, type.rawValue, payload)
}

func infoExport(size: UInt64, flags: UInt16) -> [UInt8] { be16(0) + be64(size) + be16(flags) }
func infoName(_ s: String) -> [UInt8] { be16(1) + utf8(s) }
func infoDescription(_ s: String) -> [UInt8] { be16(2) + utf8(s) }
func infoBlockSize(_ minimum: UInt32, _ preferred: UInt32, _ maximum: UInt32) -> [UInt8] {
    be16(3) + be32(minimum) + be32(preferred) + be32(maximum)
}
func metaContextReply(_ option: NBDOption, id: UInt32, _ name: String) -> [UInt8] {
    rep(option, .metaContext, be32(id) + utf8(name))
}
func serverReply(_ name: String, _ description: String) -> [UInt8] {
    rep(.list, .server, be32(UInt32(name.utf8.count)) + utf8(name) + utf8(description))
}

/// INFO/GO payload.
func infoPayload(_ name: String, _ requests: [UInt16] = []) -> [UInt8] {
    be32(UInt32(name.utf8.count)) + utf8(name) + be16(UInt16(requests.count)) + requests.flatMap(be16)
}

/// LIST/SET_META_CONTEXT payload.
func metaPayload(_ name: String, _ queries: [String]) -> [UInt8] {
    var out = be32(UInt32(name.utf8.count)) + utf8(name) + be32(UInt32(queries.count))
    for q in queries { out += be32(UInt32(q.utf8.count)) + utf8(q) }
    return out
}

struct ParsedReply: Equatable, CustomStringConvertible {
    var option: UInt32
    var type: UInt32
    var payload: [UInt8]
    var description: String { "reply(opt \(option), type 0x\(String(type, radix: 16)), \(payload.count) B)" }
}

/// Splits a concatenation of option replies; nil when the framing is wrong.
func parseReplies(_ bytes: [UInt8]) -> [ParsedReply]? {
    var out: [ParsedReply] = []
    var i = 0
    while i < bytes.count {
        guard bytes.count - i >= 20, readBE(bytes[i..<i + 8]) == 0x0003_e889_0455_65a9 else { return nil }
        let option = UInt32(readBE(bytes[i + 8..<i + 12]))
        let type = UInt32(readBE(bytes[i + 12..<i + 16]))
        let length = Int(readBE(bytes[i + 16..<i + 20]))
        guard bytes.count - i - 20 >= length else { return nil }
        out.append(ParsedReply(option: option, type: type, payload: Array(bytes[i + 20..<i + 20 + length])))
        i += 20 + length
    }
    return out
}

extension HandshakeAction {
    /// The reply of a `.proceed`, nil for any other action.
    var proceedReply: [UInt8]? {
        if case .proceed(let reply) = self { return reply }
        return nil
    }
    var isClose: Bool {
        if case .close = self { return true }
        return false
    }
}

// MARK: - Fixtures

enum Fixture {
    static let base = MetaContextName.baseAllocation
    static let depth = MetaContextName.allocationDepth
    /// What qemu-nbd 7.2 advertises for a read-write export (0x0d6d; 0x0ded once DF is added).
    static let rwFlags: TransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .sendTrim, .sendWriteZeroes,
                                             .canMultiConn, .sendCache, .sendFastZero]
    static let disk = ExportDescriptor(name: "disk", description: "test disk", size: 1 << 30, flags: rwFlags,
                                       minimumBlockSize: 512, preferredBlockSize: 4096,
                                       maximumBlockSize: 32 << 20, metaContexts: [base, depth])
    /// Read-only, no description, only base:allocation.
    static let other = ExportDescriptor(name: "other", description: "", size: 3 * 512, flags: [.readOnly, .sendFlush],
                                        metaContexts: [base])
    static let exports = [disk, other]
}

// MARK: - A scripted client

/// Drives a `Handshake` the way a connection does: exactly `bytesNeeded` bytes at a time.
struct Client {
    var hs: Handshake

    init(_ exports: [ExportDescriptor] = Fixture.exports, flags: UInt32 = 3,
         limits: HandshakeLimits = HandshakeLimits(), tls: TLSPolicy = .off,
         tlsRules: [String: ExportTLSRule] = [:], sourceLocation: SourceLocation = #_sourceLocation) {
        hs = Handshake(exports: exports, limits: limits, tls: tls, tlsRules: tlsRules)
        #expect(hs.bytesNeeded == 4, sourceLocation: sourceLocation)
        #expect(hs.receive(be32(flags)) == .proceed(reply: []), sourceLocation: sourceLocation)
        #expect(hs.state == .awaitingOptionHeader, sourceLocation: sourceLocation)
    }

    /// Sends one option (header, then payload if any) and returns the machine's answer to the whole option.
    mutating func send(_ option: UInt32, _ payload: [UInt8] = [],
                       sourceLocation: SourceLocation = #_sourceLocation) -> HandshakeAction {
        #expect(hs.bytesNeeded == 16, sourceLocation: sourceLocation)
        let first = hs.receive(optionHeader(option, length: UInt32(payload.count)))
        if payload.isEmpty { return first }
        guard first == .proceed(reply: []) else { return first }
        #expect(hs.state == .awaitingOptionPayload(option: option, length: payload.count), sourceLocation: sourceLocation)
        #expect(hs.bytesNeeded == payload.count, sourceLocation: sourceLocation)
        return hs.receive(payload)
    }

    mutating func send(_ option: NBDOption, _ payload: [UInt8] = [],
                       sourceLocation: SourceLocation = #_sourceLocation) -> HandshakeAction {
        send(option.rawValue, payload, sourceLocation: sourceLocation)
    }

    /// Sends an option that must be answered by exactly one error reply of `type`, with the loop going on.
    mutating func expectError(_ option: UInt32, _ payload: [UInt8] = [], _ type: NBDOptionReply,
                              sourceLocation: SourceLocation = #_sourceLocation) {
        let action = send(option, payload, sourceLocation: sourceLocation)
        expectErrorReply(action, option: option, type, sourceLocation: sourceLocation)
        #expect(hs.state == .awaitingOptionHeader, sourceLocation: sourceLocation)
    }

    mutating func expectError(_ option: NBDOption, _ payload: [UInt8] = [], _ type: NBDOptionReply,
                              sourceLocation: SourceLocation = #_sourceLocation) {
        expectError(option.rawValue, payload, type, sourceLocation: sourceLocation)
    }
}

/// Checks that `action` is a `.proceed` carrying one error reply of `type` for `option`, whose message is
/// a valid string (UTF-8, at most 4096 bytes).
func expectErrorReply(_ action: HandshakeAction, option: UInt32, _ type: NBDOptionReply,
                      sourceLocation: SourceLocation = #_sourceLocation) {
    guard let reply = action.proceedReply else {
        Issue.record("expected an error reply, got \(action)", sourceLocation: sourceLocation)
        return
    }
    guard let replies = parseReplies(reply), replies.count == 1, let r = replies.first else {
        Issue.record("expected exactly one framed reply, got \(reply.count) bytes", sourceLocation: sourceLocation)
        return
    }
    #expect(r.option == option, sourceLocation: sourceLocation)
    #expect(r.type == type.rawValue, sourceLocation: sourceLocation)
    #expect(r.type & 0x8000_0000 != 0, sourceLocation: sourceLocation)
    #expect(r.payload.count <= 4096, sourceLocation: sourceLocation)
    #expect(String(validating: r.payload, as: UTF8.self) != nil, sourceLocation: sourceLocation)
}

// MARK: - Deterministic randomness

/// SplitMix64: seeded so that a failing randomized run can be replayed.
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

extension Array where Element == UInt8 {
    static func random(count: Int, using rng: inout SeededRandom) -> [UInt8] {
        (0..<count).map { _ in UInt8.random(in: .min ... .max, using: &rng) }
    }
}
