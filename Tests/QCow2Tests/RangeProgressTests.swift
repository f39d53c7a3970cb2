// RangeProgress alone: the walk of a read or write over its range (resolve, park and resume, issue,
// drain), failures that stop the walk but wait for the I/O already out, the FUA hold, and the steps
// that cannot happen.

import BlockDevice
import Testing
@testable import QCow2

@Suite("RangeProgress")
struct RangeProgressTests {
    enum Wait { case table }
    enum Hold { case flush }

    @Test func aWalkIssuesThenDrainsAndIsAnsweredAfterTheLastCompletion() {
        var p = RangeProgress<Wait, Hold>(length: 3000)
        p.issue(1000)
        p.skip(500)
        p.issue(1500)
        #expect(p.position == 3000 && p.pending == 2 && !p.hasRemaining)
        let atEnd = p.reachedEnd()
        #expect(!atEnd && !p.canBeAnswered)
        let afterFirst = p.completed(nil)
        let afterSecond = p.completed(nil)
        #expect(!afterFirst && afterSecond)
        #expect(p.canBeAnswered && p.error == nil)
    }

    @Test func completionsDuringTheWalkDoNotAnswerEarly() {
        var p = RangeProgress<Wait, Hold>(length: 2000)
        p.issue(1000)
        let early = p.completed(nil)    // back before the walk reached the end
        #expect(!early)
        p.park(.table)
        p.resume()
        p.skip(1000)
        let atEnd = p.reachedEnd()      // nothing pending: answerable at once
        #expect(atEnd)
    }

    @Test func aParkedWalkResumesAtItsCursor() {
        var p = RangeProgress<Wait, Hold>(length: 4096)
        p.skip(512)
        p.park(.table)
        guard case .waiting(.table) = p.state else { Issue.record("not parked: \(p.state)"); return }
        p.resume()
        #expect(p.position == 512 && p.remaining == 3584)
    }

    @Test func theFirstFailureWinsAndTheRequestWaitsForItsIO() {
        var p = RangeProgress<Wait, Hold>(length: 8192)
        p.issue(4096)
        let failed = p.fail(BlockError(errno: 5))   // one I/O still out: not answerable yet
        #expect(!failed && p.position == 8192)
        let drained = p.completed(BlockError(errno: 28))
        #expect(drained && p.error?.errno == 5)
    }

    @Test func aParkedRequestCanFail() {
        var p = RangeProgress<Wait, Hold>(length: 100)
        p.park(.table)
        let failed = p.fail(BlockError(errno: 5))
        #expect(failed && p.canBeAnswered)
    }

    @Test func aDrainedWriteIsHeldForItsFlush() {
        var p = RangeProgress<Wait, Hold>(length: 10)
        p.issue(10)
        let atEnd = p.reachedEnd()
        let drained = p.completed(nil)
        #expect(!atEnd && drained)
        p.hold(.flush)
        #expect(p.canBeAnswered)
        guard case .holding(.flush) = p.state else { Issue.record("not held: \(p.state)"); return }
    }

    @Test func resumingWithoutAWaitTraps() async {
        await #expect(processExitsWith: .failure) {
            var p = RangeProgress<Wait, Hold>(length: 10)
            p.resume()
        }
    }

    @Test func issuingPastTheEndTraps() async {
        await #expect(processExitsWith: .failure) {
            var p = RangeProgress<Wait, Hold>(length: 10)
            p.issue(11)
        }
    }

    @Test func issuingWhileParkedTraps() async {
        await #expect(processExitsWith: .failure) {
            var p = RangeProgress<Wait, Hold>(length: 10)
            p.park(.table)
            p.skip(5)
        }
    }

    @Test func aCompletionWithNothingPendingTraps() async {
        await #expect(processExitsWith: .failure) {
            var p = RangeProgress<Wait, Hold>(length: 10)
            p.skip(10)
            _ = p.reachedEnd()
            _ = p.completed(nil)
        }
    }

    @Test func holdingAFailedRequestTraps() async {
        await #expect(processExitsWith: .failure) {
            var p = RangeProgress<Wait, Hold>(length: 10)
            _ = p.fail(BlockError(errno: 5))
            p.hold(.flush)
        }
    }

    @Test func endingTheWalkWithBytesLeftTraps() async {
        await #expect(processExitsWith: .failure) {
            var p = RangeProgress<Wait, Hold>(length: 10)
            p.skip(4)
            _ = p.reachedEnd()
        }
    }
}
