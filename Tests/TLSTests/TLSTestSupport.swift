// Helpers for the TLS tests: plain threads for blocking clients, blocking sockets, a loop runner with
// a watchdog, shell commands (certtool, psktool, gnutls-cli), and credentials made once per run.

import CGnuTLS
import Glibc
import Synchronization
import Testing
import TLS
import UVCore

// MARK: Threads

private final class ThreadBody {
    let body: @Sendable () -> Void
    init(_ body: @escaping @Sendable () -> Void) { self.body = body }
}

private let threadEntry: @convention(c) (UnsafeMutableRawPointer?) -> UnsafeMutableRawPointer? = { argument in
    Unmanaged<ThreadBody>.fromOpaque(argument!).takeRetainedValue().body()
    return nil
}

func spawnThread(_ body: @escaping @Sendable () -> Void) -> pthread_t {
    var thread = pthread_t()
    let box = Unmanaged.passRetained(ThreadBody(body)).toOpaque()
    precondition(pthread_create(&thread, nil, threadEntry, box) == 0)
    return thread
}

func joinThread(_ thread: pthread_t) { pthread_join(thread, nil) }

final class Shared<Value: Sendable>: Sendable {
    private let storage: Mutex<Value>
    init(_ value: Value) { storage = Mutex(value) }
    var value: Value {
        get { storage.withLock { $0 } }
        set { storage.withLock { $0 = newValue } }
    }
}

// MARK: Sockets

/// A blocking client socket; `receiveBuffer` shrinks SO_RCVBUF (set before connect, so the window follows).
func connectTCP(port: Int, host: String = "127.0.0.1", receiveBuffer: Int32? = nil) -> Int32 {
    let isV6 = host.contains(":")
    let fd = socket(isV6 ? AF_INET6 : AF_INET, Int32(SOCK_STREAM.rawValue | SOCK_CLOEXEC.rawValue), 0)
    precondition(fd >= 0)
    if var size = receiveBuffer {
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }
    var rc: Int32
    if isV6 {
        var address = sockaddr_in6()
        address.sin6_family = sa_family_t(AF_INET6)
        address.sin6_port = UInt16(port).bigEndian
        precondition(inet_pton(AF_INET6, host, &address.sin6_addr) == 1)
        rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in6>.size)) }
        }
    } else {
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_port = UInt16(port).bigEndian
        precondition(inet_pton(AF_INET, host, &address.sin_addr) == 1)
        rc = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
    }
    precondition(rc == 0, "connect failed: \(errno)")
    return fd
}

func sendAll(_ fd: Int32, _ bytes: [UInt8]) {
    var done = 0
    while done < bytes.count {
        let n = bytes.withUnsafeBytes { send(fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { return }
        done += n
    }
}

func receivePlain(_ fd: Int32, count: Int) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: count)
    var done = 0
    while done < count {
        let n = bytes.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + done, count - done, 0) }
        if n < 0 && errno == EINTR { continue }
        if n <= 0 { break }
        done += n
    }
    return Array(bytes[0..<done])
}

func pattern(_ count: Int, seed: Int = 0) -> [UInt8] {
    (0..<count).map { UInt8(truncatingIfNeeded: ($0 &* 31) &+ ($0 >> 8) &+ seed) }
}

// MARK: Loop

/// Runs the loop until it has no more work; a watchdog fails the test instead of hanging.
func runLoop(_ loop: EventLoop, timeoutSeconds: UInt64 = 60, sourceLocation: SourceLocation = #_sourceLocation) {
    let watchdog = LoopTimer(loop: loop)
    var fired = false
    watchdog.start(afterMilliseconds: timeoutSeconds * 1000) {
        fired = true
        loop.stop()
    }
    watchdog.unref()
    loop.run()
    if fired {
        Issue.record("event loop still busy after \(timeoutSeconds) s", sourceLocation: sourceLocation)
        return
    }
    watchdog.close()
    loop.run()
}

// MARK: Commands

/// Runs a shell command; returns its exit status (output goes where the command sends it).
@discardableResult
func shell(_ command: String) -> Int32 {
    let status = system(command)
    return status == -1 ? -1 : (status >> 8) & 0xff
}

func readFile(_ path: String) -> String {
    guard let file = fopen(path, "r") else { return "" }
    defer { fclose(file) }
    var bytes: [UInt8] = []
    var chunk = [UInt8](repeating: 0, count: 4096)
    while true {
        let n = fread(&chunk, 1, chunk.count, file)
        if n == 0 { break }
        bytes.append(contentsOf: chunk[0..<n])
    }
    return String(decoding: bytes, as: UTF8.self)
}

func writeFile(_ path: String, _ text: String) {
    let file = fopen(path, "w")!
    fputs(text, file)
    fclose(file)
}

// MARK: Credentials

/// Certificates and keys made with certtool and psktool, once per test run.
struct TestCredentials: Sendable {
    /// ca-cert.pem, server-cert.pem, server-key.pem (mode 0600) signed by the CA.
    let directory: String
    /// The same CA, a server certificate that expired in 2020.
    let expiredServerDirectory: String
    /// A second, unrelated CA's certificate.
    let otherCA: String
    /// Client certificates: signed by the CA, by the other CA, and expired.
    let client: (cert: String, key: String)
    let foreignClient: (cert: String, key: String)
    let expiredClient: (cert: String, key: String)
    /// A client certificate the CA has revoked, and a copy of `directory` whose ca-crl.pem lists it.
    let revokedClient: (cert: String, key: String)
    let revokingDirectory: String
    let clientDN = "CN=qnbd test client,O=qnbd tests"
    /// psktool files: alice and bob; and one where alice has a different key.
    let pskFile: String
    let wrongPSKFile: String
    let root: String
    var ca: String { directory + "/ca-cert.pem" }

    static let shared: TestCredentials = make()

    func pskKey(_ file: String, user: String) -> String {
        for line in readFile(file).split(separator: "\n") where line.hasPrefix(user + ":") {
            return String(line.dropFirst(user.count + 1))
        }
        fatalError("no key for \(user) in \(file)")
    }

    private static func make() -> TestCredentials {
        let root = "/tmp/qnbd-tls-tests-\(getpid())"
        atexit { shell("rm -rf /tmp/qnbd-tls-tests-\(getpid())") }
        let valid = root + "/x509"
        let expired = root + "/x509-expired"
        precondition(shell("rm -rf \(root) && mkdir -p \(valid) \(expired) \(root)/other \(root)/clients") == 0)
        let log = root + "/certtool.log"
        func run(_ command: String) {
            precondition(shell("\(command) >>\(log) 2>&1") == 0, "failed: \(command); see \(log)")
        }
        func template(_ name: String, _ lines: [String]) -> String {
            let path = "\(root)/\(name).tmpl"
            writeFile(path, lines.joined(separator: "\n") + "\n")
            return path
        }
        func key(_ path: String) { run("certtool --generate-privkey --key-type=ecdsa --outfile \(path)") }

        // CA
        key("\(root)/ca-key.pem")
        let caTemplate = template("ca", ["cn = qnbd test CA", "ca", "cert_signing_key", "crl_signing_key", "expiration_days = 3650"])
        run("certtool --generate-self-signed --load-privkey \(root)/ca-key.pem --template \(caTemplate) --outfile \(valid)/ca-cert.pem")
        run("cp \(valid)/ca-cert.pem \(expired)/ca-cert.pem")
        // Another CA nobody trusts.
        key("\(root)/other/ca-key.pem")
        let otherTemplate = template("other-ca", ["cn = some other CA", "ca", "cert_signing_key", "expiration_days = 3650"])
        run("certtool --generate-self-signed --load-privkey \(root)/other/ca-key.pem --template \(otherTemplate) --outfile \(root)/other/ca-cert.pem")

        // Server certificates: valid, and expired.
        let serverLines = ["cn = localhost", "dns_name = localhost", "ip_address = 127.0.0.1", "ip_address = ::1",
                           "tls_www_server", "signing_key", "encryption_key"]
        key("\(valid)/server-key.pem")
        run("certtool --generate-certificate --load-privkey \(valid)/server-key.pem --load-ca-certificate \(valid)/ca-cert.pem "
            + "--load-ca-privkey \(root)/ca-key.pem --template \(template("server", serverLines + ["expiration_days = 365"])) "
            + "--outfile \(valid)/server-cert.pem")
        key("\(expired)/server-key.pem")
        let pastDates = ["activation_date = \"2019-01-01 00:00:00 UTC\"", "expiration_date = \"2020-01-01 00:00:00 UTC\""]
        run("certtool --generate-certificate --load-privkey \(expired)/server-key.pem --load-ca-certificate \(valid)/ca-cert.pem "
            + "--load-ca-privkey \(root)/ca-key.pem --template \(template("server-expired", serverLines + pastDates)) "
            + "--outfile \(expired)/server-cert.pem")

        // Client certificates.
        let clientLines = ["cn = qnbd test client", "organization = qnbd tests", "tls_www_client", "signing_key"]
        let clients = root + "/clients"
        func client(_ name: String, caDir: String, caKey: String, extra: [String]) -> (String, String) {
            key("\(clients)/\(name)-key.pem")
            run("certtool --generate-certificate --load-privkey \(clients)/\(name)-key.pem --load-ca-certificate \(caDir)/ca-cert.pem "
                + "--load-ca-privkey \(caKey) --template \(template(name, clientLines + extra)) --outfile \(clients)/\(name)-cert.pem")
            return ("\(clients)/\(name)-cert.pem", "\(clients)/\(name)-key.pem")
        }
        let good = client("client", caDir: valid, caKey: "\(root)/ca-key.pem", extra: ["expiration_days = 365"])
        let foreign = client("foreign", caDir: root + "/other", caKey: "\(root)/other/ca-key.pem", extra: ["expiration_days = 365"])
        let old = client("expired", caDir: valid, caKey: "\(root)/ca-key.pem", extra: pastDates)
        let revoked = client("revoked", caDir: valid, caKey: "\(root)/ca-key.pem", extra: ["expiration_days = 365"])
        let revoking = root + "/x509-crl"
        run("cp -a \(valid) \(revoking)")
        run("certtool --generate-crl --load-ca-privkey \(root)/ca-key.pem --load-ca-certificate \(valid)/ca-cert.pem "
            + "--load-certificate \(revoked.0) --template \(template("crl", ["crl_next_update = 30", "crl_number = 1"])) "
            + "--outfile \(revoking)/ca-crl.pem")

        // PSK
        run("psktool -u alice -p \(root)/keys.psk && psktool -u bob -p \(root)/keys.psk")
        run("psktool -u alice -p \(root)/wrong.psk")
        run("chmod 600 \(valid)/server-key.pem \(expired)/server-key.pem \(root)/keys.psk \(root)/wrong.psk")

        return TestCredentials(directory: valid, expiredServerDirectory: expired, otherCA: root + "/other/ca-cert.pem",
                               client: good, foreignClient: foreign, expiredClient: old,
                               revokedClient: revoked, revokingDirectory: revoking,
                               pskFile: root + "/keys.psk", wrongPSKFile: root + "/wrong.psk", root: root)
    }
}
