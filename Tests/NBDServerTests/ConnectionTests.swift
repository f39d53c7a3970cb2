// The connection glue under pressure: pipelining past the in-flight bound, handshake timeouts, a
// client that stops reading its replies, and a framing error that must close only its own connection.

import Foundation
import NBDProtocol
import NBDServer
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite struct ConnectionTests {
    @Test func pipelinedRequestsBeyondTheInFlightBoundAllComplete() throws {
        var limits = ConnectionLimits()
        limits.maximumRequests = 4          // far below what the client sends at once
        limits.maximumInFlightBytes = 64 << 10
        let server = try RunningServer(image: "pipe.img", limits: limits)
        let client = try TestClient(path: server.socketPath)
        #expect(client.handshake() == 8 << 20)

        // 200 writes of 4 KiB with distinct contents, sent without reading a single reply.
        let count = 200
        for i in 0..<count {
            let block = [UInt8](repeating: UInt8(i % 251), count: 4096)
            client.request(.write, cookie: UInt64(i), offset: UInt64(i) * 4096, length: 4096, payload: block)
        }
        var seen = Set<UInt64>()
        for _ in 0..<count {
            let r = try #require(client.reply { _ in 0 })
            #expect(r.error == 0)
            seen.insert(r.cookie)
        }
        #expect(seen == Set((0..<count).map(UInt64.init)))

        // Then the same number of reads, pipelined, each checked against what was written.
        for i in 0..<count {
            client.request(.read, cookie: UInt64(1000 + i), offset: UInt64(i) * 4096, length: 4096)
        }
        for _ in 0..<count {
            let r = try #require(client.reply { _ in 4096 })
            #expect(r.error == 0)
            let i = Int(r.cookie - 1000)
            #expect(r.data == [UInt8](repeating: UInt8(i % 251), count: 4096))
        }
        client.request(.disconnect, cookie: 0, offset: 0, length: 0)
        #expect(server.shutdown() == 0)
        let file = try #require(FileManager.default.contents(atPath: server.imagePath))
        #expect(file[0..<4096].allSatisfy { $0 == 0 })
        #expect(file[4096 * 7..<4096 * 8].allSatisfy { $0 == 7 })
    }

    @Test func aClientThatNeverNegotiatesIsCutOff() throws {
        var limits = ConnectionLimits()
        limits.handshakeTimeoutMilliseconds = 300
        let server = try RunningServer(image: "idle.img", limits: limits)
        let client = try TestClient(path: server.socketPath)
        #expect(client.receive(18) != nil)
        let start = Date()
        #expect(client.receive(1) == nil, "the server must close an idle handshake")
        #expect(Date().timeIntervalSince(start) < 5)
        #expect(server.shutdown() == 0)
    }

    @Test func aClientThatStopsReadingRepliesIsCutOff() throws {
        var limits = ConnectionLimits()
        limits.sendTimeoutMilliseconds = 200
        let server = try RunningServer(image: "stall.img", limits: limits)
        let good = try TestClient(path: server.socketPath)
        let stalled = try TestClient(path: server.socketPath)
        #expect(good.handshake() != nil)
        #expect(stalled.handshake() != nil)
        // 32 MiB of replies: far more than both socket buffers hold, so most stay queued in the server.
        for i in 0..<32 {
            stalled.request(.read, cookie: UInt64(i), offset: UInt64(i % 8) << 20, length: 1 << 20)
        }
        // Without reading a byte, wait for the server to hang up (the socket reports the peer's close).
        #expect(stalled.waitForPeerClose(seconds: 30), "the server must close a connection whose replies sit unread")
        good.request(.write, cookie: 1, offset: 4096, length: 3, payload: [4, 5, 6])
        #expect(good.reply { _ in 0 }?.error == 0)
        good.request(.read, cookie: 2, offset: 4096, length: 3)
        #expect(good.reply { _ in 3 }?.data == [4, 5, 6])
        #expect(server.shutdown() == 0)
    }

    @Test func aFramingErrorClosesOnlyItsOwnConnection() throws {
        let server = try RunningServer(image: "frame.img", limits: ConnectionLimits())
        let good = try TestClient(path: server.socketPath)
        let bad = try TestClient(path: server.socketPath)
        #expect(good.handshake() != nil)
        #expect(bad.handshake() != nil)
        bad.send([UInt8](repeating: 0x42, count: 28))      // not a request magic
        #expect(bad.receive(1) == nil, "the bad connection is closed")
        good.request(.write, cookie: 7, offset: 0, length: 3, payload: [1, 2, 3])
        #expect(good.reply { _ in 0 }?.error == 0)
        good.request(.read, cookie: 8, offset: 0, length: 3)
        #expect(good.reply { _ in 3 }?.data == [1, 2, 3])
        #expect(server.shutdown() == 0)
    }

    @Test func discAfterPipelinedWritesAnswersThemAllThenCloses() throws {
        let server = try RunningServer(image: "disc.img", limits: ConnectionLimits())
        let client = try TestClient(path: server.socketPath)
        #expect(client.handshake() != nil)
        var burst: [UInt8] = []
        for i in 0..<20 {
            let r = Request(flags: [], type: NBDCommand.write.rawValue, cookie: UInt64(i), offset: UInt64(i) * 512, length: 512)
            burst += r.encoded(extended: false) + [UInt8](repeating: UInt8(i + 1), count: 512)
        }
        burst += Request(flags: [], type: NBDCommand.disconnect.rawValue, cookie: 99, offset: 0, length: 0).encoded(extended: false)
        client.send(burst)
        var seen = Set<UInt64>()
        for _ in 0..<20 {
            let r = try #require(client.reply { _ in 0 })
            #expect(r.error == 0)
            seen.insert(r.cookie)
        }
        #expect(seen.count == 20)
        #expect(client.receive(1) == nil, "DISC closes once the replies are out")
        #expect(server.shutdown() == 0)
        let file = try #require(FileManager.default.contents(atPath: server.imagePath))
        #expect(file[19 * 512..<20 * 512].allSatisfy { $0 == 20 })
    }

    @Test func aClientThatClosesMidPayloadLeavesTheServerHealthy() throws {
        let server = try RunningServer(image: "mid.img", limits: ConnectionLimits())
        let quitter = try TestClient(path: server.socketPath)
        #expect(quitter.handshake() != nil)
        quitter.request(.write, cookie: 1, offset: 0, length: 1 << 20, payload: [UInt8](repeating: 7, count: 1000))
        let good = try TestClient(path: server.socketPath)
        #expect(good.handshake() != nil)
        close(quitter.fd)
        good.request(.write, cookie: 2, offset: 8192, length: 3, payload: [1, 2, 3])
        #expect(good.reply { _ in 0 }?.error == 0)
        good.request(.read, cookie: 3, offset: 0, length: 4)
        #expect(good.reply { _ in 4 }?.data == [0, 0, 0, 0], "the half-sent write never reached the disk")
        #expect(server.shutdown() == 0)
    }

    @Test func shutdownDoesNotWaitForAPayloadThatNeverComes() throws {
        let server = try RunningServer(image: "half.img", limits: ConnectionLimits())
        let client = try TestClient(path: server.socketPath)
        #expect(client.handshake() != nil)
        client.request(.read, cookie: 1, offset: 0, length: 512)
        #expect(client.reply { _ in 512 }?.error == 0)
        // A write whose payload stops half-way, on a connection that stays open.
        client.request(.write, cookie: 2, offset: 0, length: 1 << 20, payload: [UInt8](repeating: 9, count: 4096))
        Thread.sleep(forTimeInterval: 0.2)
        let start = Date()
        #expect(server.shutdown() == 0)
        #expect(Date().timeIntervalSince(start) < 10, "the server's 30 s deadline must not be what ends it")
        #expect(client.receive(1) == nil, "the connection is closed without a reply to the unfinished write")
    }

    @Test func connectionsPausedForTheSharedBudgetAllResume() throws {
        // 64 KiB for every connection together: four 16 KiB reads fill it, so both clients keep pausing
        // for the budget and must be resumed by each other's (and their own) released replies.
        let server = try RunningServer(image: "budget.img", limits: ConnectionLimits(), memoryBudget: 64 << 10)
        let a = try TestClient(path: server.socketPath)
        let b = try TestClient(path: server.socketPath)
        #expect(a.handshake() != nil)
        #expect(b.handshake() != nil)
        let count = 64
        for i in 0..<count {
            a.request(.read, cookie: UInt64(i), offset: UInt64(i) * 16384, length: 16384)
            b.request(.read, cookie: UInt64(i), offset: UInt64(i) * 16384, length: 16384)
        }
        // Both clients are read at the same time. Read one after the other, the unread client's
        // replies fill its socket and then hold the shared budget, and the client being read waits
        // for budget that only a reader of the other can free: the budget bounds memory, it does
        // not promise progress to one client while another stops reading. Whether that happened
        // depended on scheduling (the test failed now and then on a loaded machine).
        let other = RepliesReader(client: b, count: count, length: 16384)
        let seenA = RepliesReader.read(a, count: count, length: 16384)
        let seenB = other.wait()
        #expect(seenA.replies == count && seenA.errors == 0 && seenA.cookies.count == count)
        #expect(seenB.replies == count && seenB.errors == 0 && seenB.cookies.count == count)
        #expect(server.shutdown() == 0)
    }

    @Test func shutdownDuringTheHandshakeClosesTheConnection() throws {
        let server = try RunningServer(image: "hs.img", limits: ConnectionLimits())
        let client = try TestClient(path: server.socketPath)
        #expect(client.receive(18) != nil)
        let start = Date()
        #expect(server.shutdown() == 0)
        #expect(Date().timeIntervalSince(start) < 10)
        #expect(client.receive(1) == nil)
    }
}

/// Reads `count` replies of `length` data bytes from a client on a thread of its own.
private final class RepliesReader: @unchecked Sendable {
    typealias Tally = (replies: Int, errors: Int, cookies: Set<UInt64>)
    private let done = DispatchSemaphore(value: 0)
    // Written by the reader thread before `done` is signalled, read after `wait()` returns.
    private var tally: Tally = (0, 0, [])

    init(client: TestClient, count: Int, length: Int) {
        nonisolated(unsafe) let client = client
        Thread { [self] in
            tally = Self.read(client, count: count, length: length)
            done.signal()
        }.start()
    }

    func wait() -> Tally {
        done.wait()
        return tally
    }

    static func read(_ client: TestClient, count: Int, length: Int) -> Tally {
        var tally: Tally = (0, 0, [])
        for _ in 0..<count {
            guard let reply = client.reply(dataLength: { _ in length }) else { break }
            tally.replies += 1
            if reply.error != 0 { tally.errors += 1 }
            tally.cookies.insert(reply.cookie)
        }
        return tally
    }
}
