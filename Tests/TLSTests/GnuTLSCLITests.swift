// The same server against the gnutls-cli program, the way an operator would test it: a real,
// separate client process with its own defaults. Only the handshake's outcome is checked (gnutls-cli
// reads stdin, here /dev/null, so it closes once the handshake is done).

import Glibc
import Testing
import TLS
import UVCore

private var credentials: TestCredentials { TestCredentials.shared }

/// Serves one connection and runs `gnutls-cli ARGS -p PORT 127.0.0.1`; returns the server, the exit
/// status and what gnutls-cli printed.
private func serveCLI(_ configuration: TLSConfiguration, _ arguments: String) throws -> (TLSEchoServer, Int32, String) {
    let loop = try EventLoop()
    let server = TLSEchoServer(loop: loop, credentials: try TLSCredentials(configuration))
    let listener = try Listener.tcp(loop: loop, host: "127.0.0.1", port: 0)
    let port = listener.localPort!
    listener.delegate = server
    try listener.start()
    let log = "\(credentials.root)/gnutls-cli-\(port).log"
    let status = Shared<Int32>(-1)
    let thread = spawnThread {
        status.value = shell("gnutls-cli \(arguments) -p \(port) 127.0.0.1 </dev/null >\(log) 2>&1")
    }
    runLoop(loop)
    joinThread(thread)
    #expect(server.closed == server.accepted)
    try loop.close()
    return (server, status.value, readFile(log))
}

@Suite(.serialized) struct GnuTLSCLITests {
    @Test func x509HandshakeVerifiedAgainstTheCA() throws {
        let (server, status, output) = try serveCLI(TLSConfiguration(certificateDirectory: credentials.directory),
                                                    "--x509cafile \(credentials.ca)")
        #expect(status == 0, "\(output)")
        #expect(output.contains("Handshake was completed"), "\(output)")
        #expect(server.handshakes == 1)
        #expect(server.failures.isEmpty, "\(server.failures)")
    }

    @Test func pskHandshake() throws {
        let key = credentials.pskKey(credentials.pskFile, user: "bob")
        let (server, status, output) = try serveCLI(TLSConfiguration(pskFile: credentials.pskFile),
                                                    "--pskusername bob --pskkey \(key) --priority NORMAL:+ECDHE-PSK:+PSK")
        #expect(status == 0, "\(output)")
        #expect(server.sessions.first?.psk == "bob")
    }

    @Test func wrongCAIsRefusedByTheClient() throws {
        let (server, status, output) = try serveCLI(TLSConfiguration(certificateDirectory: credentials.directory),
                                                    "--x509cafile \(credentials.otherCA)")
        #expect(status != 0)
        #expect(output.contains("issuer is unknown"), "\(output)")
        #expect(server.handshakes == 0)
        #expect(server.failures.count == 1, "the server hears the client's alert: \(server.failures)")
    }

    @Test func expiredServerCertificateIsRefusedByTheClient() throws {
        let (server, status, output) = try serveCLI(TLSConfiguration(certificateDirectory: credentials.expiredServerDirectory),
                                                    "--x509cafile \(credentials.ca)")
        #expect(status != 0)
        #expect(output.contains("expired"), "\(output)")
        #expect(server.handshakes == 0)
    }

    @Test func tls11ClientIsRefused() throws {
        // --insecure: the point is the protocol version, not the certificate.
        let (server, status, output) = try serveCLI(TLSConfiguration(certificateDirectory: credentials.directory),
                                                    "--insecure --priority NORMAL:-VERS-ALL:+VERS-TLS1.1")
        #expect(status != 0, "\(output)")
        #expect(server.handshakes == 0)
        #expect(server.failures.count == 1)
    }
}
