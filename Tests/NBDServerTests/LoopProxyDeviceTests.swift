// ProxyDevice on real loops on real threads: an owner loop runs a memory-backed device, a requesting
// loop drives it through a ProxyDevice. Checks that every operation reaches the device on the owner's
// thread with its range, flags and buffer, that completions come back on the requester's thread with
// the caller's tags, that inline and deferred completions both cross, and that slots are reused.

import BlockDevice
import Foundation
@testable import NBDServer
import Synchronization
import Testing
import UVCore
#if canImport(Glibc)
import Glibc
#endif

/// The requesting side: issues a script of requests on its loop and records what comes back.
private final class Requester: BlockIOHandler {
    let requesterThread: pthread_t
    var completions: [(tag: UInt64, outcome: BlockOutcome)] = []
    var wrongThreadCompletions = 0
    let buffers: [UnsafeMutableRawBufferPointer]
    var onAllDone: (() -> Void)?
    var expected = 0

    init(thread: pthread_t, buffers: Int) {
        requesterThread = thread
        self.buffers = (0..<buffers).map { _ in .allocate(byteCount: 4096, alignment: 16) }
    }

    deinit { for b in buffers { b.deallocate() } }

    func blockIOCompleted(tag: UInt64, outcome: BlockOutcome) {
        if pthread_equal(pthread_self(), requesterThread) == 0 { wrongThreadCompletions += 1 }
        completions.append((tag, outcome))
        if completions.count == expected { onAllDone?() }
    }
}

/// Lets a test hand loop-confined objects to the loop's thread (they are used only there from then on).
private struct Handed<T>: @unchecked Sendable { let value: T }

@Suite struct LoopProxyDeviceTests {
    @Test func requestsCrossToTheOwnerAndCompletionsComeBack() throws {
        let ownerLoop = try EventLoop()
        let requesterLoop = try EventLoop()
        let requests = try Mailbox<ProxyRequest>(loop: ownerLoop) { ProxyLink.execute($0) }
        let completions = try Mailbox<ProxyCompletion>(loop: requesterLoop) { ProxyDevice.complete($0) }
        let ownerStop = Mutex<Mailbox<Bool>?>(nil)
        let stopOwner = try Mailbox<Bool>(loop: ownerLoop) { _ in
            requests.close()
            ownerStop.withLock { $0?.close() }
        }
        ownerStop.withLock { $0 = stopOwner }

        // The device is made on the owner's thread once it runs, so its thread check means something.
        let deviceBox = Mutex<Handed<MemoryDevice>?>(nil)
        let ownerReady = DispatchSemaphore(value: 0)
        let ownerMade = Handed(value: ownerLoop)
        let owner = try LoopThread(name: "test-owner") {
            deviceBox.withLock { $0 = Handed(value: MemoryDevice(ownerThread: pthread_self())) }
            ownerReady.signal()
            ownerMade.value.run()
        }
        ownerReady.wait()
        let device = deviceBox.withLock { $0!.value }
        let proxy = ProxyDevice(device: device, ownerLoop: ownerLoop, requests: requests, loop: requesterLoop, completions: completions)
        #expect(proxy.size == device.size && proxy.summary == "memory" && proxy.capabilities == device.capabilities)

        // The script: 8 writes of distinct bytes (two with FUA), a flush that completes them, 8 reads
        // of the same blocks, a zero with options, a block status, a refused cache. Twice, so the
        // second round runs on reused slots.
        let finished = DispatchSemaphore(value: 0)
        let results = Mutex<Handed<Requester>?>(nil)
        let run = Handed(value: (proxy, requesterLoop, completions))
        let startBox = Mutex<Mailbox<Bool>?>(nil)
        let start = try Mailbox<Bool>(loop: requesterLoop) { _ in
            let (proxy, _, completions) = run.value
            let requester = Requester(thread: pthread_self(), buffers: 8)
            results.withLock { $0 = Handed(value: requester) }
            requester.expected = 2 * (8 + 1 + 8 + 3)
            var round = 0
            func issueRound() {
                let base = UInt64(round) * 100
                for i in 0..<8 {
                    requester.buffers[i].initializeMemory(as: UInt8.self, repeating: UInt8(i + 1 + round * 8))
                    proxy.write(offset: UInt64(i) * 4096, from: UnsafeRawBufferPointer(requester.buffers[i]), fua: i < 2,
                                tag: base + UInt64(i), handler: requester)
                }
                proxy.flush(tag: base + 8, handler: requester)
                for i in 0..<8 {
                    proxy.read(offset: UInt64(i) * 4096, into: requester.buffers[i], tag: base + 10 + UInt64(i), handler: requester)
                }
                proxy.writeZeroes(offset: 65536, length: 4096, options: [.noHole, .fua], tag: base + 20, handler: requester)
                proxy.blockStatus(offset: 0, length: 8192, tag: base + 21, handler: requester)
                proxy.cache(offset: 0, length: 4096, tag: base + 22, handler: requester)
            }
            var checkedRound = [Bool](repeating: false, count: 2)
            requester.onAllDone = {
                completions.close()
                startBox.withLock { $0?.close() }
                finished.signal()
            }
            issueRound()
            // The second round starts once the first round's reads are back (its buffers are checked first).
            let firstRoundCount = 20
            let original = requester.onAllDone
            requester.expected = firstRoundCount
            requester.onAllDone = {
                guard !checkedRound[0] else { return }
                checkedRound[0] = true
                for i in 0..<8 { #expect(requester.buffers[i].allSatisfy { $0 == UInt8(i + 1) }) }
                round = 1
                requester.expected = 2 * firstRoundCount
                requester.onAllDone = original
                issueRound()
            }
        }
        startBox.withLock { $0 = start }
        let requesterThread = try LoopThread(name: "test-requester") { run.value.1.run() }
        start.post(true)
        #expect(finished.wait(timeout: .now() + 20) == .success)
        requesterThread.join()
        stopOwner.post(true)
        owner.join()
        try ownerLoop.close()
        try requesterLoop.close()

        let requester = try #require(results.withLock { $0?.value })
        // The boxes hold mailboxes whose handlers capture the boxes (and the requester, whose onAllDone
        // closures capture it back): break those cycles, or LeakSanitizer reports the lot.
        defer {
            requester.onAllDone = nil
            results.withLock { $0 = nil }
            startBox.withLock { $0 = nil }
            ownerStop.withLock { $0 = nil }
        }
        #expect(requester.wrongThreadCompletions == 0)
        #expect(device.wrongThreadCalls == 0)
        #expect(requester.completions.count == 40)
        #expect(proxy.inFlight == 0)
        for round in 0..<2 {
            let base = UInt64(round) * 100
            let tags = Set(requester.completions.map(\.tag).filter { $0 >= base && $0 < base + 100 })
            #expect(tags == Set((0..<9).map { base + $0 } + (10..<18).map { base + $0 } + [base + 20, base + 21, base + 22]))
        }
        // Writes completed only with the flush, and before it (the device answers them first).
        let flushIndex = requester.completions.firstIndex { $0.tag == 8 }!
        #expect(requester.completions[..<flushIndex].filter { $0.tag < 8 }.count == 8)
        for i in 0..<8 { #expect(requester.buffers[i].allSatisfy { $0 == UInt8(i + 9) }) }
        #expect(device.bytes[0..<4096].allSatisfy { $0 == 9 })
        #expect(device.fuaWrites == 4)
        #expect(device.zeroOptions == [[.noHole, .fua], [.noHole, .fua]])
        let status = requester.completions.first { $0.tag == 21 }!.outcome
        guard case .extents(let extents) = status else { Issue.record("block status: \(status)"); return }
        #expect(extents == [Extent(length: 8192, flags: .zero, depth: 1)])
        let cache = requester.completions.first { $0.tag == 122 }!.outcome
        guard case .failed(let error) = cache else { Issue.record("cache: \(cache)"); return }
        #expect(error.errno == EIO)
    }
}
