// tls-throughput: moves N MiB to a server and N MiB back through TLSStream (or a plain SocketStream),
// for instruction counts under callgrind. The client is a forked child process with a blocking GnuTLS
// session, so the parent's profile holds only the server: run
//   valgrind --tool=callgrind --callgrind-out-file=cg.%p.out tls-throughput DIR MIB [plain]
// and read the parent's file; (cost at N MiB - cost at 0 MiB) / N is the per-MiB cost of one MiB
// decrypted plus one MiB encrypted. DIR holds ca-cert.pem, server-cert.pem and server-key.pem.

import CGnuTLS
import Glibc
import TLS
import UVCore

let arguments = CommandLine.arguments
guard arguments.count >= 3, let mebibytes = Int(arguments[2]) else {
    print("usage: tls-throughput CERTIFICATE-DIR MIB [plain]")
    exit(2)
}
let directory = arguments[1]
let plain = arguments.count > 3 && arguments[3] == "plain"
let total = mebibytes << 20
let chunk = 1 << 20

/// Receives `total` bytes, then sends `total` bytes in 1 MiB writes, then closes.
final class Server: ListenerDelegate, TLSStreamDelegate, SocketStreamDelegate {
    let credentials: TLSCredentials?
    var stream: (any ByteStream)?
    var received = 0
    var sent = 0
    var sending = false
    var negotiated = "plain"
    var failed: String?
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: 1 << 20, alignment: 16)

    init(credentials: TLSCredentials?) {
        self.credentials = credentials
        buffer.initializeMemory(as: UInt8.self, repeating: 0x5a)
    }

    func listener(_ listener: Listener, didAccept socket: SocketStream) {
        listener.close()
        socket.setNoDelay(true)
        if let credentials {
            stream = try? TLSStream(wrapping: socket, credentials: credentials, delegate: self)
        } else {
            socket.delegate = self
            stream = socket
            socket.startReading()
            if total == 0 { socket.shutdownAndClose() }
        }
    }

    func listener(_ listener: Listener, didFailToAcceptWith error: UVError) {}

    func tlsStreamDidCompleteHandshake(_ stream: TLSStream) {
        negotiated = stream.sessionDescription ?? "?"
        stream.startReading()
        if total == 0 { stream.shutdownAndClose() }
    }

    func tlsStream(_ stream: TLSStream, didFail error: TLSError) {
        failed = "\(error)"
        stream.close()
    }

    private func received(_ count: Int, on stream: any ByteStream) {
        received += count
        if received == total && !sending {
            sending = true
            stream.stopReading()
            sendMore(on: stream)
        }
    }

    private func sendMore(on stream: any ByteStream) {
        while sent < total {
            let size = min(chunk, total - sent)
            sent += size
            let outcome = withUnsafeTemporaryAllocation(of: UnsafeRawBufferPointer.self, capacity: 1) { list in
                list[0] = UnsafeRawBufferPointer(rebasing: buffer[0..<size])
                return stream.write(UnsafeBufferPointer(list), context: 1)
            }
            switch outcome {
            case .completed: continue
            case .pending: return
            case .failed(let error): failed = "\(error)"; stream.close(); return
            }
        }
        stream.shutdownAndClose()
    }

    // ByteStreamDelegate (TLS)
    func streamWantsReadBuffer(_ stream: any ByteStream) -> UnsafeMutableRawBufferPointer { buffer }
    func stream(_ stream: any ByteStream, didRead count: Int) { received(count, on: stream) }
    func stream(_ stream: any ByteStream, didFailReadingWith error: UVError) {}
    func stream(_ stream: any ByteStream, didFinishWrite context: UInt64, error: UVError?) {
        if error == nil { sendMore(on: stream) }
    }
    func streamDidClose(_ stream: any ByteStream) { self.stream = nil }

    // SocketStreamDelegate (plain)
    func streamWantsReadBuffer(_ stream: SocketStream) -> UnsafeMutableRawBufferPointer { buffer }
    func stream(_ stream: SocketStream, didRead count: Int) { received(count, on: stream) }
    func stream(_ stream: SocketStream, didFailReadingWith error: UVError) {}
    func stream(_ stream: SocketStream, didFinishWrite context: UInt64, error: UVError?) {
        if error == nil { sendMore(on: stream) }
    }
    func streamDidClose(_ stream: SocketStream) { self.stream = nil }
}

/// The child: connect, handshake, send `total`, read `total`, read to the end.
func runClient(port: Int) -> Never {
    let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
    var address = sockaddr_in()
    address.sin_family = sa_family_t(AF_INET)
    address.sin_port = UInt16(port).bigEndian
    inet_pton(AF_INET, "127.0.0.1", &address.sin_addr)
    let rc = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
    }
    guard rc == 0 else { _exit(3) }
    let data = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 16)
    data.initializeMemory(as: UInt8.self, repeating: 0xa5)
    var session: gnutls_session_t?
    var certificates: gnutls_certificate_credentials_t?
    if !plain {
        gnutls_init(&session, UInt32(GNUTLS_CLIENT.rawValue))
        gnutls_set_default_priority(session)
        gnutls_certificate_allocate_credentials(&certificates)
        gnutls_certificate_set_x509_trust_file(certificates, directory + "/ca-cert.pem", GNUTLS_X509_FMT_PEM)
        gnutls_credentials_set(session, GNUTLS_CRD_CERTIFICATE, UnsafeMutableRawPointer(certificates))
        gnutls_transport_set_int2(session, fd, fd)
        var result: Int32
        repeat { result = gnutls_handshake(session) } while result < 0 && gnutls_error_is_fatal(result) == 0
        guard result == 0 else { _exit(4) }
    }
    func send(_ count: Int) -> Int {
        plain ? Glibc.send(fd, data.baseAddress, count, Int32(MSG_NOSIGNAL)) : gnutls_record_send(session, data.baseAddress, count)
    }
    func receive() -> Int {
        plain ? recv(fd, data.baseAddress, chunk, 0) : gnutls_record_recv(session, data.baseAddress, chunk)
    }
    var sent = 0
    while sent < total {
        let n = send(min(chunk, total - sent))
        guard n > 0 else { _exit(5) }
        sent += n
    }
    var received = 0
    while true {
        let n = receive()
        if n <= 0 { break }
        received += n
    }
    _exit(received == total ? 0 : 6)
}

let loop = try EventLoop()
let server = Server(credentials: plain ? nil : try TLSCredentials(TLSConfiguration(certificateDirectory: directory)))
let listener = try Listener.tcp(loop: loop, host: "127.0.0.1", port: 0)
let port = listener.localPort!
listener.delegate = server
try listener.start()
let child = fork()
if child == 0 { runClient(port: port) }
loop.run()
var status: Int32 = 0
waitpid(child, &status, 0)
print("\(mebibytes) MiB each way, \(server.negotiated): server received \(server.received), sent \(server.sent), "
      + "client exit \((status >> 8) & 0xff)\(server.failed.map { ", failed: \($0)" } ?? "")")
exit(server.failed == nil && (status >> 8) & 0xff == 0 ? 0 : 1)
