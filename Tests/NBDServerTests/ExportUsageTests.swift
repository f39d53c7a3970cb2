// ExportUsage: the connection count every loop's view of an export shares.

import Foundation
@testable import NBDServer
import Synchronization
import Testing

@Suite struct ExportUsageTests {
    @Test func limitsAndRetirement() {
        let usage = ExportUsage()
        #expect(usage.tryAttach(limit: 2) && usage.tryAttach(limit: 2))
        #expect(!usage.tryAttach(limit: 2))
        #expect(usage.tryAttach(limit: nil) && usage.count == 3)
        #expect(usage.detach() == 2)
        #expect(usage.retire() == 2)
        #expect(!usage.tryAttach(limit: nil))
        #expect(usage.detach() == 1 && usage.detach() == 0 && usage.count == 0)
    }

    /// Four threads attach and detach at once, as four loops would: nothing is lost or counted twice.
    @Test func concurrentAttachAndDetachBalance() {
        let usage = ExportUsage()
        let rounds = 20_000
        DispatchQueue.concurrentPerform(iterations: 4) { _ in
            for _ in 0..<rounds {
                precondition(usage.tryAttach(limit: nil))
                usage.detach()
            }
        }
        #expect(usage.count == 0)
        // A limit holds under contention: exactly `limit` of many racing attaches win.
        let winners = Atomic<Int>(0)
        DispatchQueue.concurrentPerform(iterations: 64) { _ in
            if usage.tryAttach(limit: 10) { winners.add(1, ordering: .relaxed) }
        }
        #expect(winners.load(ordering: .relaxed) == 10 && usage.count == 10)
    }
}
