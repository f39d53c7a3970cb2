// The two error types of the TLS module: setup (startup, names the file) and session (a handshake or
// record that failed, with GnuTLS's message and the alert involved).

import CGnuTLS

/// Why TLS credentials could not be loaded. Every case names the file or setting at fault.
public enum TLSSetupError: Error, Equatable, CustomStringConvertible {
    case missingFile(path: String)
    case unreadableFile(path: String, reason: String)
    case badFile(path: String, reason: String)
    case badConfiguration(String)
    case gnutls(what: String, message: String)

    public var description: String {
        switch self {
        case .missingFile(let path): "TLS: \(path): file not found"
        case .unreadableFile(let path, let reason): "TLS: \(path): cannot read: \(reason)"
        case .badFile(let path, let reason): "TLS: \(path): \(reason)"
        case .badConfiguration(let message): "TLS: \(message)"
        case .gnutls(let what, let message): "TLS: \(what): \(message)"
        }
    }
}

/// A TLS session failed: during the handshake, or later on a record.
public struct TLSError: Error, Equatable, CustomStringConvertible {
    /// The GnuTLS error code (negative), or 0 for a policy refusal made by this module.
    public let code: Int32
    /// gnutls_strerror of `code`, or the policy reason.
    public let message: String
    /// The alert the peer sent, if that is what ended the session ("bad_record_mac", ...).
    public let receivedAlert: String?
    /// Why the peer's certificate or identity was refused, if it was.
    public let refusal: String?
    /// True if the failure happened before the handshake completed.
    public let duringHandshake: Bool

    public var description: String {
        var text = duringHandshake ? "TLS handshake failed: \(message)" : "TLS failed: \(message)"
        if let receivedAlert { text += " (peer sent alert \(receivedAlert))" }
        if let refusal { text += " (\(refusal))" }
        return text
    }

    init(code: Int32, session: gnutls_session_t?, refusal: String?, duringHandshake: Bool) {
        self.code = code
        self.message = String(cString: gnutls_strerror(code))
        if let session, code == GNUTLS_E_FATAL_ALERT_RECEIVED || code == GNUTLS_E_WARNING_ALERT_RECEIVED {
            receivedAlert = gnutls_alert_get_name(gnutls_alert_get(session)).map { String(cString: $0) }
        } else {
            receivedAlert = nil
        }
        self.refusal = refusal
        self.duringHandshake = duringHandshake
    }
}
