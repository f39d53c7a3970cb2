// The allocator's bookkeeping: free clusters (ready vs quarantined by generation) and the in-flight
// generation count that decides when a freed cluster may be handed out again (H8).

import Testing
@testable import QCow2

@Suite("Allocator: free clusters and in-flight generations")
struct AllocatorStateTests {
    @Test func lowestRunComesFirstWhateverTheInsertOrder() {
        var free = FreeClusters()
        for c: UInt64 in [900, 7, 5, 6, 64, 65, 63, 8] { free.insert(c, freedAt: nil) }
        #expect(free.count == 8)
        #expect(free.takeLowestRun(upTo: 16)! == (5, 4))      // 5 6 7 8
        #expect(free.takeLowestRun(upTo: 2)! == (63, 2))      // 63 64, across a word boundary
        #expect(free.takeLowestRun(upTo: 16)! == (65, 1))
        #expect(free.takeLowestRun(upTo: 16)! == (900, 1))
        #expect(free.takeLowestRun(upTo: 16) == nil)
        #expect(free.isEmpty)
    }

    @Test func aClusterInsertedTwiceIsHandedOutOnce() {
        var free = FreeClusters()
        free.insert(3, freedAt: nil)
        free.insert(3, freedAt: nil)
        #expect(free.count == 1)
        #expect(free.takeLowestRun(upTo: 4)! == (3, 1))
        #expect(free.takeLowestRun(upTo: 4) == nil)
    }

    @Test func quarantinedClustersWaitForOlderRequests() {
        var free = FreeClusters()
        free.insert(10, freedAt: 2)
        free.insert(11, freedAt: 3)
        free.release(oldestInFlight: 1)          // a request from before both frees still runs
        #expect(free.takeLowestRun(upTo: 4) == nil)
        #expect(!free.isEmpty)
        free.release(oldestInFlight: 2)          // the oldest started after the first free
        #expect(free.takeLowestRun(upTo: 4)! == (10, 1))
        free.release(oldestInFlight: nil)        // nothing in flight
        #expect(free.takeLowestRun(upTo: 4)! == (11, 1))
        #expect(free.isEmpty)
    }

    @Test func manyFreeClustersStayCheap() {
        // A trimmed 128 GiB of 64 KiB clusters: 2M free clusters. Every allocation takes the lowest.
        var free = FreeClusters()
        let n: UInt64 = 1 << 21
        for c in stride(from: n - 1, through: 0, by: -1) { free.insert(c, freedAt: nil) }
        for expected in 0..<UInt64(1000) {
            #expect(free.takeLowestRun(upTo: 1)!.first == expected)
        }
        #expect(free.count == Int(n) - 1000)
    }

    @Test func oldestGenerationTracksPinsAndUnpinsInAnyOrder() {
        var g = InFlightGenerations()
        #expect(g.oldest == nil)
        g.pin(1); g.pin(1); g.pin(4); g.pin(9)
        #expect(g.oldest == 1)
        g.unpin(4)
        #expect(g.oldest == 1)
        g.unpin(1)
        #expect(g.oldest == 1)
        g.unpin(1)
        #expect(g.oldest == 9)                   // 4 was already gone
        g.pin(9)
        g.unpin(9)
        #expect(g.oldest == 9)
        g.unpin(9)
        #expect(g.oldest == nil)
        g.pin(12)
        #expect(g.oldest == 12)
    }

    @Test func longRunsOfGenerationsCompact() {
        var g = InFlightGenerations()
        g.pin(0)                                  // one old request that stays in flight
        for value in 1...10_000 as ClosedRange<UInt64> {
            let gen = Generation(value)
            g.pin(gen)
            g.unpin(gen)
        }
        #expect(g.oldest == 0)
        g.unpin(0)
        #expect(g.oldest == nil)
    }
}

// Literal generations keep these tables of pins and frees readable; the engine itself has no literal
// conformance, so that no integer turns into a Generation there by accident.
extension Generation: ExpressibleByIntegerLiteral {
    public init(integerLiteral value: UInt64) { self.init(value) }
}
