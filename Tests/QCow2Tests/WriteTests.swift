// QCow2Engine's write path, driven by WriteShell: allocation, reservations, COW, frees and failures.
// Every test ends by reading the durable image back through a fresh read-only engine and checking its
// refcounts against its references.

import BlockDevice
import Foundation
import Testing
@testable import QCow2

/// A writable image of `size` bytes (512-byte clusters) with whatever `build` places, refcounts exact.
func writableImage(size: Int = 4 * tableSpan, backing: Bool = false, _ build: (inout TestImage) -> Void = { _ in }) -> TestImage {
    var img = TestImage(size: UInt64(size), backingName: backing ? "b.raw" : nil)
    build(&img)
    img.countReferences()
    return img
}

extension Array where Element == UInt8 {
    mutating func put(_ bytes: [UInt8], at offset: Int) {
        replaceSubrange(offset..<offset + bytes.count, with: bytes)
    }
}

/// Flushes, completes everything, and checks the durable image: consistent, no leaks when asked, and
/// reading back as `model`.
func flushAndCheck(_ shell: WriteShell, tag: RequestTag, model: [UInt8], backing: [UInt8]? = nil, noLeaks: Bool = true,
                   sourceLocation: SourceLocation = #_sourceLocation) {
    shell.flush(tag)
    shell.runAll()
    #expect(shell.succeeded(tag), "flush \(tag): \(String(describing: shell.error(tag)))", sourceLocation: sourceLocation)
    let check = ImageCheck(shell.durable, written: shell.durableWritten)
    #expect(check.problems.isEmpty, "\(check.problems.prefix(5))", sourceLocation: sourceLocation)
    if noLeaks { #expect(check.leaks.isEmpty, "leaked clusters \(check.leaks)", sourceLocation: sourceLocation) }
    expectSameBytes(readBack(shell.durable, backing: backing, sourceLocation: sourceLocation), model, "durable image",
                    sourceLocation: sourceLocation)
}

func writeAt(_ action: IOAction) -> (offset: UInt64, count: Int)? {
    if case .writeFile(_, let o, let b, _) = action { return (o, b.count) }
    return nil
}

@Suite("Engine: writes")
struct EngineWriteTests {
    let u = UInt64(cs)

    // 1 (H1)
    @Test func twoWritesToOneUnallocatedClusterAllocateOnce() throws {
        let img = writableImage { $0.l2Table(0) }
        let table = img.l1[0] & L1Entry.offsetMask
        let shell = try WriteShell(img)
        let end = shell.engine.writableState!.refcounts.endCluster
        let host = end * u
        var model = img.expected
        let a = patternBytes(1, 100), b = patternBytes(2, 150), c = patternBytes(3, 60)
        shell.write(1, 5 * cs + 10, a)
        shell.write(2, 5 * cs + 300, b)
        shell.write(3, 5 * cs + 50, c)    // overlaps the first write's bytes: issued later, so it wins
        model.put(a, at: 5 * cs + 10)
        model.put(b, at: 5 * cs + 300)
        model.put(c, at: 5 * cs + 50)
        #expect(shell.held.count == 1 && shell.held[0].isRead(at: table))   // one load for all three
        shell.run(0)
        // The first allocated the cluster (fresh past the end of the file: only its bytes are written);
        // the others are parked on its reservation.
        #expect(shell.held.count == 1)
        #expect(writeAt(shell.held[0])! == (host + 10, 100))
        #expect(shell.engine.writableState!.refcounts.endCluster == end + 1)
        #expect(shell.engine.writableState!.reservations.count == 1)
        shell.run(0)
        // Linked: both waiters re-resolve and write in place into the same host cluster.
        #expect(shell.done(1) && !shell.done(2) && !shell.done(3))
        #expect(shell.held.compactMap(writeAt).map(\.offset) == [host + 300, host + 50])
        #expect(shell.engine.writableState!.reservations.isEmpty)
        shell.runAll(.lifo)
        #expect(shell.finished == [1, 3, 2])
        #expect(shell.engine.writableState!.refcounts.endCluster == end + 1)
        let dataWrites = shell.log.filter { $0.issued && $0.op != .read(table, cs) }
        #expect(dataWrites.allSatisfy { if case .write(let o, _) = $0.op { o / u == end } else { false } })
        flushAndCheck(shell, tag: 9, model: model)
        #expect(ImageCheck(shell.durable).refcount(end) == 1)
    }

    @Test func writersParkedOnACOWAllocationSeeItsData() throws {
        // The first write needs COW from an old cluster shared with a snapshot (COPIED clear).
        var img = writableImage { img in
            let h = img.mapData(2, patternBytes(20, cs))
            img.setL2(2, h)   // COPIED clear
        }
        let old = img.file.be64(Int(img.l1[0] & L1Entry.offsetMask) + 16) & L2Entry.offsetMask
        img.file.setBE16(2, at: 2 * cs + 2 * Int(old / u))   // a snapshot holds the other reference
        let shell = try WriteShell(img)
        let end = shell.engine.writableState!.refcounts.endCluster
        var model = img.expected
        let a = patternBytes(21, 40), b = patternBytes(22, 40)
        shell.write(1, 2 * cs + 100, a)
        shell.write(2, 2 * cs + 400, b)
        model.put(a, at: 2 * cs + 100)
        model.put(b, at: 2 * cs + 400)
        shell.run(0)   // the table
        // The first copies the old cluster around its bytes; the second waits for it.
        #expect(shell.held.count == 2 && shell.held.allSatisfy { $0.isRead(at: old) || $0.isRead(at: old + 140) })
        shell.runAll(.random(7))
        #expect(shell.succeeded(1) && shell.succeeded(2))
        #expect(shell.log.filter { $0.issued && $0.op == .write(end * u, cs) }.count == 1)
        #expect(shell.log.contains { $0.issued && $0.op == .write(end * u + 400, 40) })
        #expect(shell.engine.writableState!.refcounts.endCluster == end + 1)
        // The shared cluster is only dereferenced: 2 → 1 (the leak is the faked snapshot's reference).
        flushAndCheck(shell, tag: 9, model: model, noLeaks: false)
        #expect(shell.engine.writableState!.refcounts.refcount(ofCluster: old / u) == 1)
        flushAndCheck(shell, tag: 10, model: model, noLeaks: false)
        #expect(ImageCheck(shell.durable).leaks == [old / u])
    }

    // 2
    @Test func writesIntoANewTableDoNotWaitForEachOther() throws {
        let img = writableImage()
        let shell = try WriteShell(img)
        let end = shell.engine.writableState!.refcounts.endCluster
        var model = img.expected
        let a = patternBytes(1, 200), b = patternBytes(2, 2 * cs), c = patternBytes(3, 5)
        shell.write(1, tableSpan + 100, a)           // cluster 64: creates table 1
        shell.write(2, tableSpan + cs, b)            // clusters 65-66
        shell.write(3, tableSpan + 10 * cs + 7, c)   // cluster 74
        model.put(a, at: tableSpan + 100)
        model.put(b, at: tableSpan + cs)
        model.put(c, at: tableSpan + 10 * cs + 7)
        // No load, one table, three data writes in flight at once.
        #expect(shell.held.count == 3 && shell.held.allSatisfy(\.isWriteFile))
        #expect(shell.engine.l1[1] == end * u | L2Entry.copied)
        #expect(shell.held.compactMap(writeAt).map(\.offset) == [(end + 1) * u + 100, (end + 2) * u, (end + 4) * u + 7])
        #expect(shell.engine.writableState!.refcounts.endCluster == end + 5)
        shell.runAll(.lifo)
        #expect(shell.finished == [3, 2, 1])
        #expect(shell.engine.l1[1] == end * u | L2Entry.copied)
        flushAndCheck(shell, tag: 9, model: model)
    }

    @Test func writesWaitingForATableLoadProceedTogether() throws {
        let img = writableImage { img in
            img.mapData(0, patternBytes(10, cs))
            img.mapData(3, patternBytes(13, cs))
        }
        let table = img.l1[0] & L1Entry.offsetMask
        let host0 = img.file.be64(Int(table)) & L2Entry.offsetMask
        let shell = try WriteShell(img)
        var model = img.expected
        let a = patternBytes(1, 100), b = patternBytes(2, cs), c = patternBytes(3, 50), d = patternBytes(4, 30)
        shell.write(1, cs + 5, a)       // cluster 1: allocating, partial
        shell.write(2, 2 * cs, b)       // cluster 2: allocating, whole
        shell.write(3, 10, c)           // cluster 0: in place
        shell.write(4, 3 * cs + 9, d)   // cluster 3: in place
        for (x, at) in [(a, cs + 5), (b, 2 * cs), (c, 10), (d, 3 * cs + 9)] { model.put(x, at: at) }
        #expect(shell.held.count == 1 && shell.held[0].isRead(at: table))
        shell.run(0)
        // All four issued their data writes; none waits for another.
        #expect(shell.held.count == 4 && shell.held.allSatisfy(\.isWriteFile))
        #expect(shell.held.contains { $0.isWrite(at: host0 + 10) })
        shell.runAll(.random(3))
        #expect(Set(shell.finished) == [1, 2, 3, 4])
        #expect(shell.log.filter { $0.issued && $0.op == .read(table, cs) }.count == 1)
        flushAndCheck(shell, tag: 9, model: model)
    }

    // 3
    @Test func aReadRacingAnAllocatingWriteSeesOldOrNewNeverHalf() throws {
        let backing = patternBytes(30, 2 * tableSpan)
        let img = writableImage(backing: true) { $0.l2Table(0) }
        let shell = try WriteShell(img, backing: backing)
        let host = shell.engine.writableState!.refcounts.endCluster * u
        var model = img.guestBytes(0, Int(img.header.size), backing: backing)
        let old = Array(model[cs..<2 * cs])
        let a = patternBytes(31, 50)
        shell.write(1, cs + 100, a)
        model.put(a, at: cs + 100)
        shell.run(0)   // the table
        // COW of head and tail from the backing image.
        #expect(shell.indices(\.isReadBacking).count == 2)
        shell.run(first: \.isReadBacking)
        shell.read(2, cs, cs)   // before the link, while the COW is half done
        shell.run(first: \.isReadBacking)
        // Now the merged cluster write is in flight.
        #expect(shell.held.contains { $0.isWrite(at: host) })
        shell.read(3, cs + 80, 100)   // still before the link
        // Both reads go to the backing image, never to the cluster being written.
        #expect(shell.indices(\.isReadBacking).count == 2)
        #expect(!shell.held.contains { $0.isRead(at: host) || $0.isRead(at: host + 80) })
        shell.run(first: { $0.isWrite(at: host) })   // data in the file; link
        #expect(shell.done(1))
        shell.runAll(.lifo)
        #expect(shell.bytes(2) == old)
        #expect(shell.bytes(3) == Array(old[80..<180]))
        // After the link: the new cluster.
        shell.read(4, cs, cs)
        #expect(shell.held.count == 1 && shell.held[0].isRead(at: host))
        shell.runAll()
        #expect(shell.bytes(4) == Array(model[cs..<2 * cs]))
        flushAndCheck(shell, tag: 9, model: model, backing: backing)
    }

    @Test func aReadRacingAnAllocatingWriteWithoutBackingReadsZeros() throws {
        let img = writableImage { $0.l2Table(0) }
        let shell = try WriteShell(img)
        shell.write(1, 0, patternBytes(1, cs))
        shell.run(0)
        #expect(shell.held.count == 1 && shell.held[0].isWriteFile)
        shell.read(2, 0, cs)
        #expect(shell.done(2) && shell.bytes(2) == zeros(cs))   // zeros from memory, no I/O
        shell.runAll()
        shell.read(3, 0, cs)
        shell.runAll()
        #expect(shell.bytes(3) == patternBytes(1, cs))
    }

    // 5 (H9)
    @Test func capturedTablesAreNotEvictedBeforeTheFlushWritesThem() throws {
        // Six tables on disk with one data cluster each; a cache of four.
        let img = writableImage(size: 8 * tableSpan) { img in
            for t in 0..<6 { img.mapData(t * 64, patternBytes(UInt64(t), cs)) }
        }
        let shell = try WriteShell(img, cacheBytes: 1)
        var model = img.expected
        for t in 0..<4 {
            let x = patternBytes(UInt64(40 + t), cs)
            shell.write(RequestTag(t + 1), (t * 64 + 1) * cs, x)
            model.put(x, at: (t * 64 + 1) * cs)
        }
        shell.runAll()
        #expect(shell.engine.cache.slots.count == 4)
        shell.flush(10)
        // The pipeline holds snapshots of four tables; keep it waiting at its first stage.
        #expect(shell.held.count == 1 && shell.held[0].isWrite(at: 2 * u))
        // Loading tables 4 and 5 needs room...
        shell.read(11, 4 * tableSpan, cs)
        shell.read(12, 5 * tableSpan, cs)
        shell.runAll(keep: { $0.isWrite(at: 2 * u) })
        // ...but a table whose snapshot is not written yet stays: reading it again needs no load.
        for t in 0..<4 {
            shell.read(RequestTag(20 + t), (t * 64 + 1) * cs, cs)
            shell.runAll(keep: { $0.isWrite(at: 2 * u) })
            expectSameBytes(shell.bytes(RequestTag(20 + t)), Array(model[(t * 64 + 1) * cs..<(t * 64 + 2) * cs]), "table \(t)")
        }
        // Writes after the capture land in live tables and the next flush.
        let y = patternBytes(50, 10)
        shell.write(30, 2 * cs + 7, y)
        model.put(y, at: 2 * cs + 7)
        shell.runAll()
        #expect(shell.succeeded(10) && shell.succeeded(30))
        flushAndCheck(shell, tag: 31, model: model)
    }

    @Test(arguments: [UInt64(1), 2, 3, 4])
    func manyAllocatingWritesWithEverySlotPinned(seed: UInt64) throws {
        var rng = SeededRandom(seed: seed)
        // Writes go to tables 0-15 (even ones on disk, odd ones new); 16-23 are on disk and only read at
        // the end, to push the others out of the cache.
        let tables = 16
        let img = writableImage(size: (tables + 8) * tableSpan) { img in
            for t in stride(from: 0, to: tables, by: 2) { img.mapData(t * 64 + 3, patternBytes(UInt64(t), cs)) }
            for t in tables..<tables + 8 { img.mapData(t * 64 + 1, patternBytes(UInt64(t), cs)) }
        }
        let shell = try WriteShell(img, cacheBytes: 1)   // four slots
        shell.trackDurability = false
        var model = img.expected
        // No table may leave the cache before the file holds what it had.
        var lastSeen: [Int: (ObjectIdentifier, UInt64, [UInt8])] = [:]
        var evictions = 0
        var most = 0
        shell.afterStep = { [unowned shell] in
            let slots = shell.engine.cache.slots
            most = max(most, slots.count)
            for (i, seen) in lastSeen where slots[i].map(ObjectIdentifier.init) != seen.0 {
                evictions += 1
                let onDisk = Array(shell.file[Int(seen.1)..<Int(seen.1) + cs])
                if onDisk != seen.2 { Issue.record("table \(i) evicted before its latest contents were written") }
            }
            lastSeen = [:]
            for (i, s) in slots where s.state == .ready { lastSeen[i] = (ObjectIdentifier(s), s.hostOffset, Array(s.table)) }
        }
        var inFlight: [(RequestTag, Range<Int>)] = []
        var tag: RequestTag = 0
        for round in 0..<3 {
            // Many writes in flight at once, across every table, while flushes come and go.
            for _ in 0..<150 {
                let choice = Int.random(in: 0..<20, using: &rng)
                if choice < 12 && !shell.held.isEmpty {
                    shell.run(Int.random(in: 0..<shell.held.count, using: &rng))
                    continue
                }
                tag += 1
                if choice == 19 {
                    shell.flush(tag)
                    continue
                }
                let t = Int.random(in: 0..<tables, using: &rng)
                let c = Int.random(in: 0..<60, using: &rng)
                let whole = Bool.random(using: &rng)
                let offset = (t * 64 + c) * cs + (whole ? 0 : Int.random(in: 0..<cs, using: &rng))
                let length = whole ? cs * Int.random(in: 1...4, using: &rng) : Int.random(in: 1...cs, using: &rng)
                // Writes in flight never overlap, so the model is well defined.
                inFlight.removeAll { shell.done($0.0) }
                guard !inFlight.contains(where: { $0.1.overlaps(offset..<offset + length) }) else { continue }
                let x = patternBytes(seed << 32 | tag, length)
                inFlight.append((tag, offset..<offset + length))
                shell.write(tag, offset, x)
                model.put(x, at: offset)
            }
            tag += 1
            shell.flush(tag)
            shell.runAll(.random(seed &+ UInt64(round)))
            #expect(shell.engine.activeRequests == 0)
        }
        #expect(shell.outcomes.values.allSatisfy { if case .failed = $0 { false } else { true } })
        // The last round's flush ran while writes were still completing: one more covers them.
        shell.flush(tag + 1)
        shell.runAll()
        #expect(shell.succeeded(tag + 1))
        // Everything is flushed: the file is the durable image.
        let check = ImageCheck(shell.file, written: shell.written)
        #expect(check.problems.isEmpty, "\(check.problems.prefix(5))")
        #expect(check.leaks.isEmpty, "leaked clusters \(check.leaks)")
        expectSameBytes(readBack(shell.file), model, "file")
        // Everything is clean now: reading every table through the small cache evicts and reloads them.
        for t in Array(tables..<tables + 8) + Array(0..<tables) {
            shell.read(10_000 + RequestTag(t), t * tableSpan, tableSpan)
            shell.runAll(.random(seed))
            expectSameBytes(shell.bytes(10_000 + RequestTag(t)), Array(model[t * tableSpan..<(t + 1) * tableSpan]), "table \(t)")
        }
        #expect(evictions > 0 && most > 4)   // tables came and went; the cache overflowed rather than fail
    }

    // 7 (H8, O4)
    @Test func aTrimmedClusterIsNotReusedWhileAReadOfItIsInFlight() throws {
        let img = writableImage { img in
            img.mapData(0, patternBytes(70, cs))
            img.mapData(1, patternBytes(71, cs))
        }
        let host0 = img.file.be64(Int(img.l1[0] & L1Entry.offsetMask)) & L2Entry.offsetMask
        let shell = try WriteShell(img)
        var model = img.expected
        shell.read(1, 0, cs)
        shell.run(0)   // the table
        #expect(shell.held.count == 1 && shell.held[0].isRead(at: host0))
        let inFlightRead: (IOAction) -> Bool = { $0.isRead(at: host0) }
        shell.trim(2, 0, cs)
        #expect(shell.done(2))
        model.put(zeros(cs), at: 0)
        shell.flush(3)
        shell.runAll(keep: inFlightRead)
        #expect(shell.succeeded(3))
        // The removal is durable and the count dropped to zero, but the read still runs: no punch, no reuse.
        #expect(shell.engine.writableState!.refcounts.refcount(ofCluster: host0 / u) == 0)
        #expect(!shell.log.contains { if case .punch = $0.op { true } else { false } })
        let w1 = patternBytes(72, cs), w2 = patternBytes(73, 10), w3 = patternBytes(74, 100)
        shell.write(4, 5 * cs, w1)                // whole cluster
        shell.write(5, 6 * cs + 3, w2)            // partial
        shell.write(6, tableSpan + 200, w3)       // a new L2 table
        model.put(w1, at: 5 * cs)
        model.put(w2, at: 6 * cs + 3)
        model.put(w3, at: tableSpan + 200)
        shell.flush(7)
        shell.runAll(keep: inFlightRead)
        #expect(shell.succeeded(4) && shell.succeeded(5) && shell.succeeded(6) && shell.succeeded(7))
        let touched = shell.log.filter { $0.issued && $0.serial > 1 }.compactMap { e -> UInt64? in
            switch e.op {
            case .write(let o, _), .punch(let o, _): o / u
            default: nil
            }
        }
        #expect(!touched.contains(host0 / u), "\(shell.trace())")
        // The read completes with the old data; from now on the cluster may be reused.
        shell.run(first: inFlightRead)
        #expect(shell.bytes(1) == patternBytes(70, cs))
        // A partial write into the reused cluster: the old bytes there are not zeros, so the whole
        // cluster is written (zeros around the data), not just the new bytes.
        let w4 = patternBytes(75, 50)
        shell.write(8, 7 * cs + 100, w4)
        model.put(w4, at: 7 * cs + 100)
        #expect(shell.held.count == 1 && writeAt(shell.held[0])! == (host0, cs))
        shell.runAll()
        flushAndCheck(shell, tag: 9, model: model)
    }

    // 8 (H5)
    @Test func overwritingCompressedClustersSharingAHostCluster() throws {
        var c0: (host: UInt64, byteCount: Int) = (0, 0)
        var c1 = c0
        let img = writableImage { img in
            img.l2Table(0)
            c0 = img.mapCompressed(0, payload: patternBytes(80, 100))
            c1 = img.mapCompressed(1, payload: patternBytes(81, 60))
        }
        let shared = c0.host / u
        #expect(c0.host % u == 0 && c1.host / u == shared && (c1.host + UInt64(c1.byteCount) - 1) / u == shared)
        #expect(ImageCheck(img.file).refcount(shared) == 2)
        let shell = try WriteShell(img)
        let fresh = shell.engine.writableState!.refcounts.endCluster
        #expect(fresh == shared + 1)
        var model = img.expected
        let a = patternBytes(1, 50)
        shell.write(1, 100, a)
        model.put(a, at: 100)
        shell.run(0)   // the table
        // Read the compressed bytes, inflate, write the whole merged cluster to a new host cluster.
        #expect(shell.held.count == 1 && shell.held[0].isRead(at: c0.host))
        shell.run(0)
        #expect(shell.held.count == 1 && shell.held[0].isDecompress)
        shell.run(0)
        #expect(shell.held.count == 1 && writeAt(shell.held[0])! == (fresh * u, cs))
        shell.run(0)
        #expect(shell.done(1))
        shell.read(2, 0, 2 * cs)
        shell.runAll()
        #expect(shell.bytes(2) == Array(model[0..<2 * cs]))
        flushAndCheck(shell, tag: 3, model: model, noLeaks: false)
        // One reference left: the count drops to 1, not 0, and nothing is punched.
        #expect(shell.engine.writableState!.refcounts.refcount(ofCluster: shared) == 1)
        #expect(!shell.log.contains { if case .punch = $0.op { true } else { false } })
        flushAndCheck(shell, tag: 4, model: model)
        #expect(ImageCheck(shell.durable).refcount(shared) == 1)

        // The other one: partial overwrite, then the host cluster is free.
        let b = patternBytes(2, 10)
        shell.write(5, cs + 200, b)
        model.put(b, at: cs + 200)
        shell.runAll()
        #expect(shell.succeeded(5))
        shell.flush(6)
        shell.runAll(keep: \.isPunch)
        #expect(shell.succeeded(6))
        #expect(shell.engine.writableState!.refcounts.refcount(ofCluster: shared) == 0)
        #expect(shell.held.count == 1 && shell.held[0].isPunch)
        if case .punchFile(_, let o, let n) = shell.held[0] { #expect(o == shared * u && n == u) }
        // Being punched: not handed out yet.
        let w = patternBytes(3, cs)
        shell.write(7, 3 * cs, w)
        model.put(w, at: 3 * cs)
        #expect(shell.held.contains { if let (o, _) = writeAt($0) { o / u != shared } else { false } })
        shell.runAll(keep: \.isPunch)
        shell.run(first: \.isPunch)
        let w2 = patternBytes(4, cs)
        shell.write(8, 4 * cs, w2)
        model.put(w2, at: 4 * cs)
        #expect(shell.held.count == 1 && shell.held[0].isWrite(at: shared * u))
        shell.runAll()
        flushAndCheck(shell, tag: 9, model: model)
    }

    @Test func overwritingACompressedClusterThatSpansTwoHostClusters() throws {
        var c: (host: UInt64, byteCount: Int) = (0, 0)
        let img = writableImage { img in
            img.l2Table(0)
            c = img.mapCompressed(0, payload: patternBytes(85, 300), skew: 300)
            img.mapData(1, patternBytes(86, cs))
        }
        let first = c.host / u
        #expect((c.host + UInt64(c.byteCount) - 1) / u == first + 1)
        #expect(ImageCheck(img.file).refcount(first) == 1 && ImageCheck(img.file).refcount(first + 1) == 1)
        let shell = try WriteShell(img)
        var model = img.expected
        let a = patternBytes(1, 10)
        shell.write(1, 7, a)
        model.put(a, at: 7)
        shell.runAll()
        shell.flush(2)
        shell.runAll(keep: \.isPunch)
        // One reference gone from each host cluster the compressed bytes touch: both are free and punched.
        #expect(shell.engine.writableState!.refcounts.refcount(ofCluster: first) == 0)
        #expect(shell.engine.writableState!.refcounts.refcount(ofCluster: first + 1) == 0)
        #expect(shell.held.count == 1)
        if case .punchFile(_, let o, let n) = shell.held.first { #expect(o == first * u && n == 2 * u) }
        shell.runAll()
        flushAndCheck(shell, tag: 3, model: model)
    }

    @Test func aFailedDataWriteFailsOnlyItsRequest() throws {
        let img = writableImage { $0.l2Table(0) }
        let shell = try WriteShell(img)
        var model = img.expected
        let end = shell.engine.writableState!.refcounts.endCluster
        shell.write(1, 10, patternBytes(1, 100))
        shell.write(2, 300, patternBytes(2, 100))   // same cluster: parks behind the first
        let b = patternBytes(2, 100)
        model.put(b, at: 300)
        shell.run(0)   // the table
        #expect(shell.held.count == 1 && shell.held[0].isWrite(at: end * u + 10))
        shell.run(0, fail: 28)
        #expect(shell.error(1)?.errno == 28)
        // Never linked; the second allocates afresh (the failed cluster is free only after a flush).
        #expect(shell.held.count == 1 && shell.held[0].isWrite(at: (end + 1) * u + 300))
        shell.runAll()
        #expect(shell.succeeded(2))
        #expect(shell.engine.failure == nil)
        flushAndCheck(shell, tag: 3, model: model, noLeaks: false)
        #expect(shell.engine.writableState!.refcounts.refcount(ofCluster: end) == 0)
        flushAndCheck(shell, tag: 4, model: model)
    }

    // 10 (H10)
    @Test func aFailedRefblockWriteFailsTheFlushAndLaterWrites() throws {
        let img = writableImage { $0.mapData(0, patternBytes(90, cs)) }
        let shell = try WriteShell(img)
        var model = img.expected
        let a = patternBytes(91, cs)
        shell.write(1, cs, a)
        model.put(a, at: cs)
        shell.runAll()
        #expect(shell.succeeded(1))
        shell.write(2, 2 * cs, patternBytes(92, 100), fua: true)
        shell.flush(3)
        // Stage A: the refblock. Hold it while another write and flush queue up.
        let refblock = 2 * u
        #expect(shell.indices { $0.isWrite(at: refblock) }.count == 1)
        shell.runAll(keep: { $0.isWrite(at: refblock) })
        shell.flush(4)
        shell.run(first: { $0.isWrite(at: refblock) }, fail: 5)
        #expect(shell.error(3)?.errno == 5)
        #expect(shell.error(2)?.errno == 5)    // FUA: its flush failed
        #expect(shell.error(4)?.errno == 5)    // queued behind the failed pipeline
        #expect(shell.held.isEmpty)
        #expect(shell.engine.failure != nil)
        #expect(shell.durable == img.file)   // nothing reached the durable image
        // Everything that writes now fails at once.
        shell.write(5, 3 * cs, patternBytes(93, 10))
        shell.trim(6, 0, cs)
        shell.writeZeroes(7, 0, cs)
        shell.flush(8)
        for tag: RequestTag in [5, 6, 7, 8] { #expect(shell.error(tag)?.errno == 5, "request \(tag)") }
        #expect(shell.held.isEmpty)
        // Reads still work, and see what was written before.
        model.put(patternBytes(92, 100), at: 2 * cs)
        shell.read(9, 0, 4 * cs)
        shell.runAll()
        #expect(shell.bytes(9) == Array(model[0..<4 * cs]))
        expectConsistent(shell.durable, written: shell.durableWritten)
    }

    @Test func aFailedL2WriteLeavesAConsistentImage() throws {
        // Tables 4-7 on disk, 0-3 made by the writes; a cache of four.
        let img = writableImage(size: 8 * tableSpan) { img in
            for t in 4..<8 { img.mapData(t * 64, patternBytes(UInt64(t), cs)) }
        }
        let shell = try WriteShell(img, cacheBytes: 1)
        var model = img.expected
        for t in 0..<4 {
            let x = patternBytes(UInt64(t), 300)
            shell.write(RequestTag(t + 1), t * tableSpan + 50, x)
            model.put(x, at: t * tableSpan + 50)
        }
        shell.runAll()
        let tables = (0..<4).map { shell.engine.l1[$0] & L1Entry.offsetMask }
        let isTableWrite: (IOAction) -> Bool = { a in tables.contains { a.isWrite(at: $0) } }
        shell.flush(10)
        shell.runAll(keep: isTableWrite)
        // Stage C: four new tables. Fail one; the others complete; no L1 write follows.
        let l2 = shell.indices(isTableWrite)
        #expect(l2.count == 4)
        shell.run(l2[1], fail: 5)
        shell.runAll()
        #expect(shell.error(10)?.errno == 5)
        #expect(!shell.log.contains { $0.op == .write(img.header.l1TableOffset, cs) })
        expectConsistent(shell.durable, written: shell.durableWritten, "durable")
        expectConsistent(shell.file, "file")
        // Reads see the data, also after the other tables pushed through the cache.
        shell.read(20, 4 * tableSpan, 4 * tableSpan)
        shell.runAll()
        shell.read(21, 0, 8 * tableSpan)
        shell.runAll()
        expectSameBytes(shell.bytes(21), model, "read after failure")
        // The durable image reads as before the flush.
        expectSameBytes(readBack(shell.durable), img.expected, "durable image")
    }
}
