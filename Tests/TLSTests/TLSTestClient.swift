// A blocking GnuTLS client on a plain socket, for the client threads of the TLS tests.

import CGnuTLS
import Glibc

final class TLSTestClient: @unchecked Sendable {
    let fd: Int32
    let session: gnutls_session_t
    private var certificates: gnutls_certificate_credentials_t?
    private var psk: gnutls_psk_client_credentials_t?
    private let hostname = strdup("localhost")!

    /// `ca`: verify the server against this CA file (hostname "localhost"); `certificate`: present this
    /// client certificate; `psk`: log in as (username, hex key).
    init(fd: Int32, ca: String? = nil, certificate: (cert: String, key: String)? = nil, psk: (String, String)? = nil,
         priority: String = "NORMAL") {
        self.fd = fd
        var session: gnutls_session_t?
        precondition(gnutls_init(&session, UInt32(GNUTLS_CLIENT.rawValue)) == 0)
        self.session = session!
        var rc = gnutls_priority_set_direct(session, psk == nil ? priority : priority + ":+ECDHE-PSK:+DHE-PSK:+PSK", nil)
        precondition(rc == 0, "priority: \(String(cString: gnutls_strerror(rc)))")
        if ca != nil || certificate != nil || psk == nil {
            precondition(gnutls_certificate_allocate_credentials(&certificates) == 0)
            if let ca {
                precondition(gnutls_certificate_set_x509_trust_file(certificates, ca, GNUTLS_X509_FMT_PEM) > 0)
                // GnuTLS keeps the pointer, not a copy: it must outlive the session.
                gnutls_session_set_verify_cert(session, hostname, 0)
            }
            if let certificate {
                rc = gnutls_certificate_set_x509_key_file(certificates, certificate.cert, certificate.key, GNUTLS_X509_FMT_PEM)
                precondition(rc == 0, "client key: \(String(cString: gnutls_strerror(rc)))")
            }
            precondition(gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, UnsafeMutableRawPointer(certificates)) == 0)
        }
        if let (username, key) = psk {
            precondition(gnutls_psk_allocate_client_credentials(&self.psk) == 0)
            var keyText = Array(key.utf8)
            rc = keyText.withUnsafeMutableBufferPointer { text in
                var datum = gnutls_datum_t(data: text.baseAddress, size: UInt32(text.count))
                return gnutls_psk_set_client_credentials(self.psk, username, &datum, GNUTLS_PSK_KEY_HEX)
            }
            precondition(rc == 0)
            precondition(gnutls_credentials_set(session, GNUTLS_CRD_PSK, UnsafeMutableRawPointer(self.psk)) == 0)
        }
        gnutls_transport_set_int2(session, fd, fd)
        gnutls_handshake_set_timeout(session, 20_000)
    }

    deinit {
        gnutls_deinit(session)
        if let certificates { gnutls_certificate_free_credentials(certificates) }
        if let psk { gnutls_psk_free_client_credentials(psk) }
        close(fd)
        free(hostname)
    }

    /// 0, or the GnuTLS error that ended the handshake.
    func handshake() -> Int32 {
        while true {
            let rc = gnutls_handshake(session)
            if rc == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR {
                var text = gnutls_datum_t()
                let status = gnutls_session_get_verify_cert_status(session)
                if gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &text, 0) == 0, let data = text.data {
                    print("test client: server certificate refused: \(String(cString: UnsafeRawPointer(data).assumingMemoryBound(to: CChar.self)))")
                }
            }
            if rc == 0 || gnutls_error_is_fatal(rc) != 0 { return rc }
        }
    }

    var alertReceived: String? {
        gnutls_alert_get_name(gnutls_alert_get(session)).map { String(cString: $0) }
    }

    func send(_ bytes: UnsafeRawBufferPointer) -> Bool {
        var done = 0
        while done < bytes.count {
            let n = gnutls_record_send(session, bytes.baseAddress! + done, bytes.count - done)
            if n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED { continue }
            if n < 0 { return false }
            done += n
        }
        return true
    }

    /// Reads until `count` bytes arrived, the peer closed, or an error; returns what arrived.
    func receive(count: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var done = 0
        while done < count {
            let n = bytes.withUnsafeMutableBytes { gnutls_record_recv(session, $0.baseAddress! + done, count - done) }
            if n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED { continue }
            if n <= 0 { break }
            done += n
        }
        return Array(bytes[0..<done])
    }

    /// Reads one more record: 0 at close_notify, a negative GnuTLS error, or a byte count.
    func receiveEnd() -> Int {
        var byte: UInt8 = 0
        while true {
            let n = gnutls_record_recv(session, &byte, 1)
            if n == GNUTLS_E_AGAIN || n == GNUTLS_E_INTERRUPTED { continue }
            return n
        }
    }

    func bye() { _ = gnutls_bye(session, GNUTLS_SHUT_WR) }
}
