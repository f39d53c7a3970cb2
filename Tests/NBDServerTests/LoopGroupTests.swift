// A real Server with several loops (its workers on their own threads) and clients over a unix socket:
// connections on different loops see one image (raw: one fd per loop; qcow2: a proxy to the engine on
// the main loop), maxconnections counts every loop, and shutdown drains every loop and closes the
// image cleanly.

import Foundation
import NBDProtocol
@testable import NBDServer
import Testing
#if canImport(Glibc)
import Glibc
#endif

/// `qnbd serve` on a thread with `loops` loops, serving an 8 MiB raw or empty qcow2 image.
private func loopServer(loops: Int, qcow2: Bool = false, maximumConnections: Int? = nil) throws -> RunningServer {
    try RunningServer(image: qcow2 ? "disk.qcow2" : "disk.img", limits: ConnectionLimits()) { configuration in
        if qcow2 {
            let p = Process()
            p.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-img")
            p.arguments = ["create", "-q", "-f", "qcow2", configuration.exports[0].imagePath, "8M"]
            try! p.run()
            p.waitUntilExit()
            precondition(p.terminationStatus == 0, "qemu-img create failed")
        }
        configuration.loops = loops
        configuration.exports[0].maximumConnections = maximumConnections
    }
}

private func connected(_ server: RunningServer) throws -> TestClient {
    let client = try TestClient(path: server.socketPath)
    #expect(client.handshake() == 8 << 20)
    return client
}

/// Writes a 4 KiB block of `fill` at block `index` and waits for the answer.
private func write(_ client: TestClient, block index: Int, fill: UInt8) -> Bool {
    client.request(.write, cookie: UInt64(index), offset: UInt64(index) * 4096, length: 4096,
                   payload: [UInt8](repeating: fill, count: 4096))
    return client.reply { _ in 0 }.map { $0.error == 0 } ?? false
}

private func read(_ client: TestClient, block index: Int) -> [UInt8]? {
    client.request(.read, cookie: 1000 + UInt64(index), offset: UInt64(index) * 4096, length: 4096)
    guard let reply = client.reply(dataLength: { _ in 4096 }), reply.error == 0 else { return nil }
    return reply.data
}

private func flush(_ client: TestClient) -> Bool {
    client.request(.flush, cookie: 7, offset: 0, length: 0)
    return client.reply { _ in 0 }.map { $0.error == 0 } ?? false
}

private func check(_ path: String) -> Int32 {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: "/usr/bin/qemu-img")
    p.arguments = ["check", "-q", path]
    try? p.run()
    p.waitUntilExit()
    return p.terminationStatus
}

@Suite struct LoopGroupTests {
    /// Four clients held open at once land on three loops (least connections); each writes its block,
    /// and every client reads every block back: one image, whichever loop serves it.
    @Test(arguments: [false, true]) func clientsOnEveryLoopShareOneImage(qcow2: Bool) throws {
        let server = try loopServer(loops: 3, qcow2: qcow2)
        var clients: [TestClient] = []
        for _ in 0..<4 { clients.append(try connected(server)) }
        for (i, client) in clients.enumerated() { #expect(write(client, block: i, fill: UInt8(0x41 + i))) }
        #expect(flush(clients[3]))
        for client in clients {
            for i in clients.indices { #expect(read(client, block: i) == [UInt8](repeating: UInt8(0x41 + i), count: 4096)) }
        }
        clients.removeAll()
        #expect(server.shutdown() == 0)
        // Shutdown flushed and closed the image on its owner loop: the data is in the file, and a
        // qcow2 image checks clean.
        if qcow2 {
            #expect(check(server.imagePath) == 0)
        } else {
            let data = try Data(contentsOf: URL(fileURLWithPath: server.imagePath))
            #expect(data[4096 * 3] == 0x44)
        }
    }

    /// `loops = N` in [generic]: 1...64, a restart-only setting; absent means one per CPU.
    @Test func loopsKey() throws {
        let c = try ConfigFile.parse("[generic]\nloops = 3\n[d]\nexportname = /d.img\n", file: "t.conf")
        #expect(c.loops == 3 && c.effectiveLoops == 3)
        let d = try ConfigFile.parse("[generic]\n[d]\nexportname = /d.img\n", file: "t.conf")
        #expect(d.loops == nil && d.effectiveLoops == min(sysconf(Int32(_SC_NPROCESSORS_ONLN)), 64))
        #expect(d.restartOnlyDifferences(from: c) == (d.effectiveLoops == 3 ? [] : ["loops"]))
        #expect(throws: ConfigError.self) { try ConfigFile.parse("[generic]\nloops = 0\n[d]\nexportname = /d.img\n", file: "t.conf") }
        #expect(throws: ConfigError.self) { try ConfigFile.parse("[generic]\nloops = 65\n[d]\nexportname = /d.img\n", file: "t.conf") }
    }

    /// maxconnections = 2 counts connections on every loop, and a client leaving a worker loop frees
    /// its place.
    @Test func maxConnectionsCountsEveryLoop() throws {
        let server = try loopServer(loops: 2, maximumConnections: 2)
        var first: TestClient? = try connected(server)   // loop 0
        let second = try connected(server)              // loop 1
        let third = try TestClient(path: server.socketPath)
        #expect(third.handshake() == nil)
        first = nil
        // The server hears about the close asynchronously; the place comes back shortly.
        var again: UInt64?
        for _ in 0..<50 where again == nil {
            usleep(20_000)
            again = try TestClient(path: server.socketPath).handshake()
        }
        #expect(again == 8 << 20)
        _ = first
        #expect(write(second, block: 1, fill: 1))
        #expect(server.shutdown() == 0)
    }

    /// Shutdown while a worker loop's connection has writes in flight through the proxy: whatever the
    /// server read is answered (successfully), both loops' clients are closed, the server stops with
    /// status 0 and the qcow2 image, closed on its owner loop, checks clean.
    @Test func shutdownDrainsEveryLoop() throws {
        let server = try loopServer(loops: 2, qcow2: true)
        let a = try connected(server)
        let b = try connected(server)   // on the worker, through the proxy
        for i in 0..<32 {
            b.request(.write, cookie: UInt64(i), offset: UInt64(i) * 65536, length: 4096,
                      payload: [UInt8](repeating: 0x5a, count: 4096))
        }
        #expect(b.reply(dataLength: { _ in 0 })?.error == 0)   // the worker is serving them
        let stopped = DispatchSemaphore(value: 0)
        let status = LockedStatus()
        Thread { status.set(server.shutdown()); stopped.signal() }.start()
        var answered = 1
        while let reply = b.reply(dataLength: { _ in 0 }) {
            #expect(reply.error == 0)
            answered += 1
        }
        #expect(answered <= 32)
        #expect(a.waitForPeerClose(seconds: 10))
        #expect(stopped.wait(timeout: .now() + 30) == .success)
        #expect(status.value == 0)
        #expect(check(server.imagePath) == 0)
    }
}

private final class LockedStatus: @unchecked Sendable {
    private let lock = NSLock()
    private var status: Int32 = -1
    func set(_ s: Int32) { lock.lock(); status = s; lock.unlock() }
    var value: Int32 { lock.lock(); defer { lock.unlock() }; return status }
}
