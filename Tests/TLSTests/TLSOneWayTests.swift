// One-way transfers through TLSStream: the server only decrypts (sink) or only encrypts (source), so
// a profiler can attribute instructions to one direction. Run small by default; for the callgrind
// measurement set TLS_ONE_WAY_MIB (e.g. 64) and run under valgrind --tool=callgrind.

import Glibc
import Testing
import TLS
import UVCore

private var credentials: TestCredentials { TestCredentials.shared }

private var oneWayMiB: Int {
    getenv("TLS_ONE_WAY_MIB").flatMap { Int(String(cString: $0)) } ?? 2
}

/// Sinks everything a client sends, or sends `sourceBytes` in 1 MiB writes as fast as the socket takes them.
final class OneWayServer: ListenerDelegate, TLSStreamDelegate {
    let credentials: TLSCredentials
    let sourceBytes: Int
    var bytesRead = 0
    var bytesSent = 0
    var failures: [TLSError] = []
    var closed = 0
    var cipher: String?
    private var stream: TLSStream?
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)

    init(credentials: TLSCredentials, sourceBytes: Int) {
        self.credentials = credentials
        self.sourceBytes = sourceBytes
        for i in 0..<buffer.count { buffer[i] = UInt8(truncatingIfNeeded: i &* 7) }
    }

    deinit { buffer.deallocate() }

    func listener(_ listener: Listener, didAccept socket: SocketStream) {
        listener.close()
        socket.setNoDelay(true)
        stream = try? TLSStream(wrapping: socket, credentials: credentials, delegate: self)
    }

    func listener(_ listener: Listener, didFailToAcceptWith error: UVError) {}

    func tlsStreamDidCompleteHandshake(_ stream: TLSStream) {
        cipher = stream.sessionDescription
        stream.startReading()
        if sourceBytes > 0 { sendMore(stream) }
    }

    /// Writes until one is pending (then didFinishWrite continues) or all is sent.
    private func sendMore(_ stream: any ByteStream) {
        while bytesSent < sourceBytes {
            let size = min(buffer.count, sourceBytes - bytesSent)
            bytesSent += size
            let outcome = withUnsafeTemporaryAllocation(of: UnsafeRawBufferPointer.self, capacity: 1) { list in
                list[0] = UnsafeRawBufferPointer(rebasing: buffer[0..<size])
                return stream.write(UnsafeBufferPointer(list), context: 1)
            }
            switch outcome {
            case .completed: continue
            case .pending: return
            case .failed: stream.close(); return
            }
        }
        stream.shutdownAndClose()
    }

    func tlsStream(_ stream: TLSStream, didFail error: TLSError) {
        failures.append(error)
        stream.close()
    }

    func streamWantsReadBuffer(_ stream: any ByteStream) -> UnsafeMutableRawBufferPointer { buffer }
    func stream(_ stream: any ByteStream, didRead count: Int) { bytesRead += count }
    func stream(_ stream: any ByteStream, didFailReadingWith error: UVError) {
        if sourceBytes == 0 { stream.shutdownAndClose() }
    }
    func stream(_ stream: any ByteStream, didFinishWrite context: UInt64, error: UVError?) {
        if error == nil { sendMore(stream) }
    }
    func streamDidClose(_ stream: any ByteStream) { closed += 1 }
}

private func runOneWay(toServer: Bool) throws -> OneWayServer {
    let bytes = oneWayMiB << 20
    let loop = try EventLoop()
    let server = OneWayServer(credentials: try TLSCredentials(TLSConfiguration(certificateDirectory: credentials.directory)),
                              sourceBytes: toServer ? 0 : bytes)
    let listener = try Listener.tcp(loop: loop, host: "127.0.0.1", port: 0)
    let port = listener.localPort!
    listener.delegate = server
    try listener.start()
    let received = Shared(0)
    let thread = spawnThread {
        let client = TLSTestClient(fd: connectTCP(port: port), ca: credentials.ca)
        guard client.handshake() == 0 else { return }
        if toServer {
            let chunk = [UInt8](repeating: 0x5a, count: 1 << 20)
            for _ in 0..<(bytes >> 20) { _ = chunk.withUnsafeBytes { client.send($0) } }
            client.bye()
            _ = client.receiveEnd()
        } else {
            var total = 0
            while true {
                let got = client.receive(count: 1 << 20).count
                if got == 0 { break }
                total += got
            }
            received.value = total
        }
    }
    runLoop(loop, timeoutSeconds: 3600)
    joinThread(thread)
    try loop.close()
    #expect(server.failures.isEmpty, "\(server.failures)")
    #expect(server.closed == 1)
    if toServer { #expect(server.bytesRead == bytes) } else { #expect(received.value == bytes) }
    print("one-way \(toServer ? "to" : "from") server, \(oneWayMiB) MiB: \(server.cipher ?? "no session")")
    return server
}

@Suite(.serialized) struct TLSOneWayTests {
    @Test func decryptsAStreamFromTheClient() throws { _ = try runOneWay(toServer: true) }
    @Test func encryptsAStreamToTheClient() throws { _ = try runOneWay(toServer: false) }
}
