// The flush pipeline: epochs, stage order, group commit, refcount-table growth, and the image a crash
// would leave at every durability point.

import BlockDevice
import Foundation
import Testing
@testable import QCow2

@Suite("Engine: flush pipeline")
struct EngineFlushTests {
    let u = UInt64(cs)

    /// Short names for the kinds of writes, and S for a sync, in issue order from `start`.
    func stages(_ shell: WriteShell, from start: Int, skipping: Set<Int> = []) -> [String] {
        shell.log[start...].filter { $0.issued && !skipping.contains($0.serial) }.compactMap { e in
            switch e.op {
            case .sync: "S"
            case .write:
                switch e.kind {
                case .refblock: "R"
                case .reftable: "T"
                case .header: "H"
                case .l2: "L2"
                case .l1: "L1"
                case .data: "D"
                case .other: "?"
                }
            default: nil
            }
        }
    }

    /// The entries of the L2 table at `table` in the `n`th write of it from `start`.
    func tableWrite(_ shell: WriteShell, _ table: UInt64, from start: Int, _ n: Int = 0) -> [UInt8]? {
        let writes = shell.log[start...].filter { $0.issued && $0.op == .write(table, cs) }
        return n < writes.count ? writes[n].bytes : nil
    }

    // 4 (H6)
    @Test func aFlushDuringAllocationsCapturesOnlyWhatIsLinked() throws {
        let img = writableImage { $0.mapData(0, patternBytes(1, cs)) }
        let t0 = img.l1[0] & L1Entry.offsetMask
        let shell = try WriteShell(img)
        var model = img.expected
        let a = patternBytes(2, cs), b = patternBytes(3, 100), c = patternBytes(4, 200)
        shell.write(1, cs, a)                 // table 0, linked before the flush
        shell.write(2, tableSpan + 10, b)     // a new table 1, linked before the flush
        shell.runAll()
        let t1 = shell.engine.l1[1] & L1Entry.offsetMask
        shell.write(3, 2 * cs, c)             // table 0, still writing its data when the flush captures
        for (x, at) in [(a, cs), (b, tableSpan + 10), (c, 2 * cs)] { model.put(x, at: at) }
        #expect(shell.held.count == 1)
        let w3 = shell.log.last!.serial
        let w3Host: UInt64 = shell.held[0].fileOffset!
        let start = shell.log.count
        shell.flush(10)
        // Stage A only: the refblock (with W3's count: a leak at worst).
        #expect(shell.held.count == 2 && shell.held[1].isWrite(at: 2 * u))
        shell.run(0)   // W3's data: linked after the capture
        #expect(shell.done(3) && !shell.done(10))
        shell.flush(11)   // mid-pipeline: waits for the next one
        shell.flush(12)   // joins it
        shell.runAll()
        #expect(shell.finished.suffix(3) == [10, 11, 12])
        // F1: refblock, sync, both tables, sync, L1, sync. F2 (11 and 12 together): W3's data and its table.
        #expect(stages(shell, from: start, skipping: [w3]) == ["R", "S", "L2", "L2", "S", "L1", "S", "S", "L2", "S"])
        // Every write before the sync that follows it, every later stage after that sync completes.
        let ops = shell.log[start...].filter { $0.serial != w3 }.map(\.description)
        #expect(Array(ops.prefix(4)) == ["+write 1024+512", "-write 1024+512", "+sync", "-sync"])
        #expect(Set(ops.dropFirst(4).prefix(2)) == ["+write \(t0)+512", "+write \(t1)+512"])
        expectCrashOrder(shell.log)
        // F1's table 0 has W1's cluster but not W3's; F2's has both.
        let first = tableWrite(shell, t0, from: start)!
        #expect(first.be64(8) & L2Entry.offsetMask != 0 && first.be64(16) == 0)
        let second = tableWrite(shell, t0, from: start, 1)!
        #expect(second.be64(16) == w3Host | L2Entry.copied)
        #expect(tableWrite(shell, t1, from: start, 1) == nil)   // table 1 did not change again
        // The L1 sector names table 1.
        let l1 = shell.log[start...].first { $0.issued && $0.kind == .l1 }!.bytes!
        #expect(l1.be64(8) == t1 | L2Entry.copied)
        #expect(shell.syncCount == 5)
        flushAndCheck(shell, tag: 13, model: model)
    }

    @Test func emptyStagesAreSkipped() throws {
        let img = writableImage { $0.mapData(0, patternBytes(1, cs)) }
        let shell = try WriteShell(img)
        var model = img.expected
        shell.flush(1)
        #expect(shell.done(1) && shell.held.isEmpty)   // nothing dirty: no I/O at all
        shell.write(2, 10, patternBytes(2, 20))        // in place
        model.put(patternBytes(2, 20), at: 10)
        shell.runAll()
        var start = shell.log.count
        shell.flush(3)
        shell.runAll()
        #expect(stages(shell, from: start) == ["S"])    // a pure overwrite costs one sync
        expectSameBytes(readBack(shell.durable), model, "after the overwrite")
        shell.write(4, cs, patternBytes(3, cs))         // a new cluster in an existing table
        shell.runAll()
        start = shell.log.count
        shell.flush(5)
        shell.runAll()
        #expect(stages(shell, from: start) == ["R", "S", "L2", "S"])
        shell.write(6, tableSpan, patternBytes(4, cs))  // a new table
        shell.runAll()
        start = shell.log.count
        shell.flush(7)
        shell.runAll()
        #expect(stages(shell, from: start) == ["R", "S", "L2", "S", "L1", "S"])
        #expect([3, 5, 7].allSatisfy { shell.succeeded($0) })
    }

    @Test func fuaWriteIsAnsweredAfterItsFlush() throws {
        let img = writableImage { $0.l2Table(0) }
        let shell = try WriteShell(img)
        shell.write(1, 0, patternBytes(1, 100), fua: true)
        shell.runAll(keep: \.isSync)
        #expect(!shell.done(1))
        while shell.run(first: \.isSync) {
            if !shell.held.isEmpty { shell.runAll(keep: \.isSync) }
        }
        #expect(shell.succeeded(1))
        expectCrashOrder(shell.log)
        #expect(ImageCheck(shell.durable).problems.isEmpty)
    }

    // 6 (H3)
    @Test func refcountTableGrowsTwice() throws {
        // 32 MiB guest, 512-byte clusters, 16-bit refcounts: one reftable cluster covers 8 MiB of file,
        // the first grown table (3 clusters) 24 MiB.
        let size = 32 << 20
        let img = writableImage(size: size)
        let shell = try WriteShell(img)
        shell.trackDurability = false
        var model = img.expected
        var tables: [(offset: UInt64, clusters: UInt32)] = [(img.file.be64(48), img.file.be32(56))]
        let chunk = 1 << 20
        var tag: RequestTag = 0
        for k in 0..<25 {
            tag += 1
            let x = patternBytes(UInt64(k), chunk)
            shell.write(tag, k * chunk, x)
            model.put(x, at: k * chunk)
            shell.runAll()
            #expect(shell.succeeded(tag))
            tag += 1
            shell.flush(tag)
            shell.runAll()
            #expect(shell.succeeded(tag))
            let now = (shell.file.be64(48), shell.file.be32(56))
            if now != tables.last! { tables.append(now) }
            // Everything is flushed: the file as it is now must be consistent.
            let check = ImageCheck(shell.file, written: shell.written)
            #expect(check.problems.isEmpty, "after chunk \(k): \(check.problems.prefix(3))")
        }
        #expect(tables.count == 3, "\(tables)")
        #expect(tables.map(\.clusters) == [1, 3, 5])
        // Each switch came after a sync that followed the new table's write, and before any table write.
        expectCrashOrder(shell.log)
        let switches = shell.log.indices.filter { shell.log[$0].issued && shell.log[$0].kind == .header }
        #expect(switches.count == 2)
        for (n, i) in switches.enumerated() {
            let table = tables[n + 1]
            let header = shell.log[i].bytes!
            #expect(header.be64(0) == table.offset && header.be32(8) == table.clusters)
            let written = shell.log[..<i].lastIndex { !$0.issued && $0.op == .write(table.offset, Int(table.clusters) * cs) }
            let syncAfter = written.flatMap { w in shell.log[w..<i].firstIndex { $0.issued && $0.op == .sync } }
            let synced = syncAfter.flatMap { s in shell.log[s..<i].firstIndex { !$0.issued && $0.op == .sync } }
            #expect(synced != nil, "header switch \(n) without a sync after the table write")
        }
        // The old tables were freed: after another flush nothing leaks.
        tag += 1
        shell.flush(tag)
        shell.runAll()
        let check = ImageCheck(shell.file, written: shell.written)
        #expect(check.problems.isEmpty && check.leaks.isEmpty, "\(check.problems.prefix(3)) leaks \(check.leaks.prefix(10))")
        for t in tables.dropLast() { #expect(check.refcount(t.offset / u) == 0 || check.references[t.offset / u] != nil) }
        expectSameBytes(readBack(shell.file), model, "file")
    }

    @Test func refcountTableGrowsWhileAFlushRuns() throws {
        let size = 16 << 20
        let img = writableImage(size: size)
        let shell = try WriteShell(img)
        shell.trackDurability = false
        var model = img.expected
        var tag: RequestTag = 0
        var offset = 0
        func put(_ length: Int) {
            tag += 1
            let x = patternBytes(UInt64(offset), length)
            shell.write(tag, offset, x)
            model.put(x, at: offset)
            offset += length
        }
        // Fill to just under what the first table can count (16384 clusters).
        while shell.engine.writableState!.refcounts.endCluster < 16384 - 1600 {
            put(256 << 10)
            shell.runAll()
        }
        put(256 << 10)
        shell.runAll()
        let before = shell.file.be64(48)
        // A flush captures new refblocks' reftable entries in place; hold it at its first stage.
        shell.trackDurability = true
        var points = 0
        shell.onDurable = { durable, written in
            points += 1
            let check = ImageCheck(durable, written: written)
            for p in check.problems.prefix(3) { Issue.record(Comment(rawValue: "sync point \(points): \(p)")) }
        }
        tag += 1
        let f1 = tag
        shell.flush(f1)
        let firstStage = shell.held.count
        #expect(firstStage > 0 && shell.held.allSatisfy(\.isWriteFile))
        // Meanwhile a write needs refblocks past the table's end: the table grows in memory.
        put(1 << 20)
        #expect(shell.engine.writableState!.refcounts.tableClusters == 1 && shell.engine.writableState!.refcounts.table.count > 64)
        shell.runAll(.random(5))
        #expect(shell.succeeded(f1))
        #expect(shell.file.be64(48) == before)   // that flush captured before the growth
        tag += 1
        shell.flush(tag)
        shell.runAll(.random(6))
        #expect(shell.succeeded(tag))
        #expect(shell.file.be64(48) != before && shell.file.be32(56) == 3)
        expectCrashOrder(shell.log)
        tag += 1
        shell.flush(tag)
        shell.runAll()
        let check = ImageCheck(shell.file, written: shell.written)
        #expect(check.problems.isEmpty && check.leaks.isEmpty, "\(check.problems.prefix(3)) leaks \(check.leaks.prefix(10))")
        #expect(points >= 6)
        expectSameBytes(readBack(shell.file), model, "file")
    }

    @Test func refcountTableGrowsTwiceBetweenFlushes() throws {
        let size = 32 << 20
        let img = writableImage(size: size)
        let shell = try WriteShell(img)
        shell.trackDurability = false
        var model = img.expected
        var grown: [(offset: UInt64, clusters: Int)] = []
        for k in 0..<25 {
            let x = patternBytes(UInt64(k), 1 << 20)
            shell.write(RequestTag(k + 1), k << 20, x)
            model.put(x, at: k << 20)
            shell.runAll()
            if let m = shell.engine.writableState!.refcounts.movedTable, grown.last?.offset != m.offset { grown.append((m.offset, m.clusters)) }
        }
        #expect(grown.map(\.clusters) == [3, 5])
        shell.flush(100)
        shell.runAll()
        #expect(shell.succeeded(100))
        // The first grown table was never written: given back (and reused by later allocations); only
        // the second is written and switched to.
        #expect(shell.log.filter { $0.issued && $0.kind == .header }.count == 1)
        #expect(!shell.log.contains { $0.issued && $0.op == .write(grown[0].offset, 3 * cs) })
        #expect(shell.file.be64(48) == grown[1].offset && shell.file.be32(56) == 5)
        expectCrashOrder(shell.log)
        shell.flush(101)
        shell.runAll()
        let check = ImageCheck(shell.file, written: shell.written)
        #expect(check.problems.isEmpty && check.leaks.isEmpty, "\(check.problems.prefix(3)) leaks \(check.leaks.prefix(10))")
        for k in 0..<UInt64(3) { #expect(check.references[grown[0].offset / u + k] == 1) }
        expectSameBytes(readBack(shell.file), model, "file")
    }

    // 9: O1–O3 at every durability point
    @Test func everySyncPointLeavesAConsistentImage() throws {
        var shared: UInt64 = 0
        let img = writableImage(size: 6 * tableSpan) { img in
            img.mapData(0, patternBytes(1, cs))
            img.mapData(1, patternBytes(2, cs))
            shared = img.mapCompressed(2, payload: patternBytes(3, 90)).host
            img.mapCompressed(3, payload: patternBytes(4, 70))
            img.mapData(2 * 64 + 5, patternBytes(5, cs))
        }
        let shell = try WriteShell(img)
        var model = img.expected
        var points = 0
        var flushedModel: [UInt8]?
        shell.onDurable = { durable, written in
            points += 1
            let check = ImageCheck(durable, written: written)
            for p in check.problems.prefix(3) { Issue.record(Comment(rawValue: "sync point \(points): \(p)")) }
            // Whatever a completed flush covered, and nothing wrote since, reads back intact.
            if let flushed = flushedModel {
                let got = readBack(durable)
                if let i = got.indices.first(where: { flushed[$0] == model[$0] && got[$0] != model[$0] }) {
                    Issue.record(Comment(rawValue: "sync point \(points): byte \(i) (cluster \(i / cs)) lost"))
                }
            }
        }
        shell.afterStep = { [unowned shell] in
            let check = ImageCheck(shell.file, written: shell.written)
            for p in check.problems.prefix(3) { Issue.record(Comment(rawValue: "file: \(p)")) }
        }
        func put(_ tag: RequestTag, _ at: Int, _ x: [UInt8]) {
            shell.write(tag, at, x)
            model.put(x, at: at)
        }
        // Round 1: partial and whole allocations, a new table, a COW of a compressed cluster, an in-place write.
        put(1, 4 * cs + 7, patternBytes(10, 300))
        put(2, 6 * cs, patternBytes(11, 3 * cs))
        put(3, tableSpan + 100, patternBytes(12, 50))
        put(4, 2 * cs + 30, patternBytes(13, 20))
        put(5, 20, patternBytes(14, 40))
        put(6, 3 * tableSpan + cs, patternBytes(15, 2 * cs))
        shell.runAll()
        shell.flush(7)
        shell.runAll()
        flushedModel = model
        // Round 2: trims free clusters (data and the shared compressed one), rewrites reuse them.
        shell.trim(8, cs, cs)
        shell.trim(9, 3 * cs, cs)
        model.put(zeros(cs), at: cs)
        model.put(zeros(cs), at: 3 * cs)
        put(10, 2 * 64 * cs + 5 * cs + 1, patternBytes(16, 10))
        shell.runAll()
        shell.flush(11)
        shell.runAll()
        flushedModel = model
        #expect(shell.engine.writableState!.refcounts.refcount(ofCluster: shared / u) == 0)
        put(12, 5 * cs, patternBytes(17, cs))
        put(13, 4 * tableSpan + 3, patternBytes(18, 9))
        shell.runAll()
        shell.flush(14)
        shell.runAll()
        flushedModel = model
        shell.flush(15)
        shell.runAll()
        #expect((1...15).allSatisfy { shell.succeeded(RequestTag($0)) })
        #expect(points >= 8)
        expectCrashOrder(shell.log)
        let check = ImageCheck(shell.durable, written: shell.durableWritten)
        #expect(check.problems.isEmpty && check.leaks.isEmpty, "\(check.problems) leaks \(check.leaks)")
        expectSameBytes(readBack(shell.durable), model, "final")
    }

    @Test(arguments: [UInt64(1), 2, 3, 4, 5, 6, 7, 8])
    func randomCompletionOrdersKeepEverySyncPointConsistent(seed: UInt64) throws {
        var rng = SeededRandom(seed: seed)
        let tables = 6
        let img = writableImage(size: tables * tableSpan) { img in
            img.mapData(0, patternBytes(1, cs))
            img.mapData(1, patternBytes(2, cs))
            img.mapCompressed(5, payload: patternBytes(3, 90))
            img.mapCompressed(6, payload: patternBytes(4, 70))
            img.mapData(2 * 64 + 3, patternBytes(5, cs))
        }
        let size = tables * tableSpan
        let shell = try WriteShell(img, cacheBytes: seed % 2 == 0 ? 1 : 1 << 20)
        var model = img.expected
        // Who last wrote each byte (0: the image), and when each request was answered.
        var writer = [RequestTag](repeating: 0, count: size)
        var answered: [RequestTag: Int] = [0: 0]
        var step = 0
        var flushIssued: [RequestTag: Int] = [:]
        var covered = 0   // requests answered before this step are durable
        var reads: [RequestTag: [UInt8]] = [:]
        var inFlight: [(RequestTag, Range<Int>)] = []
        var points = 0
        var seen = 0
        func checkDurable(_ durable: [UInt8], _ what: String) {
            let got = readBack(durable)
            guard got.count == size else { return }
            for i in 0..<size where got[i] != model[i] && answered[writer[i]].map({ $0 < covered }) == true {
                Issue.record(Comment(rawValue: "\(what): byte \(i) (cluster \(i / cs)) lost: got \(got[i]) want \(model[i])"))
                return
            }
        }
        shell.onDurable = { durable, written in
            points += 1
            let check = ImageCheck(durable, written: written)
            for p in check.problems.prefix(3) { Issue.record(Comment(rawValue: "sync point \(points): \(p)")) }
            checkDurable(durable, "sync point \(points)")
        }
        shell.afterStep = { [unowned shell] in
            step += 1
            for tag in shell.finished[seen...] where answered[tag] == nil {
                answered[tag] = step
                if let want = reads[tag] {
                    if shell.bytes(tag) != want { Issue.record("read \(tag) returned stale or torn data") }
                }
                if let t = flushIssued[tag] {
                    #expect(shell.succeeded(tag))
                    covered = max(covered, t)
                    checkDurable(shell.durable, "flush \(tag)")
                }
            }
            seen = shell.finished.count
            let check = ImageCheck(shell.file, written: shell.written)
            for p in check.problems.prefix(3) { Issue.record(Comment(rawValue: "file at step \(step): \(p)")) }
        }
        var tag: RequestTag = 0
        for _ in 0..<260 {
            inFlight.removeAll { shell.done($0.0) }
            let choice = Int.random(in: 0..<12, using: &rng)
            if choice < 7 && !shell.held.isEmpty {
                shell.run(Int.random(in: 0..<shell.held.count, using: &rng))
                continue
            }
            tag += 1
            switch choice {
            case 7, 8, 9:
                let c = Int.random(in: 0..<(tables * 64 - 4), using: &rng)
                let range: Range<Int>
                switch Int.random(in: 0..<3, using: &rng) {
                case 0: range = c * cs..<(c + Int.random(in: 1...3, using: &rng)) * cs
                case 1:
                    let start = c * cs + Int.random(in: 0..<cs, using: &rng)
                    range = start..<start + Int.random(in: 1...cs, using: &rng)
                default:
                    let start = c * cs + Int.random(in: 0..<cs, using: &rng)
                    range = start..<start + Int.random(in: cs...3 * cs, using: &rng)
                }
                guard !inFlight.contains(where: { $0.1.overlaps(range) }) else { continue }
                let x = patternBytes(seed << 40 | tag, range.count)
                inFlight.append((tag, range))
                for i in range { writer[i] = tag }
                model.put(x, at: range.lowerBound)
                shell.write(tag, range.lowerBound, x)
            case 10:
                let c = Int.random(in: 0..<(tables * 64 - 2), using: &rng)
                let range = c * cs..<(c + Int.random(in: 1...2, using: &rng)) * cs
                guard !inFlight.contains(where: { $0.1.overlaps(range) }) else { continue }
                if Bool.random(using: &rng) {
                    inFlight.append((tag, range))
                    for i in range { writer[i] = tag }
                    model.put(zeros(range.count), at: range.lowerBound)
                    shell.trim(tag, range.lowerBound, range.count)
                } else {
                    reads[tag] = Array(model[range])
                    inFlight.append((tag, range))
                    shell.read(tag, range.lowerBound, range.count)
                }
            default:
                flushIssued[tag] = step + 1
                shell.flush(tag)
            }
        }
        shell.runAll(.random(seed))
        for t in [tag + 1, tag + 2] {
            flushIssued[t] = step + 1
            shell.flush(t)
            shell.runAll(.random(seed))
        }
        #expect(shell.outcomes.values.allSatisfy { if case .failed = $0 { false } else { true } })
        #expect(flushIssued.count > 10 && points > 8, "\(flushIssued.count) flushes, \(points) sync points")
        expectCrashOrder(shell.log)
        let check = ImageCheck(shell.durable, written: shell.durableWritten)
        #expect(check.problems.isEmpty && check.leaks.isEmpty, "\(check.problems.prefix(3)) leaks \(check.leaks)")
        expectSameBytes(readBack(shell.durable), model, "final durable image")
    }
}
