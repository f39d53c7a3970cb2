// Loading credentials: the errors name the file at fault, loose key modes warn, the PSK file format
// is psktool's, and settings that cannot work together are refused before any file is read.

import Glibc
import Testing
import TLS

private var credentials: TestCredentials { TestCredentials.shared }

/// A copy of the valid X.509 directory to break.
private func copyOfCertificates(_ tag: String) -> String {
    let directory = "\(credentials.root)/copy-\(tag)-\(UInt32.random(in: 0...UInt32.max))"
    precondition(shell("cp -a \(credentials.directory) \(directory)") == 0)
    return directory
}

private func loadError(_ configuration: TLSConfiguration) -> TLSSetupError? {
    do {
        _ = try TLSCredentials(configuration)
        return nil
    } catch {
        return error
    }
}

@Suite struct TLSCredentialsTests {
    @Test func validDirectoryLoadsWithoutWarnings() throws {
        let loaded = try TLSCredentials(TLSConfiguration(certificateDirectory: credentials.directory, verifyPeer: true))
        #expect(loaded.warnings.isEmpty, "\(loaded.warnings)")
    }

    @Test func missingFilesAreNamed() {
        for file in ["server-cert.pem", "server-key.pem"] {
            let directory = copyOfCertificates("missing")
            unlink("\(directory)/\(file)")
            #expect(loadError(TLSConfiguration(certificateDirectory: directory)) == .missingFile(path: "\(directory)/\(file)"))
        }
        let directory = copyOfCertificates("no-ca")
        unlink("\(directory)/ca-cert.pem")
        #expect(loadError(TLSConfiguration(certificateDirectory: directory, verifyPeer: true))
                == .missingFile(path: "\(directory)/ca-cert.pem"))
        #expect(loadError(TLSConfiguration(certificateDirectory: directory)) == nil, "the CA is optional without verify-peer")
        #expect(loadError(TLSConfiguration(pskFile: "/nonexistent/keys.psk")) == .missingFile(path: "/nonexistent/keys.psk"))
    }

    @Test func unreadableFilesAreNamed() {
        let directory = copyOfCertificates("unreadable")
        // Tests may run as root, which reads any mode: a directory in the key's place cannot be read by anyone.
        unlink("\(directory)/server-key.pem")
        mkdir("\(directory)/server-key.pem", 0o700)
        #expect(loadError(TLSConfiguration(certificateDirectory: directory))
                == .unreadableFile(path: "\(directory)/server-key.pem", reason: "not a regular file"))
    }

    @Test func oversizedPSKFileIsRefused() {
        let psk = "\(credentials.root)/huge-\(UInt32.random(in: 0...UInt32.max)).psk"
        writeFile(psk, String(repeating: "#\n", count: (1 << 19) + 1))
        chmod(psk, 0o600)
        #expect(loadError(TLSConfiguration(pskFile: psk)) == .badFile(path: psk, reason: "larger than 1 MiB"))
    }

    @Test func brokenFilesAreNamed() {
        let directory = copyOfCertificates("broken")
        writeFile("\(directory)/server-cert.pem", "not a certificate\n")
        guard case .gnutls(let what, _) = loadError(TLSConfiguration(certificateDirectory: directory)) else {
            Issue.record("a broken certificate loaded")
            return
        }
        #expect(what.contains("\(directory)/server-cert.pem"))
    }

    @Test func keysReadableByOthersWarn() throws {
        let directory = copyOfCertificates("loose")
        chmod("\(directory)/server-key.pem", 0o644)
        let psk = "\(credentials.root)/loose.psk"
        precondition(shell("cp \(credentials.pskFile) \(psk) && chmod 640 \(psk)") == 0)
        let loaded = try TLSCredentials(TLSConfiguration(certificateDirectory: directory, pskFile: psk))
        #expect(loaded.warnings.count == 2, "\(loaded.warnings)")
        #expect(loaded.warnings.contains { $0.contains("\(directory)/server-key.pem") && $0.contains("644") })
        #expect(loaded.warnings.contains { $0.contains(psk) && $0.contains("640") })
    }

    @Test func pskFileFormat() throws {
        let entries = try parsePSKFile("alice:00ff10\n\n# comment\nbob:ABCD\r\n", name: "k")
        #expect(entries == [PSKEntry(username: "alice", key: [0, 0xff, 0x10]), PSKEntry(username: "bob", key: [0xab, 0xcd])])
        #expect(throws: TLSSetupError.badFile(path: "k:2", reason: "expected username:hexkey")) {
            try parsePSKFile("alice:00\nbob\n", name: "k")
        }
        #expect(throws: TLSSetupError.badFile(path: "k:1", reason: "the key is not an even number of hex digits")) {
            try parsePSKFile("alice:0g\n", name: "k")
        }
        #expect(throws: TLSSetupError.badFile(path: "k:2", reason: "username alice appears twice")) {
            try parsePSKFile("alice:00\nalice:11\n", name: "k")
        }
        #expect(throws: TLSSetupError.badFile(path: "k", reason: "no keys")) { try parsePSKFile("\n", name: "k") }
    }

    @Test func allowedUsernamesNarrowThePSKFile() throws {
        let loaded = try TLSCredentials(TLSConfiguration(pskFile: credentials.pskFile, allowedPSKUsernames: ["bob", "carol"]))
        #expect(loaded.warnings.count == 1 && loaded.warnings[0].contains("carol"), "\(loaded.warnings)")
        #expect(loadError(TLSConfiguration(pskFile: credentials.pskFile, allowedPSKUsernames: ["carol"]))
                == .badFile(path: credentials.pskFile, reason: "none of its usernames is allowed"))
    }

    @Test func settingsThatCannotWorkTogether() {
        #expect(!TLSConfiguration().problems().isEmpty)
        #expect(!TLSConfiguration(pskFile: "k", verifyPeer: true).problems().isEmpty)
        #expect(!TLSConfiguration(certificateDirectory: "d", allowedClientDNs: ["CN=x"]).problems().isEmpty)
        #expect(!TLSConfiguration(certificateDirectory: "d", allowedPSKUsernames: ["a"]).problems().isEmpty)
        #expect(TLSConfiguration(certificateDirectory: "d", verifyPeer: true, allowedClientDNs: ["CN=x"]).problems().isEmpty)
        guard case .badConfiguration = loadError(TLSConfiguration()) else {
            Issue.record("no credentials loaded")
            return
        }
    }

    @Test func priorityStrings() {
        let base = "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"
        #expect(TLSConfiguration.defaultPriority(aesInstructions: false) == base)
        #expect(TLSConfiguration.defaultPriority(aesInstructions: true) == base + ":%SERVER_PRECEDENCE:-CHACHA20-POLY1305:+CHACHA20-POLY1305")
        #expect(TLSConfiguration(certificateDirectory: "d").effectivePriority == TLSConfiguration.defaultPriority)
        #expect(TLSConfiguration(pskFile: "k").effectivePriority.hasSuffix(":+ECDHE-PSK:+DHE-PSK:+PSK"))
        // Both defaults are strings GnuTLS accepts, with and without the PSK key exchanges.
        for aes in [false, true] {
            let priority = TLSConfiguration.defaultPriority(aesInstructions: aes)
            #expect(loadError(TLSConfiguration(certificateDirectory: credentials.directory, priority: priority)) == nil)
        }
        guard case .badConfiguration(let message) = loadError(TLSConfiguration(certificateDirectory: credentials.directory,
                                                                                priority: "NORMAL:+NO-SUCH-THING")) else {
            Issue.record("a bad priority string loaded")
            return
        }
        #expect(message.contains("NO-SUCH-THING"), "\(message)")
    }
}
