// The TLS keys of the config file: [generic] modes and credentials, per-export TLS-only and PSK users,
// and the messages for wrong values.

@testable import NBDServer
import NBDProtocol
import Testing
import TLS

@Suite struct ConfigTLSTests {
    @Test func genericAndExportTLSKeysLoad() throws {
        let c = try ConfigFile.parse("""
            [generic]
            tls = require
            tls-certificates = pki
            tls-psk = /etc/qnbd/keys.psk
            tls-verify-peer = true
            tls-authz-file = allowed-dns
            tls-priority = NORMAL:-VERS-ALL:+VERS-TLS1.3
            [secret]
            exportname = /d1
            tls = require
            tls-psk-users = alice, bob
            [open]
            exportname = /d2
            tls = on
            """, file: "/etc/qnbd/test.conf")
        #expect(c.tlsMode == .require)
        #expect(c.effectiveTLSMode == .require)
        #expect(c.tls == TLSConfiguration(certificateDirectory: "/etc/qnbd/pki", pskFile: "/etc/qnbd/keys.psk",
                                          verifyPeer: true, priority: "NORMAL:-VERS-ALL:+VERS-TLS1.3"))
        #expect(c.tlsAuthzFile == "/etc/qnbd/allowed-dns")
        #expect(c.exports[0].tlsRequired)
        #expect(c.exports[0].allowedPSKUsernames == ["alice", "bob"])
        #expect(!c.exports[1].tlsRequired)
        #expect(c.exports[1].allowedPSKUsernames == nil)
    }

    @Test func credentialsAloneMeanOn() throws {
        let c = try ConfigFile.parse("[generic]\ntls-psk = /k\n[d]\nexportname = /d\n", file: "/t.conf")
        #expect(c.tlsMode == nil)
        #expect(c.effectiveTLSMode == .on)
        let none = try ConfigFile.parse("[generic]\n[d]\nexportname = /d\n", file: "/t.conf")
        #expect(none.effectiveTLSMode == .off)
    }

    @Test func wrongValuesNameTheLine() {
        func failure(_ text: String) -> String? {
            do { _ = try ConfigFile.parse(text, file: "/t.conf"); return nil } catch { return error.description }
        }
        #expect(failure("[generic]\ntls = yes\n[d]\nexportname = /d\n")?.contains("/t.conf:2") == true)
        #expect(failure("[generic]\n[d]\nexportname = /d\ntls = off\n")?.contains("require or on") == true)
        #expect(failure("[generic]\n[d]\nexportname = /d\ntls-psk-users = ,\n")?.contains("/t.conf:4") == true)
        #expect(failure("[generic]\ntls-psk-users = a\n[d]\nexportname = /d\n")?.contains("belongs in an export section") == true)
    }

    @Test func tlsSettingsNeedARestart() {
        let a = ServerConfiguration(imagePath: "/d")
        var b = a
        b.tls = TLSConfiguration(pskFile: "/k")
        #expect(b.restartOnlyDifferences(from: a).contains("TLS settings"))
    }

    @Test func missingCredentialFilesStopStartupNamingTheFile() {
        var c = ServerConfiguration(imagePath: "/d")
        c.tls = TLSConfiguration(certificateDirectory: "/nonexistent-qnbd-pki")
        #expect(throws: ServerError.self) { try Server.loadTLS(c, log: Logger(level: .error)) }
        do {
            _ = try Server.loadTLS(c, log: Logger(level: .error))
        } catch {
            #expect(error.description.contains("/nonexistent-qnbd-pki/"))
        }
        var off = c
        off.tlsMode = .off
        off.exports[0].tlsRequired = true
        #expect(throws: ServerError.self) { try Server.loadTLS(off, log: Logger(level: .error)) }
        var noCredentials = ServerConfiguration(imagePath: "/d")
        noCredentials.tlsMode = .require
        #expect(throws: ServerError.self) { try Server.loadTLS(noCredentials, log: Logger(level: .error)) }
    }
}
