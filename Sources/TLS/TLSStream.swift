// TLSStream: a server-side TLS session over a SocketStream, driven by the loop, with the ByteStream
// surface a connection already uses.
//
// Taking over. `init(wrapping:)` makes the TLSStream the socket's delegate, so a connection can start
// TLS in the middle (after STARTTLS): every byte the socket reads from then on is ciphertext. The
// socket has no read buffer of its own, so plaintext that arrived before the switch can only be in
// the caller's buffers, and the caller drops it. Writes the caller made on the socket before the
// switch still complete through the socket; their didFinishWrite reaches this stream's delegate with
// the caller's context unchanged. This stream tags its own socket writes with the top two bits 01, so
// caller contexts must not use that pattern (Connection's are small slot numbers, or bit 63 set).
//
// Memory transport. GnuTLS's pull function takes ciphertext from `input`, filled by the socket's
// reads; when it is empty, pull says EAGAIN and GnuTLS returns GNUTLS_E_AGAIN ("wait for more
// bytes"), so nothing ever blocks. The push function copies records into a Segment that goes to the
// socket as one write after each GnuTLS call (see CiphertextSegments.swift).
//
// Reads. Plaintext is decrypted by gnutls_record_recv straight into the buffer the delegate's
// streamWantsReadBuffer returns (GnuTLS copies the decrypted record out of its own buffer; there is
// no second copy here). A buffer is asked for only when there is something to decrypt.
// stopReading stops the socket too, so ciphertext backs up in the kernel, not here.
//
// Writes. Each `write` becomes full-size records: pieces smaller than a record are packed through a
// staging buffer (a 16-byte reply header and its payload share a record), record-sized runs go to
// GnuTLS from the caller's memory. The ciphertext of one call is one socket write; `.completed`,
// `.pending` + didFinishWrite and `.failed` mean what they mean for SocketStream, and the caller's
// plaintext may be reused as soon as `write` returns.
//
// Events. Handshake success and any TLS failure (handshake or record) are delegate events; after a
// failure the stream stops reading and the owner closes it. A peer's close_notify, or a plain close of
// the TCP connection at a record boundary, is `didFailReadingWith(.eof)`. The handshake has no timer
// here: the owner's timer closes a stream that takes too long.

import CGnuTLS
import Glibc
import UVCore

/// Receives a TLSStream's events (the ByteStream ones plus the handshake's). Loop thread only.
public protocol TLSStreamDelegate: ByteStreamDelegate {
    /// The handshake finished and the peer passed every check; reads and writes may start.
    func tlsStreamDidCompleteHandshake(_ stream: TLSStream)
    /// The session failed (handshake refused, bad record, alert). Reading has stopped; close the stream.
    func tlsStream(_ stream: TLSStream, didFail error: TLSError)
}

/// Socket write contexts whose top two bits are 01 are the stream's own segments; others are the caller's.
private let segmentTag: UInt64 = 1 << 62
private let tagMask: UInt64 = 3 << 62

/// Generous bound on what a record adds to its plaintext (TLS 1.2 CBC: 5 header + 16 IV + 48 MAC + 256 padding).
private let perRecordOverhead = 325

/// Ciphertext read ahead of GnuTLS. Several records, so a large transfer takes few socket reads.
private let inputCapacity = 128 << 10

private let pullCiphertext: gnutls_pull_func = { pointer, data, size in
    Unmanaged<TLSStream>.fromOpaque(pointer!)._withUnsafeGuaranteedRef { $0.pull(into: data!, size: size) }
}

private let pushCiphertext: gnutls_vec_push_func = { pointer, vectors, count in
    Unmanaged<TLSStream>.fromOpaque(pointer!)._withUnsafeGuaranteedRef { $0.push(vectors!, count: Int(count)) }
}

/// Only reached if GnuTLS wanted to wait, which it does not with timeouts off; never waits.
private let pollCiphertext: gnutls_pull_timeout_func = { pointer, _ in
    Unmanaged<TLSStream>.fromOpaque(pointer!)._withUnsafeGuaranteedRef { $0.hasInput ? 1 : 0 }
}

private let verifyPeer: @convention(c) (gnutls_session_t?) -> Int32 = { session in
    guard let session, let stream = TLSStream.owning(session) else { return GNUTLS_E_CERTIFICATE_ERROR }
    return stream.verifyPeerCertificate()
}

/// A server TLS session over a SocketStream it has taken over. Confined to the loop thread.
public final class TLSStream {
    private enum State {
        /// Waiting for handshake messages; the socket reads whatever the caller does.
        case handshaking
        /// Records flow both ways.
        case open
        /// End of stream delivered (close_notify or TCP close); writes still work until closed.
        case readEnded
        /// A TLS failure was reported; only close remains.
        case failed
        /// The socket closed.
        case closed
    }

    /// The socket underneath; the TLSStream is its delegate until it closes.
    public let socket: SocketStream
    public let credentials: TLSCredentials
    /// Receives reads, write completions, handshake events and the close. Held strongly until
    /// `streamDidClose` (the same cycle-until-close rule as SocketStream).
    @exclusivity(unchecked) public var delegate: (any TLSStreamDelegate)?

    private let session: gnutls_session_t
    @exclusivity(unchecked) private var state = State.handshaking
    @exclusivity(unchecked) private var delegateReading = false
    @exclusivity(unchecked) private var peerClosed = false
    @exclusivity(unchecked) private var processing = false
    @exclusivity(unchecked) private var drainScheduled = false
    /// Why the peer was refused, set by the verify or PSK callbacks for the error report.
    private var refusal: String?

    private let input: UnsafeMutableRawPointer
    @exclusivity(unchecked) private var inputStart = 0
    @exclusivity(unchecked) private var inputEnd = 0

    @exclusivity(unchecked) private var output = Segment()
    @exclusivity(unchecked) private var segments = SegmentPool()
    private let staging: UnsafeMutableRawPointer
    @exclusivity(unchecked) private var recordSize = 16384
    private let stagingCapacity = 16384

    /// Starts a server session on `socket`, taking it over as its delegate, and starts reading for the
    /// ClientHello. Plaintext the caller read before this call is the caller's to discard.
    public init(wrapping socket: SocketStream, credentials: TLSCredentials, delegate: any TLSStreamDelegate) throws(TLSError) {
        self.socket = socket
        self.credentials = credentials
        self.delegate = delegate
        session = try credentials.makeSession()
        input = .allocate(byteCount: inputCapacity, alignment: 16)
        staging = .allocate(byteCount: stagingCapacity, alignment: 16)
        let me = Unmanaged.passUnretained(self).toOpaque()
        gnutls_session_set_ptr(session, me)
        gnutls_transport_set_ptr(session, me)
        gnutls_transport_set_pull_function(session, pullCiphertext)
        gnutls_transport_set_vec_push_function(session, pushCiphertext)
        gnutls_transport_set_pull_timeout_function(session, pollCiphertext)
        if credentials.configuration.verifyPeer { gnutls_session_set_verify_function(session, verifyPeer) }
        socket.delegate = self
        socket.startReading()
    }

    deinit {
        gnutls_deinit(session)
        input.deallocate()
        staging.deallocate()
        output.free()
        segments.freeAll()
    }

    static func owning(_ session: gnutls_session_t) -> TLSStream? {
        gnutls_session_get_ptr(session).map { Unmanaged<TLSStream>.fromOpaque($0).takeUnretainedValue() }
    }

    // MARK: What was negotiated

    /// True once the handshake completed (and stays true after a later failure or close).
    public private(set) var handshakeCompleted = false

    /// GnuTLS's one-line summary, e.g. "(TLS1.3)-(ECDHE-SECP256R1)-(RSA-PSS-RSAE-SHA256)-(AES-256-GCM)".
    public var sessionDescription: String? {
        guard handshakeCompleted, let text = gnutls_session_get_desc(session) else { return nil }
        defer { cgnutls_free(text) }
        return String(cString: text)
    }

    /// "TLS1.3", "TLS1.2".
    public var protocolVersion: String? {
        guard handshakeCompleted else { return nil }
        return gnutls_protocol_get_name(gnutls_protocol_get_version(session)).map { String(cString: $0) }
    }

    /// "AES-256-GCM", ...
    public var cipher: String? {
        guard handshakeCompleted else { return nil }
        return gnutls_cipher_get_name(gnutls_cipher_get(session)).map { String(cString: $0) }
    }

    /// The PSK username the client logged in with, if PSK was used.
    public var pskUsername: String? {
        guard handshakeCompleted, gnutls_auth_get_type(session) == GNUTLS_CRD_PSK,
              let name = gnutls_psk_server_get_username(session) else { return nil }
        return String(cString: name)
    }

    /// The distinguished name of the client's certificate, if it sent one.
    public var peerCertificateDN: String? { peerDN() }

    // MARK: Peer checks (called by GnuTLS during the handshake)

    func noteRefusal(_ reason: String) {
        if refusal == nil { refusal = reason }
    }

    /// CA signature, validity dates, revocation, then the DN list. Non-zero fails the handshake.
    fileprivate func verifyPeerCertificate() -> Int32 {
        var status: UInt32 = 0
        let rc = gnutls_certificate_verify_peers2(session, &status)
        if rc < 0 {
            noteRefusal("client certificate not verified: \(String(cString: gnutls_strerror(rc)))")
            return GNUTLS_E_CERTIFICATE_ERROR
        }
        if status != 0 {
            var text = gnutls_datum_t()
            var reason = "status \(status)"
            if gnutls_certificate_verification_status_print(status, GNUTLS_CRT_X509, &text, 0) == 0, let data = text.data {
                reason = String(cString: UnsafeRawPointer(data).assumingMemoryBound(to: CChar.self))
                cgnutls_free(data)
            }
            noteRefusal("client certificate refused: \(reason)")
            return GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR
        }
        if let allowed = credentials.configuration.allowedClientDNs {
            let dn = peerDN() ?? "(none)"
            if !allowed.contains(dn) {
                noteRefusal("client DN \"\(dn)\" is not in the allowed list")
                return GNUTLS_E_CERTIFICATE_ERROR
            }
        }
        return 0
    }

    private func peerDN() -> String? {
        var count: UInt32 = 0
        guard let list = gnutls_certificate_get_peers(session, &count), count > 0 else { return nil }
        var certificate: gnutls_x509_crt_t?
        guard gnutls_x509_crt_init(&certificate) == 0 else { return nil }
        defer { gnutls_x509_crt_deinit(certificate) }
        guard gnutls_x509_crt_import(certificate, list, GNUTLS_X509_FMT_DER) == 0 else { return nil }
        var dn = gnutls_datum_t()
        guard gnutls_x509_crt_get_dn3(certificate, &dn, 0) == 0, let data = dn.data else { return nil }
        defer { cgnutls_free(data) }
        return String(decoding: UnsafeBufferPointer(start: data, count: Int(dn.size)), as: UTF8.self)
    }

    // MARK: Transport callbacks

    fileprivate var hasInput: Bool { inputEnd > inputStart || peerClosed }

    /// No room for another socket read, even after moving the unread bytes to the front.
    private var inputIsFull: Bool { inputEnd - inputStart == inputCapacity }

    fileprivate func pull(into destination: UnsafeMutableRawPointer, size: Int) -> Int {
        let available = inputEnd - inputStart
        if available == 0 {
            if peerClosed { return 0 }
            gnutls_transport_set_errno(session, cgnutls_eagain())
            return -1
        }
        let count = min(available, size)
        destination.copyMemory(from: input + inputStart, byteCount: count)
        inputStart += count
        if inputStart == inputEnd {
            inputStart = 0
            inputEnd = 0
        }
        return count
    }

    fileprivate func push(_ vectors: UnsafePointer<giovec_t>, count: Int) -> Int {
        var total = 0
        for i in 0..<count where vectors[i].iov_len > 0 {
            output.append(vectors[i].iov_base, vectors[i].iov_len)
            total += vectors[i].iov_len
        }
        return total
    }

    /// Hands the ciphertext GnuTLS just pushed to the socket as one write.
    @discardableResult
    private func flushOutput(callerContext: UInt64? = nil) -> WriteOutcome {
        guard output.count > 0 else { return .completed }
        let slot = segments.park(InFlightSegment(segment: output, callerContext: callerContext ?? 0,
                                                 reportsToCaller: callerContext != nil))
        let bytes = UnsafeRawBufferPointer(start: output.bytes, count: output.count)
        output = segments.take()
        let outcome = withUnsafeTemporaryAllocation(of: UnsafeRawBufferPointer.self, capacity: 1) { list in
            list[0] = bytes
            return socket.write(UnsafeBufferPointer(list), context: segmentTag | UInt64(slot))
        }
        switch outcome {
        case .completed, .failed: _ = segments.release(slot)
        case .pending: break
        }
        return outcome
    }

    // MARK: Receiving

    /// Runs GnuTLS over whatever input there is: the handshake, then records into the delegate's
    /// buffers while it reads. Not reentrant: a delegate call that starts reading again only lets the
    /// running loop go on.
    private func process() {
        guard !processing else { return }
        processing = true
        defer { processing = false }
        while true {
            switch state {
            case .handshaking:
                guard hasInput, !socket.isClosing else { return }
                let rc = gnutls_handshake(session)
                flushOutput()
                if rc == GNUTLS_E_AGAIN || rc == GNUTLS_E_INTERRUPTED {
                    if !peerClosed { return }
                    fail(GNUTLS_E_PREMATURE_TERMINATION)
                    return
                }
                if rc < 0 {
                    if gnutls_error_is_fatal(rc) == 0 { continue }
                    fail(rc)
                    return
                }
                state = .open
                handshakeCompleted = true
                recordSize = min(Int(gnutls_record_get_max_size(session)), stagingCapacity)
                if !delegateReading { socket.stopReading() }
                delegate?.tlsStreamDidCompleteHandshake(self)
            case .open:
                // A closing stream delivers nothing more, as a closing SocketStream does.
                guard delegateReading, !socket.isClosing, hasInput || gnutls_record_check_pending(session) > 0,
                      let delegate else { return }
                let buffer = delegate.streamWantsReadBuffer(self)
                guard buffer.count > 0 else {
                    // As SocketStream reports an empty read buffer (libuv's ENOBUFS).
                    state = .readEnded
                    socket.stopReading()
                    delegate.stream(self, didFailReadingWith: .noBuffers)
                    return
                }
                let count = gnutls_record_recv(session, buffer.baseAddress, buffer.count)
                flushOutput()
                if count > 0 {
                    delegate.stream(self, didRead: count)
                } else if count == 0 || count == GNUTLS_E_PREMATURE_TERMINATION {
                    // close_notify, or the TCP connection closed without one: the NBD framing above
                    // notices truncation, so both are a plain end of stream.
                    state = .readEnded
                    socket.stopReading()
                    delegate.stream(self, didFailReadingWith: .eof)
                    return
                } else if count == GNUTLS_E_AGAIN || count == GNUTLS_E_INTERRUPTED {
                    if !peerClosed { return }
                    fail(GNUTLS_E_PREMATURE_TERMINATION)
                    return
                } else if gnutls_error_is_fatal(Int32(count)) != 0 {
                    fail(Int32(count))
                    return
                }
                // Non-fatal (a warning alert, a renegotiation request we ignore): go on.
            case .readEnded, .failed, .closed:
                return
            }
        }
    }

    /// Sends the alert the error calls for (unless the peer ended it with one), stops reading, reports.
    private func fail(_ code: Int32) {
        let duringHandshake = state == .handshaking
        state = .failed
        socket.stopReading()
        if code != GNUTLS_E_FATAL_ALERT_RECEIVED && code != GNUTLS_E_PREMATURE_TERMINATION && !socket.isClosing {
            _ = gnutls_alert_send_appropriate(session, code)
            flushOutput()
        }
        delegate?.tlsStream(self, didFail: TLSError(code: code, session: session, refusal: refusal,
                                                    duringHandshake: duringHandshake))
    }

    // MARK: Sending

    /// Encrypts the buffers into records and writes them (see the file comment). Before the handshake
    /// completes, fails with ENOTCONN; after a failure or close, with ECANCELED.
    public func write(_ buffers: UnsafeBufferPointer<UnsafeRawBufferPointer>, context: UInt64) -> WriteOutcome {
        switch state {
        case .handshaking: return .failed(UVError(errno: ENOTCONN))
        case .failed, .closed: return .failed(.canceled)
        case .open, .readEnded: break
        }
        if socket.isClosing { return .failed(.canceled) }
        var total = 0
        for buffer in buffers { total += buffer.count }
        // Ciphertext is the plaintext plus at most a header, tag and padding per record.
        output.reserve(total + (total / recordSize + 2) * perRecordOverhead)
        var staged = 0
        for buffer in buffers where buffer.count > 0 {
            let base = buffer.baseAddress!
            var offset = 0
            while offset < buffer.count {
                let remaining = buffer.count - offset
                if staged == 0 && remaining >= recordSize {
                    let sent = gnutls_record_send(session, base + offset, remaining)
                    if sent <= 0 { return writeFailed(Int32(sent)) }
                    offset += sent
                } else {
                    let count = min(remaining, recordSize - staged)
                    (staging + staged).copyMemory(from: base + offset, byteCount: count)
                    staged += count
                    offset += count
                    if staged == recordSize {
                        if let failure = sendStaged(staged) { return failure }
                        staged = 0
                    }
                }
            }
        }
        if staged > 0, let failure = sendStaged(staged) { return failure }
        return flushOutput(callerContext: context)
    }

    private func sendStaged(_ count: Int) -> WriteOutcome? {
        var offset = 0
        while offset < count {
            let sent = gnutls_record_send(session, staging + offset, count - offset)
            if sent <= 0 { return writeFailed(Int32(sent)) }
            offset += sent
        }
        return nil
    }

    /// GnuTLS refused to encrypt (the session is broken): drop what was pushed, report EPROTO.
    private func writeFailed(_ code: Int32) -> WriteOutcome {
        output.count = 0
        if state == .open || state == .readEnded {
            state = .failed
            socket.stopReading()
            delegate?.tlsStream(self, didFail: TLSError(code: code, session: session, refusal: nil, duringHandshake: false))
        }
        return .failed(UVError(errno: EPROTO))
    }
}

extension TLSStream: ByteStream {
    public var peerDescription: String { socket.peerDescription }

    /// Starts delivering plaintext. Plaintext already decrypted or ciphertext already read is
    /// delivered at the end of this loop turn, never from inside this call.
    public func startReading() {
        delegateReading = true
        guard state == .open || state == .handshaking else { return }
        // A full input buffer would give libuv an empty read buffer (ENOBUFS): the drain restarts the
        // socket once it has made room.
        if !inputIsFull { socket.startReading() }
        if state == .open && (hasInput || gnutls_record_check_pending(session) > 0) && !drainScheduled {
            drainScheduled = true
            socket.eventLoop.runAtTurnEnd(self)
        }
    }

    /// Stops delivering plaintext; the socket stops reading too (the handshake keeps reading).
    public func stopReading() {
        delegateReading = false
        if state == .open { socket.stopReading() }
    }

    public func coalesceWrites() { socket.coalesceWrites() }

    /// Ciphertext not yet taken by the kernel.
    public var pendingWriteBytes: Int { socket.pendingWriteBytes }

    /// Ciphertext bytes the kernel has taken (moves whenever the peer drains anything).
    public var bytesWritten: UInt64 { socket.bytesWritten }

    /// Sends close_notify (after an open session), lets the writes drain, then closes.
    public func shutdownAndClose() {
        if state == .open || state == .readEnded, !socket.isClosing {
            _ = gnutls_bye(session, GNUTLS_SHUT_WR)
            flushOutput()
        }
        socket.shutdownAndClose()
    }

    public func close() { socket.close() }

    public var isClosing: Bool { socket.isClosing }
}

extension TLSStream: TurnEndTask {
    public func runAtTurnEnd() {
        drainScheduled = false
        process()
        if state == .open && delegateReading && !inputIsFull { socket.startReading() }
    }
}

extension TLSStream: SocketStreamDelegate {
    public func streamWantsReadBuffer(_ stream: SocketStream) -> UnsafeMutableRawBufferPointer {
        if inputStart > 0 {
            (input).copyMemory(from: input + inputStart, byteCount: inputEnd - inputStart)
            inputEnd -= inputStart
            inputStart = 0
        }
        return UnsafeMutableRawBufferPointer(start: input + inputEnd, count: inputCapacity - inputEnd)
    }

    public func stream(_ stream: SocketStream, didRead count: Int) {
        inputEnd += count
        process()
        // Nobody is taking plaintext and the buffer is full: let the kernel hold the rest.
        if inputIsFull { socket.stopReading() }
    }

    public func stream(_ stream: SocketStream, didFailReadingWith error: UVError) {
        if error == .eof {
            peerClosed = true
            process()
            return
        }
        switch state {
        case .handshaking:
            refusal = "socket: \(error)"
            fail(GNUTLS_E_PULL_ERROR)
        case .open:
            state = .readEnded
            delegate?.stream(self, didFailReadingWith: error)
        case .readEnded, .failed, .closed:
            break
        }
    }

    public func stream(_ stream: SocketStream, didFinishWrite context: UInt64, error: UVError?) {
        guard context & tagMask == segmentTag else {
            // A write the caller made on the socket before the switch.
            delegate?.stream(self, didFinishWrite: context, error: error)
            return
        }
        let finished = segments.release(Int(context & ~tagMask))
        if finished.reportsToCaller {
            delegate?.stream(self, didFinishWrite: finished.callerContext, error: error)
        } else if let error, state == .handshaking {
            refusal = "socket: \(error)"
            fail(GNUTLS_E_PUSH_ERROR)
        }
    }

    public func streamDidClose(_ stream: SocketStream) {
        state = .closed
        let delegate = self.delegate
        self.delegate = nil
        delegate?.streamDidClose(self)
    }
}
