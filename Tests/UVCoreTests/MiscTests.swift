// BufferPool, LoopTimer, SignalWatcher, Mailbox, UVError and EventLoop tests.

import Glibc
import Testing
@testable import UVCore

@Suite struct BufferPoolTests {
    @Test func reusesSlotsBySizeClass() {
        let pool = BufferPool()
        let a = pool.take(count: 10_000)
        #expect(a.bytes.count == 10_000)
        #expect(Int(bitPattern: a.bytes.baseAddress!) % 4096 == 0)
        #expect(pool.outstandingBuffers == 1)
        let b = pool.take(count: 10_000)
        #expect(b.bytes.baseAddress != a.bytes.baseAddress)
        #expect(pool.outstandingBuffers == 2)
        a.bytes.initializeMemory(as: UInt8.self, repeating: 0xFF)   // the whole slot is usable
        pool.give(a)
        #expect(pool.outstandingBuffers == 1)
        #expect(pool.cachedByteCount == 16384)
        // Same 16 KiB class: the slot just given back comes out again.
        let c = pool.take(count: 16384)
        #expect(c.bytes.baseAddress == a.bytes.baseAddress)
        #expect(c.bytes.count == 16384)
        #expect(pool.cachedByteCount == 0)
        // A different class does not reuse it.
        pool.give(c)
        let d = pool.take(count: 100)
        #expect(d.bytes.baseAddress != c.bytes.baseAddress)
        #expect(d.bytes.count == 100)
        pool.give(b)
        pool.give(d)
        #expect(pool.outstandingBuffers == 0)
    }

    @Test func edgesOfTheClassRange() {
        let pool = BufferPool()
        let empty = pool.take(count: 0)
        #expect(empty.bytes.count == 0)
        let largest = pool.take(count: 64 << 20)
        #expect(largest.bytes.count == 64 << 20)
        let huge = pool.take(count: (64 << 20) + 1)   // beyond the classes: unpooled
        #expect(huge.bytes.count == (64 << 20) + 1)
        #expect(pool.outstandingBuffers == 3)
        pool.give(huge)
        #expect(pool.cachedByteCount == 0)
        pool.give(largest)
        pool.give(empty)
        #expect(pool.cachedByteCount == (64 << 20) + 4096)
        #expect(pool.outstandingBuffers == 0)
    }

    @Test func cacheIsBounded() {
        let pool = BufferPool(maximumCachedBytes: 8192)
        let buffers = (0..<4).map { _ in pool.take(count: 4096) }
        for buffer in buffers { pool.give(buffer) }
        #expect(pool.cachedByteCount == 8192)
        #expect(pool.outstandingBuffers == 0)
    }

    @Test func doubleGiveTraps() async {
        await #expect(processExitsWith: .failure) {
            let pool = BufferPool()
            let buffer = pool.take(count: 4096)
            pool.give(buffer)
            pool.give(buffer)
        }
    }
}

@Suite struct TimerSignalMailboxTests {
    @Test func timerFiresOnceAndRepeating() throws {
        let loop = try EventLoop()
        let once = LoopTimer(loop: loop)
        let repeating = LoopTimer(loop: loop)
        var onceFired = 0
        var repeats = 0
        let start = loop.nowMilliseconds
        var onceAt: UInt64 = 0
        once.start(afterMilliseconds: 20) {
            onceFired += 1
            onceAt = loop.nowMilliseconds
            once.close()
        }
        repeating.start(afterMilliseconds: 1, repeatMilliseconds: 2) {
            repeats += 1
            if repeats == 5 {
                repeating.stop()
                repeating.close()
            }
        }
        runLoop(loop)
        #expect(onceFired == 1)
        #expect(onceAt - start >= 20)
        #expect(repeats == 5)
        try loop.close()
    }

    @Test func unrefedTimerDoesNotKeepTheLoopAlive() throws {
        let loop = try EventLoop()
        let timer = LoopTimer(loop: loop)
        var fired = 0
        timer.start(afterMilliseconds: 60_000) { fired += 1 }
        timer.unref()
        #expect(timer.isActive)
        loop.run()   // returns at once
        #expect(fired == 0)
        #expect(throws: UVError(code: -EBUSY)) { try loop.close() }
        timer.close()
        loop.run()
        try loop.close()
    }

    @Test func signalWatcherCatchesRaise() throws {
        let loop = try EventLoop()
        var caught: [Int32] = []
        var watcher: SignalWatcher?
        watcher = try SignalWatcher(loop: loop, signal: SIGUSR1) { signal in
            caught.append(signal)
            watcher?.close()
        }
        // Swift Testing's worker threads (this one included) block SIGUSR1, so raise it
        // from a thread that unblocks it; libuv forwards it to the loop through a pipe.
        let raiser = spawnThread {
            var mask = sigset_t()
            sigemptyset(&mask)
            sigaddset(&mask, SIGUSR1)
            pthread_sigmask(SIG_UNBLOCK, &mask, nil)
            raise(SIGUSR1)
        }
        joinThread(raiser)
        runLoop(loop)
        #expect(caught == [SIGUSR1])
        watcher = nil
        try loop.close()
    }

    @Test func mailboxDeliversInOrderFromAnotherThread() throws {
        let loop = try EventLoop()
        var received: [Int] = []
        var batches = 0
        var mailbox: Mailbox<Int>?
        mailbox = try Mailbox<Int>(loop: loop) { messages in
            batches += 1
            received.append(contentsOf: messages)
            if received.count == 10_000 { mailbox?.close() }
        }
        let box = mailbox!
        let poster = spawnThread {
            for index in 0..<10_000 {
                box.post(index)
                if index % 1000 == 0 { usleep(1000) }
            }
        }
        runLoop(loop)
        joinThread(poster)
        #expect(received == Array(0..<10_000))
        #expect(batches >= 1 && batches <= 10_000)
        box.post(-1)   // after close: dropped, no crash
        mailbox = nil
        try loop.close()
    }
}

@Suite struct ErrorAndLoopTests {
    @Test func errorNamesAndCodes() {
        #expect(UVError.addressInUse.name == "EADDRINUSE")
        #expect(UVError.addressInUse.description == "EADDRINUSE: address already in use")
        #expect(UVError(errno: EPIPE) == .brokenPipe)
        #expect(UVError.brokenPipe.errno == EPIPE)
        #expect(UVError.eof.name == "EOF")
        #expect(UVError(code: -123_456).name.contains("123456"))
    }

    @Test func closeFailsWhileHandlesAreOpen() throws {
        let loop = try EventLoop()
        let timer = LoopTimer(loop: loop)
        #expect(throws: UVError(code: -EBUSY)) { try loop.close() }
        timer.close()
        // A handle whose close was requested finishes closing inside close(); the loop needs no run.
        try loop.close()
        try loop.close()   // idempotent
    }

    @Test func turnEndTasksRunBeforeTheLoopWaitsAndMayScheduleMore() throws {
        let loop = try EventLoop()
        final class Task: TurnEndTask {
            let loop: EventLoop
            var log: [String]
            let name: String
            var follow: Task?
            init(_ name: String, loop: EventLoop, log: [String] = []) { self.name = name; self.loop = loop; self.log = log }
            func runAtTurnEnd() {
                log.append(name)
                if let follow {
                    self.follow = nil
                    loop.runAtTurnEnd(follow)   // runs in the same pass
                }
            }
        }
        let second = Task("second", loop: loop)
        let first = Task("first", loop: loop)
        first.follow = second
        loop.runAtTurnEnd(first)
        // Nothing else is pending: the scheduled task alone keeps the loop turning until it ran.
        loop.run()
        #expect(first.log == ["first"])
        #expect(second.log == ["second"])
        // Idle again: run returns at once, and the loop closes (the turn-end handle with it).
        loop.run()
        try loop.close()
    }

    @Test func stopEndsRun() throws {
        let loop = try EventLoop()
        let timer = LoopTimer(loop: loop)
        var ticks = 0
        timer.start(afterMilliseconds: 1, repeatMilliseconds: 1) {
            ticks += 1
            if ticks == 3 { loop.stop() }
        }
        loop.run()
        #expect(ticks == 3)
        timer.close()
        loop.run()
        try loop.close()
    }
}
