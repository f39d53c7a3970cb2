// Allocation's state machine alone: the QED-style steps (reserved, copying, reading and inflating a
// compressed source, writing, then linked or undone), failures while copying, abandoning, and the
// completions that cannot happen.

import Testing
@testable import QCow2

@Suite("Allocation")
struct AllocationTests {
    func allocation() -> Allocation {
        Allocation(request: WriteID(slot: 0), l1Index: 0, firstIndex: 3, count: 1, host: 0x10000, oldWords: [0],
                   buffer: nil, writeOffset: 0x10000, source: UnsafeRawBufferPointer(start: nil, count: 0))
    }

    @Test func nothingToCopyWritesAtOnceThenLinks() {
        var a = allocation()
        #expect(a.state == .reserved)
        #expect(a.copiesIssued() == .write && a.state == .writing)
        #expect(a.written(errno: nil) == .link)
    }

    @Test func theWriteWaitsForEveryCopy() {
        var a = allocation()
        a.copyIssued()
        a.copyIssued()
        #expect(a.copiesIssued() == .wait && a.state == .copying(pending: 2))
        #expect(a.copyCompleted(errno: nil) == .wait)
        #expect(a.copyCompleted(errno: nil) == .write && a.state == .writing)
    }

    @Test func aFailedCopyUndoesOnceTheOtherReadsAreBack() {
        var a = allocation()
        a.copyIssued()
        a.copyIssued()
        _ = a.copiesIssued()
        #expect(a.copyCompleted(errno: 5) == .wait)
        #expect(a.copyCompleted(errno: 28) == .undo(5))   // the first failure is the one reported
    }

    @Test func aCompressedSourceIsReadThenInflated() {
        var a = allocation()
        a.compressedReadIssued()
        #expect(a.copiesIssued() == .wait && a.state == .readingCompressed)
        #expect(a.compressedReadCompleted(errno: nil) == .inflate && a.state == .inflating)
        #expect(a.inflated(ok: true) == .write && a.state == .writing)
    }

    @Test func aCompressedSourceThatCannotBeReadOrInflatedUndoes() {
        var unread = allocation()
        unread.compressedReadIssued()
        #expect(unread.compressedReadCompleted(errno: 5) == .undo(5))
        var corrupt = allocation()
        corrupt.compressedReadIssued()
        _ = corrupt.compressedReadCompleted(errno: nil)
        #expect(corrupt.inflated(ok: false) == .undo(EIO_))
    }

    @Test func aFailedWriteUndoes() {
        var a = allocation()
        _ = a.copiesIssued()
        #expect(a.written(errno: 28) == .undo(28))
    }

    @Test func abandoningUndoesNowOrAfterTheReadsInFlight() {
        var idle = allocation()
        #expect(idle.abandon() == .undo(EIO_))
        var copying = allocation()
        copying.copyIssued()
        #expect(copying.abandon() == .wait)
        #expect(copying.copyCompleted(errno: nil) == .undo(EIO_))
    }

    @Test func aCopyCompletionDuringTheWriteTraps() async {
        await #expect(processExitsWith: .failure) {
            var a = Allocation(request: WriteID(slot: 0), l1Index: 0, firstIndex: 0, count: 1, host: 0, oldWords: [0],
                               buffer: nil, writeOffset: 0, source: UnsafeRawBufferPointer(start: nil, count: 0))
            _ = a.copiesIssued()
            _ = a.copyCompleted(errno: nil)
        }
    }

    @Test func aWriteCompletionWhileCopyingTraps() async {
        await #expect(processExitsWith: .failure) {
            var a = Allocation(request: WriteID(slot: 0), l1Index: 0, firstIndex: 0, count: 1, host: 0, oldWords: [0],
                               buffer: nil, writeOffset: 0, source: UnsafeRawBufferPointer(start: nil, count: 0))
            a.copyIssued()
            _ = a.written(errno: nil)
        }
    }

    @Test func aSecondCompressedReadTraps() async {
        await #expect(processExitsWith: .failure) {
            var a = Allocation(request: WriteID(slot: 0), l1Index: 0, firstIndex: 0, count: 1, host: 0, oldWords: [0],
                               buffer: nil, writeOffset: 0, source: UnsafeRawBufferPointer(start: nil, count: 0))
            a.compressedReadIssued()
            a.compressedReadIssued()
        }
    }
}
