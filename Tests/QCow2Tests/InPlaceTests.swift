// QCow2Engine's in-place fast path (QCow2Engine+InPlace), asked directly as the driver asks it:
// when it answers, what it answers, and that it keeps the general path's rules (a flush syncs what
// it wrote; a pinned generation keeps a trimmed cluster from reuse while the write runs).

import BlockDevice
import Foundation
import Testing
@testable import QCow2

@Suite("Engine: in-place fast path")
struct InPlaceTests {
    let u = UInt64(cs)

    /// An image whose clusters 0 and 3 hold data; the shell with the L2 table cached.
    private func cachedShell() throws -> (WriteShell, host0: UInt64, host3: UInt64) {
        var host0: UInt64 = 0, host3: UInt64 = 0
        let img = writableImage { img in
            host0 = img.mapData(0, patternBytes(1, cs))
            host3 = img.mapData(3, patternBytes(3, cs))
        }
        let shell = try WriteShell(img)
        shell.read(100, 3 * cs, 10)
        shell.runAll()
        #expect(shell.succeeded(100))
        return (shell, host0, host3)
    }

    @Test func anOverwriteOfACachedOwnedClusterIsAnsweredAtOnce() throws {
        let (shell, _, host3) = try cachedShell()
        let engine = shell.engine
        let write = try #require(engine.beginInPlaceWrite(offset: 3 * u + 10, count: 100, fua: false))
        #expect(write.host == host3 + 10)
        #expect(!engine.hasActions, "the fast path issues nothing through the outbox")
        #expect(engine.activeRequests == 1)
        #expect(engine.fastPathWrites == 1)
        guard case .done = engine.finishInPlaceWrite(write, errno: nil) else {
            Issue.record("the write did not succeed")
            return
        }
        #expect(engine.activeRequests == 0)
        guard case .failed(let error) = engine.finishInPlaceWrite(
            try #require(engine.beginInPlaceWrite(offset: 0, count: cs, fua: false)), errno: EIO_) else {
            Issue.record("a failed write succeeded")
            return
        }
        #expect(error.errno == EIO_)
        #expect(engine.failure == nil, "a data write error fails only its request")
    }

    @Test func everythingElseGoesToTheGeneralPath() throws {
        // An uncached table.
        let img = writableImage { $0.mapData(3, patternBytes(3, cs)) }
        let cold = try WriteShell(img)
        #expect(cold.engine.beginInPlaceWrite(offset: 3 * u, count: 10, fua: false) == nil)
        #expect(!cold.engine.hasActions)

        let (shell, _, _) = try cachedShell()
        let engine = shell.engine
        #expect(engine.beginInPlaceWrite(offset: 3 * u, count: 0, fua: false) == nil)
        #expect(engine.beginInPlaceWrite(offset: 3 * u, count: 10, fua: true) == nil)            // FUA
        #expect(engine.beginInPlaceWrite(offset: 3 * u + 500, count: 20, fua: false) == nil)     // spans clusters 3 and 4
        #expect(engine.beginInPlaceWrite(offset: 2 * u, count: 10, fua: false) == nil)           // unallocated
        #expect(engine.beginInPlaceWrite(offset: UInt64(tableSpan), count: 10, fua: false) == nil)  // no L2 table
        // A reservation on the cluster (an allocation or COW of it in flight).
        engine.writableState!.reservations[3] = AllocationID(slot: 0)
        #expect(engine.beginInPlaceWrite(offset: 3 * u, count: 10, fua: false) == nil)
        engine.writableState!.reservations[3] = nil
        #expect(engine.beginInPlaceWrite(offset: 3 * u, count: 10, fua: false) != nil)
        // A failed image.
        engine.markFailed("test")
        #expect(engine.beginInPlaceWrite(offset: 3 * u, count: 10, fua: false) == nil)
        #expect(engine.fastPathWrites == 1)
    }

    @Test func entriesOtherThanNormalAndCopiedGoToTheGeneralPath() throws {
        var hosts: [UInt64] = []
        let img = writableImage { img in
            hosts.append(img.mapData(0, patternBytes(1, cs)))
            img.mapZero(1)
            img.mapZeroAllocated(2)
            img.mapCompressed(3, payload: patternBytes(4, 16))
            let shared = img.mapData(4, patternBytes(5, cs))
            img.setL2(4, shared)   // COPIED clear: as if a snapshot shared it
        }
        let shell = try WriteShell(img)
        shell.read(100, 0, 10)
        shell.runAll()
        for cluster in 1...4 {
            #expect(shell.engine.beginInPlaceWrite(offset: UInt64(cluster) * u, count: 10, fua: false) == nil, "cluster \(cluster)")
        }
        #expect(shell.engine.beginInPlaceWrite(offset: 0, count: 10, fua: false)?.host == hosts[0])
    }

    @Test func aMetadataTargetGoesToTheGeneralPathWhichReportsIt() throws {
        let img = writableImage { img in
            img.mapData(0, patternBytes(1, cs))
            let table = img.l2Table(0)
            img.setL2(1, table | L2Entry.copied)   // points at its own L2 table
        }
        let shell = try WriteShell(img)
        shell.read(100, 0, 10)
        shell.runAll()
        #expect(shell.engine.beginInPlaceWrite(offset: u, count: 10, fua: false) == nil)
        shell.write(1, cs, patternBytes(9, 10))
        #expect(shell.error(1)?.errno == EIO_)
        shell.runAll()   // the corrupt bit's header write, whose buffer is freed when it completes
    }

    /// A flush covers the fast-path writes completed before it: it syncs the data before it answers.
    @Test func aFlushAfterAFastPathWriteSyncsIt() throws {
        let (shell, _, _) = try cachedShell()
        shell.flush(1)
        shell.runAll()
        #expect(shell.succeeded(1))
        #expect(shell.syncCount == 0, "nothing written, nothing to sync")
        let write = try #require(shell.engine.beginInPlaceWrite(offset: 3 * u, count: 10, fua: false))
        _ = shell.engine.finishInPlaceWrite(write, errno: nil)
        shell.flush(2)
        #expect(!shell.done(2), "the flush answers only once its sync is back")
        #expect(shell.held.count == 1 && shell.log.last?.op == .sync)
        shell.runAll()
        #expect(shell.succeeded(2))
        #expect(shell.syncCount == 1)
    }

    /// H8: a cluster trimmed while a fast-path write to it runs is neither punched nor reused until
    /// the write is back.
    @Test func aTrimmedClusterIsNotReusedWhileAFastPathWriteToItRuns() throws {
        let (shell, host0, _) = try cachedShell()
        let write = try #require(shell.engine.beginInPlaceWrite(offset: 0, count: cs, fua: false))
        #expect(write.host == host0)
        shell.trim(1, 0, cs)
        #expect(shell.done(1))
        shell.flush(2)
        shell.runAll()
        #expect(shell.succeeded(2))
        #expect(shell.engine.writableState!.refcounts.refcount(ofCluster: host0 / u) == 0)
        shell.write(3, 6 * cs + 3, patternBytes(7, 10))   // partial: allocates one cluster
        shell.write(4, 7 * cs, patternBytes(8, cs))        // whole
        shell.flush(5)
        shell.runAll()
        #expect(shell.succeeded(3) && shell.succeeded(4) && shell.succeeded(5))
        let touched = shell.log.filter(\.issued).compactMap { e -> UInt64? in
            switch e.op {
            case .write(let o, _), .punch(let o, _): o / u
            default: nil
            }
        }
        #expect(!touched.contains(host0 / u), "\(shell.log)")
        _ = shell.engine.finishInPlaceWrite(write, errno: nil)
        // Once the write is back the cluster may be handed out again.
        shell.write(6, 8 * cs + 3, patternBytes(9, 10))
        shell.runAll()
        #expect(shell.succeeded(6))
        #expect(shell.log.contains { $0.issued && $0.op == .write(host0, cs) }, "\(shell.log)")
    }
}
