// TLSCredentials: a TLSConfiguration turned into GnuTLS objects, loaded once at startup and shared
// read-only by every session (GnuTLS credentials and priority caches may be used by many sessions
// and threads at once once built).
//
// Loading checks every file itself before GnuTLS sees it, so the operator gets "server-key.pem: file
// not found" rather than GnuTLS's "Error while reading file."; key files that group or others may
// read give warnings, not errors (qemu's own layout often has them 0640 for a service group).

import CGnuTLS
import Glibc
import SystemCalls

/// Loaded credentials and policy; make sessions with `TLSStream(wrapping:credentials:delegate:)`.
public final class TLSCredentials: @unchecked Sendable {
    public let configuration: TLSConfiguration
    /// Things the operator should know but that do not stop startup (loose key file modes, ...).
    public let warnings: [String]
    /// PSK keys by username, already narrowed to the allowed usernames.
    let pskKeys: [String: [UInt8]]

    let certificates: gnutls_certificate_credentials_t?
    let psk: gnutls_psk_server_credentials_t?
    let priorities: gnutls_priority_t

    /// Loads everything the configuration names; throws naming the first file or setting at fault.
    public init(_ configuration: TLSConfiguration) throws(TLSSetupError) {
        let problems = configuration.problems()
        if !problems.isEmpty { throw .badConfiguration(problems.joined(separator: "; ")) }
        var warnings: [String] = []
        var certificates: gnutls_certificate_credentials_t?
        var psk: gnutls_psk_server_credentials_t?
        var pskKeys: [String: [UInt8]] = [:]
        var priorities: gnutls_priority_t?
        // Whatever was built is freed if a later step throws.
        var done = false
        defer {
            if !done {
                if let certificates { gnutls_certificate_free_credentials(certificates) }
                if let psk { gnutls_psk_free_server_credentials(psk) }
                if let priorities { gnutls_priority_deinit(priorities) }
            }
        }

        if configuration.certificateDirectory != nil {
            let certificate = configuration.path(of: .serverCertificate)!
            let key = configuration.path(of: .serverKey)!
            let ca = configuration.path(of: .caCertificate)!
            let crl = configuration.path(of: .caRevocationList)!
            try checkReadable(certificate)
            try checkReadable(key)
            if let warning = looseModeWarning(key) { warnings.append(warning) }
            let haveCA = configuration.verifyPeer || fileExists(ca)
            if haveCA { try checkReadable(ca) }
            let haveCRL = fileExists(crl)
            if haveCRL { try checkReadable(crl) }

            try gnutlsCheck(gnutls_certificate_allocate_credentials(&certificates), "allocating certificate credentials")
            try gnutlsCheck(gnutls_certificate_set_x509_key_file(certificates, certificate, key, GNUTLS_X509_FMT_PEM),
                            "\(certificate) with \(key)")
            if haveCA {
                let count = gnutls_certificate_set_x509_trust_file(certificates, ca, GNUTLS_X509_FMT_PEM)
                try gnutlsCheck(count, ca)
                if count == 0 { throw .badFile(path: ca, reason: "no certificates in it") }
            }
            if haveCRL {
                try gnutlsCheck(gnutls_certificate_set_x509_crl_file(certificates, crl, GNUTLS_X509_FMT_PEM), crl)
            }
        } else {
            // Empty on purpose: a TLS 1.2 server without any certificate credentials lets GnuTLS 3.7
            // pick a certificate suite the client offered first, and then fails the handshake with
            // "Insufficient credentials"; with empty ones it skips those suites (gnutls-serv does the same).
            try gnutlsCheck(gnutls_certificate_allocate_credentials(&certificates), "allocating certificate credentials")
        }

        if let file = configuration.pskFile {
            try checkReadable(file)
            if let warning = looseModeWarning(file) { warnings.append(warning) }
            let entries = try parsePSKFile(try readTextFile(file), name: file)
            let allowed = configuration.allowedPSKUsernames.map(Set.init)
            for entry in entries where allowed?.contains(entry.username) ?? true {
                pskKeys[entry.username] = entry.key
            }
            for name in configuration.allowedPSKUsernames ?? [] where pskKeys[name] == nil {
                warnings.append("TLS: allowed PSK username \(name) has no key in \(file)")
            }
            if pskKeys.isEmpty { throw .badFile(path: file, reason: "none of its usernames is allowed") }
            try gnutlsCheck(gnutls_psk_allocate_server_credentials(&psk), "allocating PSK credentials")
            gnutls_psk_set_server_credentials_function(psk, lookUpPSK)
            // DHE-PSK (TLS 1.2) uses the RFC 7919 group of this strength.
            try gnutlsCheck(gnutls_psk_set_server_known_dh_params(psk, GNUTLS_SEC_PARAM_MEDIUM), "PSK DH parameters")
        }

        let priority = configuration.effectivePriority
        // GnuTLS reports where parsing stopped as a pointer into the string it was given, so that
        // pointer is turned into an offset while the C string is still alive.
        var errorOffset: Int?
        let rc = priority.withCString { text -> Int32 in
            var errorPosition: UnsafePointer<CChar>?
            let rc = gnutls_priority_init(&priorities, text, &errorPosition)
            if rc < 0, let errorPosition { errorOffset = text.distance(to: errorPosition) }
            return rc
        }
        if rc < 0 {
            let at = errorOffset.map { " at \"\(String(decoding: priority.utf8.dropFirst($0), as: UTF8.self))\"" } ?? ""
            throw .badConfiguration("priority string \"\(priority)\": \(String(cString: gnutls_strerror(rc)))\(at)")
        }

        self.configuration = configuration
        self.warnings = warnings
        self.pskKeys = pskKeys
        self.certificates = certificates
        self.psk = psk
        self.priorities = priorities!
        done = true
    }

    deinit {
        if let certificates { gnutls_certificate_free_credentials(certificates) }
        if let psk { gnutls_psk_free_server_credentials(psk) }
        gnutls_priority_deinit(priorities)
    }

    /// A fresh server session with these credentials and priorities, non-blocking, no session tickets.
    func makeSession() throws(TLSError) -> gnutls_session_t {
        var session: gnutls_session_t?
        var rc = gnutls_init(&session, UInt32(GNUTLS_SERVER.rawValue | GNUTLS_NONBLOCK.rawValue | GNUTLS_NO_TICKETS.rawValue))
        guard rc == 0, let session else { throw TLSError(code: rc, session: nil, refusal: nil, duringHandshake: true) }
        rc = gnutls_priority_set(session, priorities)
        if rc == 0, let certificates {
            rc = gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, UnsafeMutableRawPointer(certificates))
            if rc == 0 && configuration.verifyPeer { gnutls_certificate_server_set_request(session, GNUTLS_CERT_REQUIRE) }
        }
        if rc == 0, let psk {
            rc = gnutls_credentials_set(session, GNUTLS_CRD_PSK, UnsafeMutableRawPointer(psk))
        }
        if rc < 0 {
            gnutls_deinit(session)
            throw TLSError(code: rc, session: nil, refusal: nil, duringHandshake: true)
        }
        // The caller's timer bounds the handshake; GnuTLS's own timeout would need a blocking pull.
        gnutls_handshake_set_timeout(session, 0)
        return session
    }
}

/// GnuTLS asks for the key of `username`; the session's TLSStream knows the credentials.
private let lookUpPSK: @convention(c) (gnutls_session_t?, UnsafePointer<CChar>?, UnsafeMutablePointer<gnutls_datum_t>?) -> Int32 = {
    session, username, key in
    guard let session, let username, let key, let stream = TLSStream.owning(session) else { return -1 }
    let name = String(cString: username)
    guard let bytes = stream.credentials.pskKeys[name] else {
        stream.noteRefusal("unknown or disallowed PSK username \"\(name)\"")
        return -1
    }
    guard let memory = cgnutls_malloc(bytes.count) else { return -1 }
    bytes.withUnsafeBytes { memory.copyMemory(from: $0.baseAddress!, byteCount: bytes.count) }
    key.pointee = gnutls_datum_t(data: memory.assumingMemoryBound(to: UInt8.self), size: UInt32(bytes.count))
    return 0
}

private func gnutlsCheck(_ rc: Int32, _ what: String) throws(TLSSetupError) {
    if rc < 0 { throw .gnutls(what: what, message: String(cString: gnutls_strerror(rc))) }
}

private func fileExists(_ path: String) -> Bool {
    var info = stat()
    return stat(path, &info) == 0
}

private func checkReadable(_ path: String) throws(TLSSetupError) {
    var info = stat()
    guard stat(path, &info) == 0 else {
        if errno == ENOENT { throw .missingFile(path: path) }
        throw .unreadableFile(path: path, reason: String(cString: strerror(errno)))
    }
    guard info.st_mode & S_IFMT == S_IFREG else { throw .unreadableFile(path: path, reason: "not a regular file") }
    let fd = open(path, O_RDONLY | O_CLOEXEC)
    guard fd >= 0 else { throw .unreadableFile(path: path, reason: String(cString: strerror(errno))) }
    close(fd)
}

private func looseModeWarning(_ path: String) -> String? {
    var info = stat()
    guard stat(path, &info) == 0, info.st_mode & 0o044 != 0 else { return nil }
    let mode = String(info.st_mode & 0o777, radix: 8)
    return "TLS: \(path) holds a secret key but group or others may read it (mode \(mode)); chmod 600 it"
}

private func readTextFile(_ path: String) throws(TLSSetupError) -> String {
    do {
        return String(decoding: try SystemCall.readSmallFile(path, limit: 1 << 20), as: UTF8.self)
    } catch {
        switch error.reason {
        case .cannotOpen, .cannotRead: throw .unreadableFile(path: path, reason: error.systemMessage)
        case .tooLarge: throw .badFile(path: path, reason: "larger than 1 MiB")
        }
    }
}
