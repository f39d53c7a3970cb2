// The server side of the TLS tests: a listener whose accepted sockets are wrapped in TLSStream and
// echo everything back, counting every event.

import Glibc
import TLS
import UVCore

final class TLSEchoServer: ListenerDelegate, TLSStreamDelegate {
    let credentials: TLSCredentials
    var accepted = 0
    var acceptLimit = 1
    var streams: [TLSStream] = []
    var handshakes = 0
    var failures: [TLSError] = []
    var eofs = 0
    var readErrors = 0
    var closed = 0
    var bytesRead = 0
    var pendingWrites = 0
    var finishedWrites = 0
    var writeErrors = 0
    /// What the completed sessions negotiated: description, client DN, PSK username.
    var sessions: [(description: String, dn: String?, psk: String?, cipher: String?, version: String?)] = []
    /// Written in the clear on the socket before TLSStream takes over (the STARTTLS reply's place).
    var plaintextGreeting: [UInt8]?
    var greetingCompletions = 0
    /// Like Connection's handshake writes: bit 63 set, so it must not be mistaken for the TLS stream's own.
    let greetingContext: UInt64 = 1 << 63 | 42
    /// Closes a stream whose handshake has not completed after this long (the caller's timer).
    var handshakeTimeoutMilliseconds: UInt64?
    var handshakeTimeouts = 0
    private var timers: [LoopTimer] = []
    private let loop: EventLoop
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 << 10, alignment: 16)
    /// The greeting must outlive its (possibly pending) write.
    private var greetingStorage: UnsafeMutableRawBufferPointer?

    init(loop: EventLoop, credentials: TLSCredentials) {
        self.loop = loop
        self.credentials = credentials
    }

    deinit {
        buffer.deallocate()
        greetingStorage?.deallocate()
    }

    func listener(_ listener: Listener, didAccept socket: SocketStream) {
        accepted += 1
        if accepted == acceptLimit { listener.close() }
        socket.setNoDelay(true)
        if let greeting = plaintextGreeting {
            let storage = UnsafeMutableRawBufferPointer.allocate(byteCount: greeting.count, alignment: 1)
            storage.copyBytes(from: greeting)
            greetingStorage = storage
            // Coalescing makes the greeting complete through didFinishWrite, i.e. after the takeover.
            socket.coalesceWrites()
            let outcome = withUnsafeTemporaryAllocation(of: UnsafeRawBufferPointer.self, capacity: 1) { list in
                list[0] = UnsafeRawBufferPointer(storage)
                return socket.write(UnsafeBufferPointer(list), context: greetingContext)
            }
            if case .failed = outcome { writeErrors += 1 }
        }
        do {
            let tls = try TLSStream(wrapping: socket, credentials: credentials, delegate: self)
            streams.append(tls)
            if let timeout = handshakeTimeoutMilliseconds {
                let timer = LoopTimer(loop: loop)
                timers.append(timer)
                timer.start(afterMilliseconds: timeout) { [unowned self] in
                    if !tls.handshakeCompleted {
                        self.handshakeTimeouts += 1
                        tls.close()
                    }
                    timer.close()
                }
            }
        } catch {
            failures.append(error)
            socket.close()
        }
    }

    func listener(_ listener: Listener, didFailToAcceptWith error: UVError) {
        readErrors += 1
    }

    func tlsStreamDidCompleteHandshake(_ stream: TLSStream) {
        handshakes += 1
        sessions.append((stream.sessionDescription ?? "", stream.peerCertificateDN, stream.pskUsername, stream.cipher,
                         stream.protocolVersion))
        stream.startReading()
    }

    func tlsStream(_ stream: TLSStream, didFail error: TLSError) {
        failures.append(error)
        stream.close()
    }

    /// If set, read buffers cycle through these sizes (as Connection hands out exactly what it is missing).
    var readSizes: [Int] = []
    private var nextReadSize = 0

    func streamWantsReadBuffer(_ stream: any ByteStream) -> UnsafeMutableRawBufferPointer {
        guard !readSizes.isEmpty else { return buffer }
        let size = readSizes[nextReadSize % readSizes.count]
        nextReadSize += 1
        return UnsafeMutableRawBufferPointer(rebasing: buffer[0..<size])
    }

    func stream(_ stream: any ByteStream, didRead count: Int) {
        bytesRead += count
        let outcome = withUnsafeTemporaryAllocation(of: UnsafeRawBufferPointer.self, capacity: 1) { list in
            list[0] = UnsafeRawBufferPointer(rebasing: buffer[0..<count])
            return stream.write(UnsafeBufferPointer(list), context: UInt64(count))
        }
        switch outcome {
        case .completed: break
        case .pending:
            // Back-pressure: read no more until the peer has taken this.
            pendingWrites += 1
            stream.stopReading()
        case .failed:
            writeErrors += 1
            stream.close()
        }
    }

    func stream(_ stream: any ByteStream, didFailReadingWith error: UVError) {
        if error == .eof { eofs += 1 } else { readErrors += 1 }
        stream.shutdownAndClose()
    }

    func stream(_ stream: any ByteStream, didFinishWrite context: UInt64, error: UVError?) {
        if error != nil { writeErrors += 1 }
        if context == greetingContext {
            greetingCompletions += 1
            return
        }
        finishedWrites += 1
        stream.startReading()
    }

    func streamDidClose(_ stream: any ByteStream) {
        closed += 1
    }
}
