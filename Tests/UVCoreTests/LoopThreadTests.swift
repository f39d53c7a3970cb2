// LoopThread (a loop on its own thread, joined) and Mailbox's batched post from another loop thread.

import Glibc
import Synchronization
import Testing
@testable import UVCore

@Suite struct LoopThreadTests {
    @Test func runsTheBodyOnAnotherThreadAndJoins() throws {
        let caller = pthread_self()
        let ranElsewhere = Mutex(false)
        let name = Mutex("")
        let thread = try LoopThread(name: "qnbd-test-thread") {
            ranElsewhere.withLock { $0 = pthread_equal(pthread_self(), caller) == 0 }
            var buffer = [UInt8](repeating: 0, count: 32)
            let fd = open("/proc/thread-self/comm", O_RDONLY)
            var count = 0
            if fd >= 0 { count = max(read(fd, &buffer, 31), 0); close(fd) }
            let text = String(decoding: buffer[..<count], as: UTF8.self)
            name.withLock { $0 = text.trimmingCharacters(in: "\n") }
        }
        thread.join()
        thread.join()   // idempotent
        #expect(ranElsewhere.withLock { $0 })
        #expect(name.withLock { $0 } == "qnbd-test-threa")   // Linux keeps 15 bytes
        #expect(LoopThread.onlineProcessors >= 1)
    }

    /// A sender gathering messages and posting them per batch: every message arrives once, in order,
    /// and the sender's array comes back empty (its storage reused) after each post.
    @Test func batchedPostsArriveInOrder() throws {
        let loop = try EventLoop()
        var received: [Int] = []
        var mailbox: Mailbox<Int>?
        mailbox = try Mailbox<Int>(loop: loop) { messages in
            received.append(contentsOf: messages)
            if received.count == 20_000 { mailbox?.close() }
        }
        let box = mailbox!
        let emptied = Mutex(true)
        let sender = try LoopThread(name: "sender") {
            var gathered: [Int] = []
            for batch in 0..<200 {
                for i in 0..<100 { gathered.append(batch * 100 + i) }
                box.post(draining: &gathered)
                if !gathered.isEmpty { emptied.withLock { $0 = false } }
                if batch % 50 == 0 { usleep(1000) }
            }
        }
        runLoop(loop)
        sender.join()
        #expect(received == Array(0..<20_000))
        #expect(emptied.withLock { $0 })
        var late = [1, 2]
        box.post(draining: &late)   // after close: dropped, and still emptied
        #expect(late.isEmpty)
        mailbox = nil
        try loop.close()
    }
}

private extension String {
    func trimmingCharacters(in set: Character) -> String { String(self.filter { $0 != set }) }
}
