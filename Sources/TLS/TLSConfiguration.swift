// TLSConfiguration: what the operator asked for, as plain values. Loading files and building GnuTLS
// objects is TLSCredentials' job; this type only names things and checks that they fit together.
//
// File layout is qemu's and nbdkit's, so existing credentials work unchanged: a directory holding
// `ca-cert.pem`, `server-cert.pem`, `server-key.pem` and optionally `ca-crl.pem`; a PSK file as
// psktool writes it (`username:hexkey` per line).

/// Server-side TLS settings.
public struct TLSConfiguration: Sendable, Equatable {
    /// Default GnuTLS priority: GnuTLS's NORMAL suites, TLS 1.3 and 1.2 only. On a CPU with AES
    /// instructions the server's order decides and CHACHA20-POLY1305 comes last. Why: a TLS 1.3 PSK
    /// suite must use the PSK's hash, SHA-256 for psktool keys, which rules out AES-256-GCM-SHA384;
    /// the next suite in the client's NORMAL order is CHACHA20-POLY1305, which GnuTLS runs at a tenth
    /// of AES-128-GCM's speed where AES-NI exists (`gnutls-cli --benchmark-ciphers`: 0.41 vs 4.12
    /// GB/s), so every PSK connection paid ~3.5 s of server CPU per GiB instead of ~0.8. X.509
    /// connections keep AES-256-GCM, NORMAL's first choice.
    public static let defaultPriority = defaultPriority(aesInstructions: CPUFeatures.hasAESInstructions)

    /// The default priority for a machine with or without AES instructions (without them GnuTLS's
    /// NORMAL order, which already favours CHACHA20 there, is left alone).
    public static func defaultPriority(aesInstructions: Bool) -> String {
        let versions = "NORMAL:-VERS-ALL:+VERS-TLS1.3:+VERS-TLS1.2"
        return aesInstructions ? versions + ":%SERVER_PRECEDENCE:-CHACHA20-POLY1305:+CHACHA20-POLY1305" : versions
    }
    /// Appended when PSK credentials are loaded: NORMAL leaves the PSK key exchanges out.
    public static let pskKeyExchanges = ":+ECDHE-PSK:+DHE-PSK:+PSK"

    /// Directory with ca-cert.pem, server-cert.pem, server-key.pem and optionally ca-crl.pem.
    public var certificateDirectory: String?
    /// A psktool file (`username:hexkey` lines).
    public var pskFile: String?
    /// Require a client certificate signed by the CA in the certificate directory.
    public var verifyPeer = false
    /// If set, the distinguished names (RFC 4514, as `gnutls_x509_crt_get_dn3` prints them) of the
    /// client certificates that may connect. Needs `verifyPeer`.
    public var allowedClientDNs: [String]?
    /// If set, the PSK usernames that may connect (the file may hold more).
    public var allowedPSKUsernames: [String]?
    /// GnuTLS priority string; PSK key exchanges are appended when a PSK file is set.
    public var priority = TLSConfiguration.defaultPriority

    public init(certificateDirectory: String? = nil, pskFile: String? = nil, verifyPeer: Bool = false,
                allowedClientDNs: [String]? = nil, allowedPSKUsernames: [String]? = nil,
                priority: String = TLSConfiguration.defaultPriority) {
        self.certificateDirectory = certificateDirectory
        self.pskFile = pskFile
        self.verifyPeer = verifyPeer
        self.allowedClientDNs = allowedClientDNs
        self.allowedPSKUsernames = allowedPSKUsernames
        self.priority = priority
    }

    /// The files of the X.509 layout, by role.
    public enum X509File: String, CaseIterable, Sendable {
        case caCertificate = "ca-cert.pem"
        case serverCertificate = "server-cert.pem"
        case serverKey = "server-key.pem"
        case caRevocationList = "ca-crl.pem"
    }

    /// The path of one file of the X.509 layout, or nil without a certificate directory.
    public func path(of file: X509File) -> String? {
        guard let directory = certificateDirectory else { return nil }
        return directory.hasSuffix("/") ? directory + file.rawValue : directory + "/" + file.rawValue
    }

    /// The priority string handed to GnuTLS.
    public var effectivePriority: String {
        pskFile == nil ? priority : priority + Self.pskKeyExchanges
    }

    /// Settings that cannot work together, as messages for the operator (empty if fine).
    public func problems() -> [String] {
        var problems: [String] = []
        if certificateDirectory == nil && pskFile == nil {
            problems.append("TLS needs X.509 certificates or a PSK file")
        }
        if verifyPeer && certificateDirectory == nil {
            problems.append("verifying client certificates needs a certificate directory with ca-cert.pem")
        }
        if allowedClientDNs != nil && !verifyPeer {
            problems.append("an allowed-DN list needs client certificate verification (verify-peer)")
        }
        if allowedPSKUsernames != nil && pskFile == nil {
            problems.append("an allowed PSK username list needs a PSK file")
        }
        if priority.isEmpty { problems.append("the TLS priority string is empty") }
        return problems
    }
}
