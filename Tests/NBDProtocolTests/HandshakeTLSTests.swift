// The handshake's TLS paths: STARTTLS hands over to TLS and forgets what came before it, `require`
// answers nothing but STARTTLS and ABORT, and TLS-only exports (SELECTIVETLS, PSK user lists) stay
// out of reach and out of LIST until TLS is up.

import Testing
@testable import NBDProtocol

@Suite("Handshake: STARTTLS and TLS policies")
struct HandshakeTLSTests {
    /// Sends STARTTLS, checks the ACK and the wait for TLS, then reports TLS up.
    static func startTLS(_ c: inout Client, pskUsername: String? = nil,
                         sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(c.send(.startTLS) == .startTLS(reply: rep(.startTLS, .ack)), sourceLocation: sourceLocation)
        #expect(c.hs.state == .awaitingTLS, sourceLocation: sourceLocation)
        #expect(c.hs.bytesNeeded == 0, sourceLocation: sourceLocation)
        c.hs.tlsEstablished(pskUsername: pskUsername)
        #expect(c.hs.state == .awaitingOptionHeader, sourceLocation: sourceLocation)
        #expect(c.hs.tlsActive, sourceLocation: sourceLocation)
    }

    static func listNames(_ action: HandshakeAction) -> [String]? {
        guard let reply = action.proceedReply, let replies = parseReplies(reply), replies.last?.type == 1 else { return nil }
        return replies.dropLast().map { String(decoding: $0.payload.dropFirst(4).prefix(Int(readBE($0.payload.prefix(4)))), as: UTF8.self) }
    }

    @Test func offRefusesStartTLSByPolicy() {
        var c = Client(tls: .off)
        c.expectError(.startTLS, [], .errorPolicy)
        #expect(!c.hs.tlsActive)
    }

    @Test func onAcknowledgesAndWaitsForTLS() {
        var c = Client(tls: .on)
        Self.startTLS(&c)
        var w = c
        #expect(w.send(.go, infoPayload("disk")).isStartTransmission)
    }

    @Test func startTLSWithAPayloadIsInvalid() {
        var c = Client(tls: .on)
        c.expectError(.startTLS, utf8("x"), .errorInvalid)
        #expect(!c.hs.tlsActive)
    }

    @Test func secondStartTLSIsInvalid() {
        var c = Client(tls: .on)
        Self.startTLS(&c)
        c.expectError(.startTLS, [], .errorInvalid)
        #expect(c.hs.tlsActive)
    }

    @Test func tlsForgetsStructuredRepliesExtendedHeadersAndContexts() {
        var c = Client(tls: .on)
        #expect(c.send(.extendedHeaders) == .proceed(reply: rep(.extendedHeaders, .ack)))
        #expect(c.send(.setMetaContext, metaPayload("disk", [Fixture.base])).proceedReply != nil)
        Self.startTLS(&c)
        // Structured replies are off again: SET_META_CONTEXT needs them first.
        c.expectError(.setMetaContext, metaPayload("disk", [Fixture.base]), .errorInvalid)
        // And may be negotiated again without "already negotiated".
        #expect(c.send(.structuredReply) == .proceed(reply: rep(.structuredReply, .ack)))
        guard case .startTransmission(_, let session) = c.send(.go, infoPayload("disk")) else {
            Issue.record("GO over TLS did not start transmission")
            return
        }
        #expect(!session.extendedHeaders)
        #expect(session.structuredReplies)
        #expect(session.metaContexts.isEmpty)
    }

    @Test("require: every option but STARTTLS and ABORT gets TLS_REQD before TLS",
          arguments: [NBDOption.list, .info, .go, .structuredReply, .extendedHeaders, .listMetaContext,
                      .setMetaContext, .peekExport])
    func requireRefusesBeforeTLS(option: NBDOption) {
        var c = Client(tls: .require)
        let payload: [UInt8]
        switch option {
        case .info, .go: payload = infoPayload("disk")
        case .listMetaContext, .setMetaContext: payload = metaPayload("disk", [])
        default: payload = []
        }
        c.expectError(option, payload, .errorTLSRequired)
        c.expectError(999, [], .errorTLSRequired)
    }

    @Test func requireClosesOnExportNameBeforeTLS() {
        var c = Client(tls: .require)
        #expect(c.send(.exportName, utf8("disk")).isClose)
        #expect(c.hs.state == .closed)
    }

    @Test func requireLetsAbortThrough() {
        var c = Client(tls: .require)
        #expect(c.send(.abort) == .abort(reply: rep(.abort, .ack)))
    }

    @Test func requireServesEverythingOverTLS() {
        var c = Client(tls: .require)
        Self.startTLS(&c)
        #expect(Self.listNames(c.send(.list)) == ["disk", "other"])
        #expect(c.send(.exportName, utf8("other")).isStartTransmission)
    }

    @Test func tlsOnlyExportIsHiddenAndRefusedBeforeTLS() {
        var c = Client(tls: .on, tlsRules: ["disk": ExportTLSRule(tlsRequired: true)])
        #expect(Self.listNames(c.send(.list)) == ["other"])
        c.expectError(.info, infoPayload("disk"), .errorTLSRequired)
        c.expectError(.go, infoPayload("disk"), .errorTLSRequired)
        #expect(c.send(.structuredReply) == .proceed(reply: rep(.structuredReply, .ack)))
        c.expectError(.setMetaContext, metaPayload("disk", [Fixture.base]), .errorTLSRequired)
        // The other export is served in the clear.
        var plain = c
        #expect(plain.send(.go, infoPayload("other")).isStartTransmission)
        var old = c
        #expect(old.send(.exportName, utf8("disk")).isClose)
        Self.startTLS(&c)
        #expect(Self.listNames(c.send(.list)) == ["disk", "other"])
        #expect(c.send(.go, infoPayload("disk")).isStartTransmission)
    }

    @Test func pskUserListLimitsAnExportToThoseUsers() {
        let rules = ["disk": ExportTLSRule(allowedPSKUsernames: ["alice"])]
        var before = Client(tls: .on, tlsRules: rules)
        before.expectError(.go, infoPayload("disk"), .errorTLSRequired)

        var bob = Client(tls: .on, tlsRules: rules)
        Self.startTLS(&bob, pskUsername: "bob")
        #expect(Self.listNames(bob.send(.list)) == ["other"])
        bob.expectError(.go, infoPayload("disk"), .errorPolicy)
        var bobOld = bob
        #expect(bobOld.send(.exportName, utf8("disk")).isClose)

        var certificate = Client(tls: .on, tlsRules: rules)
        Self.startTLS(&certificate, pskUsername: nil)
        certificate.expectError(.info, infoPayload("disk"), .errorPolicy)

        var alice = Client(tls: .on, tlsRules: rules)
        Self.startTLS(&alice, pskUsername: "alice")
        #expect(Self.listNames(alice.send(.list)) == ["disk", "other"])
        #expect(alice.send(.go, infoPayload("disk")).isStartTransmission)
    }

    @Test func bytesAfterStartTLSAreNotRequested() {
        // The machine asks for nothing while TLS starts, so the connection can only drop what is staged.
        var c = Client(tls: .on)
        _ = c.send(.startTLS)
        #expect(c.hs.bytesNeeded == 0)
        #expect(c.hs.state == .awaitingTLS)
    }
}

extension HandshakeAction {
    var isStartTransmission: Bool {
        if case .startTransmission = self { return true }
        return false
    }
}
