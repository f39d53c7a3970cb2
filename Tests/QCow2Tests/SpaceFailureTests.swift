// Metadata writes refused for lack of space (ENOSPC, EDQUOT) are survivable: the flush fails with that
// errno, what it captured stays dirty, and once writes succeed again a later flush makes everything
// durable, the image consistent. Any other failure, and every failed sync, turns the image read-only
// with a reason naming the structure and the errno.

import BlockDevice
import Foundation
import Testing
@testable import QCow2

@Suite("Engine: metadata writes refused for space")
struct SpaceFailureTests {
    let u = UInt64(cs)

    /// A shell whose durable image is checked at every sync point.
    func checkedShell(_ img: TestImage) throws -> WriteShell {
        let shell = try WriteShell(img)
        var points = 0
        shell.onDurable = { durable, written in
            points += 1
            for p in ImageCheck(durable, written: written).problems.prefix(3) {
                Issue.record(Comment(rawValue: "sync point \(points): \(p)"))
            }
        }
        return shell
    }

    func isWrite(of kind: WriteShell.Kind, in shell: WriteShell) -> (IOAction) -> Bool {
        { [unowned shell] in $0.isWriteFile && shell.kind(of: $0) == kind }
    }

    /// Flushes with `tag`, failing the first write of `kind` with `errno`; returns whether there was one.
    func flushFailing(_ shell: WriteShell, _ tag: RequestTag, _ kind: WriteShell.Kind, errno: Int32) -> Bool {
        let target = isWrite(of: kind, in: shell)
        shell.flush(tag)
        shell.runAll(keep: target)
        guard shell.run(first: target, fail: errno) else { return false }
        shell.runAll()
        return true
    }

    static let refusals: [(WriteShell.Kind, Int32)] = [(.refblock, 28), (.l2, 28), (.l1, 28), (.refblock, 122), (.l2, 122)]

    @Test(arguments: refusals)
    func aFlushRefusedForSpaceIsRetriedByTheNextFlush(kind: WriteShell.Kind, errno: Int32) throws {
        var trimmed: UInt64 = 0
        let img = writableImage { img in
            img.mapData(0, patternBytes(1, cs))
            trimmed = img.mapData(1, patternBytes(2, cs)) / UInt64(cs)
        }
        let shell = try checkedShell(img)
        var model = img.expected
        func put(_ tag: RequestTag, _ at: Int, _ x: [UInt8], fua: Bool = false) {
            shell.write(tag, at, x, fua: fua)
            model.put(x, at: at)
        }
        put(1, 3 * cs + 5, patternBytes(3, 100))        // a new cluster in table 0: refblock and L2
        put(2, 2 * tableSpan + 7, patternBytes(4, 50))  // a new table: refblock, L2 and L1
        shell.trim(3, cs, cs)                           // a free, applied only after a durable flush
        model.put(zeros(cs), at: cs)
        shell.runAll()
        // An in-place FUA write: the flush it asks for is refused.
        let target = isWrite(of: kind, in: shell)
        put(4, 10, patternBytes(5, 20), fua: true)
        shell.runAll(keep: target)
        #expect(shell.run(first: target, fail: errno))
        shell.runAll()
        #expect(shell.error(4)?.errno == errno)
        #expect(shell.engine.failure == nil && shell.engine.isDirty)
        // Refused again, so the retry itself is retried.
        #expect(flushFailing(shell, 10, kind, errno: errno))
        #expect(shell.error(10)?.errno == errno)
        // The trimmed cluster's removal was never durable: it is still counted and not handed out.
        #expect(shell.engine.writableState!.refcounts.refcount(ofCluster: trimmed) == 1)
        // Space is back: writes go on, and one flush makes everything durable.
        put(12, 5 * cs, patternBytes(6, cs))
        shell.runAll()
        #expect(shell.succeeded(12))
        flushAndCheck(shell, tag: 13, model: model, noLeaks: false)
        #expect(shell.engine.writableState!.refcounts.refcount(ofCluster: trimmed) == 0)
        // The trim's decrease, applied at the end of that flush, is durable after the next.
        flushAndCheck(shell, tag: 14, model: model)
        expectCrashOrder(shell.log)
    }

    /// A flush that moves the refcount table to a bigger one, refused at the new table, at the header
    /// switch, or after the switch is durable (at an L2 table).
    @Test(arguments: [WriteShell.Kind.reftable, .header, .l2])
    func aRefusedFlushThatMovesTheRefcountTableMovesItLater(kind: WriteShell.Kind) throws {
        let img = writableImage(size: 16 << 20)
        let shell = try WriteShell(img)
        shell.trackDurability = false
        var model = img.expected
        // 9 MiB of data needs more refcount blocks than the one-cluster table holds.
        for k in 0..<9 {
            let x = patternBytes(UInt64(k + 1), 1 << 20)
            shell.write(RequestTag(k + 1), k << 20, x)
            model.put(x, at: k << 20)
            shell.runAll()
        }
        let moved = try #require(shell.engine.writableState!.refcounts.movedTable)
        let oldTable = shell.file.be64(48)
        #expect(flushFailing(shell, 20, kind, errno: 28))
        #expect(shell.error(20)?.errno == 28 && shell.engine.failure == nil)
        let switched = kind == .l2
        #expect(shell.file.be64(48) == (switched ? moved.offset : oldTable))
        // The durable state is consistent whatever the failure left half done.
        expectConsistent(shell.file, written: shell.written, "after the refused flush")
        let x = patternBytes(99, 3 * cs)
        shell.write(21, 12 << 20, x)
        model.put(x, at: 12 << 20)
        shell.runAll()
        shell.flush(22)
        shell.runAll()
        #expect(shell.succeeded(22))
        #expect(shell.file.be64(48) == shell.engine.writableState!.refcounts.tableOffset && shell.file.be64(48) != oldTable)
        expectCrashOrder(shell.log)
        // The old table's free, applied at the end of that flush, is durable after the next: no leaks.
        shell.flush(23)
        shell.runAll()
        let check = ImageCheck(shell.file, written: shell.written)
        #expect(check.problems.isEmpty && check.leaks.isEmpty, "\(check.problems.prefix(3)) leaks \(check.leaks.prefix(10))")
        expectSameBytes(readBack(shell.file), model, "file")
    }

    @Test func aRefusedTableMoveOvertakenByAnotherGrowthGivesItsTableBack() throws {
        let img = writableImage(size: 32 << 20)
        let shell = try WriteShell(img)
        shell.trackDurability = false
        var model = img.expected
        func put(_ k: Int) {
            let x = patternBytes(UInt64(k + 1), 1 << 20)
            shell.write(RequestTag(k + 1), k << 20, x)
            model.put(x, at: k << 20)
        }
        let target = isWrite(of: .reftable, in: shell)
        for k in 0..<9 {
            put(k)
            shell.runAll()
        }
        let first = try #require(shell.engine.writableState!.refcounts.movedTable)
        shell.flush(100)
        shell.runAll(keep: target)
        #expect(shell.indices(target).count == 1)
        // While the new table is being written, the data outgrows it: a bigger one is built.
        for k in 9..<25 {
            put(k)
            shell.runAll(keep: target)
        }
        let second = try #require(shell.engine.writableState!.refcounts.movedTable)
        #expect(second.clusters > first.clusters)
        #expect(shell.run(first: target, fail: 28))
        shell.runAll()
        #expect(shell.error(100)?.errno == 28)
        // The refused table was never referenced: it is free again, not leaked.
        let c = UInt64(first.offset) / u
        #expect((0..<UInt64(first.clusters)).allSatisfy { shell.engine.writableState!.refcounts.refcount(ofCluster: c + $0) == 0 })
        shell.flush(101)
        shell.runAll()
        #expect(shell.succeeded(101) && shell.file.be64(48) == second.offset)
        shell.flush(102)
        shell.runAll()
        let check = ImageCheck(shell.file, written: shell.written)
        #expect(check.problems.isEmpty && check.leaks.isEmpty, "\(check.problems.prefix(3)) leaks \(check.leaks.prefix(10))")
        expectSameBytes(readBack(shell.file), model, "file")
    }

    @Test func aDataWriteRefusedForSpaceIsNotLinkedAndLeavesNoLeak() throws {
        let img = writableImage { $0.l2Table(0) }
        let shell = try checkedShell(img)
        var model = img.expected
        shell.write(1, 4 * cs, patternBytes(1, 2 * cs))
        shell.runAll(keep: \.isWriteFile)
        #expect(shell.run(first: \.isWriteFile, fail: 28))
        shell.runAll()
        #expect(shell.error(1)?.errno == 28)
        #expect(shell.engine.failure == nil)
        let x = patternBytes(2, 300)
        shell.write(2, 9 * cs + 1, x)
        model.put(x, at: 9 * cs + 1)
        shell.runAll()
        #expect(shell.succeeded(2))
        flushAndCheck(shell, tag: 3, model: model, noLeaks: false)
        flushAndCheck(shell, tag: 4, model: model)
    }

    @Test func aFailedSyncTurnsTheImageReadOnlyEvenForSpace() throws {
        let img = writableImage { $0.l2Table(0) }
        let shell = try checkedShell(img)
        shell.write(1, 3 * cs, patternBytes(1, 100))
        shell.write(2, 2 * tableSpan, patternBytes(2, 100))
        shell.runAll()
        shell.flush(3)
        // The refblock stage, then its sync: the L2 tables and L1 depend on that sync.
        shell.runAll(keep: \.isSync)
        #expect(shell.run(first: \.isSync))
        shell.runAll(keep: \.isSync)
        let before = shell.log.count
        #expect(shell.run(first: \.isSync, fail: 28))
        #expect(shell.error(3)?.errno == 5)
        let failure = try #require(shell.engine.failure)
        #expect(failure.contains("syncing after the L2 table writes") && failure.contains("ENOSPC (errno 28)"), "\(failure)")
        // Nothing that depends on the failed sync went out, then or later.
        #expect(shell.held.isEmpty)
        #expect(!shell.log[before...].contains { $0.issued && $0.kind == .l1 })
        shell.write(4, 0, patternBytes(3, 10))
        shell.flush(5)
        #expect(shell.error(4)?.errno == 5 && shell.error(5)?.errno == 5)
        #expect(shell.held.isEmpty)
    }

    @Test func aMetadataWriteErrorNamesTheStructure() throws {
        let img = writableImage { $0.l2Table(0) }
        let shell = try checkedShell(img)
        shell.write(1, 3 * cs, patternBytes(1, 100))
        shell.runAll()
        let table = shell.engine.l1[0] & L1Entry.offsetMask
        #expect(flushFailing(shell, 2, .l2, errno: 5))
        #expect(shell.error(2)?.errno == 5)
        let failure = try #require(shell.engine.failure)
        #expect(failure == "qcow2 metadata: writing the L2 table at \(hex(table)) failed: EIO (errno 5)")
        expectConsistent(shell.durable, written: shell.durableWritten)
    }
}
