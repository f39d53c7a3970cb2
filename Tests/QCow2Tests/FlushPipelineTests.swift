// FlushPipeline alone: stage order, a stage's writes before its sync, failures stopping the pipeline
// (H10), and the completions that cannot happen. No engine and no file: events in, answers out.

import Testing
@testable import QCow2

@Suite("FlushPipeline")
struct FlushPipelineTests {
    /// A plan whose writes are 8-byte buffers at the given offsets.
    func plan(_ stage: FlushStage, _ offsets: [UInt64], sync: Bool = true) -> FlushPipeline.Plan {
        .init(stage: stage, writes: offsets.map { ($0, .allocate(byteCount: 8, alignment: 8)) }, sync: sync)
    }

    /// What the answer says, as text, freeing the buffers of issued writes as the engine would.
    func describe(_ next: FlushPipeline.Next) -> String {
        switch next {
        case .write(let stage, let writes):
            writes.forEach { $0.bytes.deallocate() }
            return "write \(stage) \(writes.map(\.offset))"
        case .sync(let stage): return "sync \(stage)"
        case .wait: return "wait"
        case .done: return "done"
        case .failed(let f): return "failed \(f.errno) \(f.what)"
        }
    }

    @Test func nothingCapturedIsDoneAtOnce() {
        var p = FlushPipeline()
        #expect(describe(p.start([])) == "done")
        #expect(p.state == .idle && !p.isRunning)
    }

    @Test func stagesRunInOrderEachWritesThenSyncs() {
        var p = FlushPipeline()
        var log = [describe(p.start([plan(.refcountBlocks, [0x1000, 0x2000]), plan(.l2Tables, [0x3000]),
                                     plan(.l1Table, [0x30000])]))]
        #expect(p.state == .writing(.refcountBlocks, pending: 2))
        log.append(describe(p.completed(writeAt: 0x2000, errno: nil)))   // out of order is fine
        log.append(describe(p.completed(writeAt: 0x1000, errno: nil)))
        #expect(p.state == .syncing(.refcountBlocks))
        log.append(describe(p.completed(writeAt: nil, errno: nil)))
        log.append(describe(p.completed(writeAt: 0x3000, errno: nil)))
        log.append(describe(p.completed(writeAt: nil, errno: nil)))
        log.append(describe(p.completed(writeAt: 0x30000, errno: nil)))
        log.append(describe(p.completed(writeAt: nil, errno: nil)))
        #expect(log == ["write refcountBlocks [4096, 8192]", "wait", "sync refcountBlocks",
                        "write l2Tables [12288]", "sync l2Tables", "write l1Table [196608]", "sync l1Table", "done"])
        #expect(!p.isRunning)
    }

    @Test func aStageWithoutWritesIsItsSyncAlone() {
        // Stage A with no dirty block still syncs the data written before the flush (O2).
        var p = FlushPipeline()
        #expect(describe(p.start([plan(.refcountBlocks, []), plan(.l2Tables, [0x5000])])) == "sync refcountBlocks")
        #expect(describe(p.completed(writeAt: nil, errno: nil)) == "write l2Tables [20480]")
    }

    @Test func aFailedWriteWaitsForTheStageThenStopsBeforeTheNextStage() {
        var p = FlushPipeline()
        _ = describe(p.start([plan(.l2Tables, [0x5000, 0x6000]), plan(.l1Table, [0x30000])]))
        #expect(describe(p.completed(writeAt: 0x5000, errno: 5)) == "wait")
        // H10: no sync of the failed stage, no L1 write: the durable image is what the earlier stages made it.
        #expect(describe(p.completed(writeAt: 0x6000, errno: nil)) == "failed 5 writing the L2 table at 0x5000")
        #expect(!p.isRunning)
    }

    @Test func onlyASpaceFailureIsRecoverableAndAnotherFailureWinsOverIt() {
        var p = FlushPipeline()
        _ = describe(p.start([plan(.refcountBlocks, [0x1000, 0x2000])]))
        _ = p.completed(writeAt: 0x1000, errno: ENOSPC_)
        guard case .failed(let full) = p.completed(writeAt: 0x2000, errno: nil) else { Issue.record("no failure"); return }
        #expect(full.isRecoverable && full.errno == ENOSPC_)

        _ = describe(p.start([plan(.refcountBlocks, [0x1000, 0x2000])]))
        _ = p.completed(writeAt: 0x1000, errno: ENOSPC_)
        guard case .failed(let both) = p.completed(writeAt: 0x2000, errno: EIO_) else { Issue.record("no failure"); return }
        #expect(!both.isRecoverable && both.what == "writing the refcount block at 0x2000")
    }

    @Test func aFailedSyncIsNeverRecoverableAndNamesWhatItSynced() {
        var p = FlushPipeline()
        _ = describe(p.start([plan(.refcountBlocks, [])]))
        guard case .failed(let data) = p.completed(writeAt: nil, errno: ENOSPC_) else { Issue.record("no failure"); return }
        #expect(!data.isRecoverable && data.what == "syncing the data written before the flush")

        _ = describe(p.start([plan(.refcountBlocks, [0x1000])]))
        _ = p.completed(writeAt: 0x1000, errno: nil)
        guard case .failed(let blocks) = p.completed(writeAt: nil, errno: EIO_) else { Issue.record("no failure"); return }
        #expect(blocks.what == "syncing after the refcount block writes")
    }

    @Test func theTableSwitchCountsOnlyOnceItsSyncIsBack() {
        var p = FlushPipeline()
        _ = describe(p.start([plan(.refcountBlocks, [0x1000]), plan(.newRefcountTable, [0x8000]),
                              plan(.refcountTableSwitch, [48]), plan(.l2Tables, [0x9000])]))
        _ = p.completed(writeAt: 0x1000, errno: nil)
        _ = describe(p.completed(writeAt: nil, errno: nil))
        _ = p.completed(writeAt: 0x8000, errno: nil)
        _ = describe(p.completed(writeAt: nil, errno: nil))
        #expect(p.completed(writeAt: 48, errno: nil).isSync && !p.refcountTableSwitched)
        _ = describe(p.completed(writeAt: nil, errno: nil))
        #expect(p.refcountTableSwitched)
        // A failure after the switch still knows the new table is the live one.
        _ = p.completed(writeAt: 0x9000, errno: EIO_)
        #expect(p.refcountTableSwitched && !p.isRunning)
        _ = describe(p.start([]))
        #expect(!p.refcountTableSwitched)
    }

    @Test func aSyncCompletionWhileWritesAreOutTraps() async {
        await #expect(processExitsWith: .failure) {
            var p = FlushPipeline()
            _ = p.start([.init(stage: .l2Tables, writes: [(0x5000, .allocate(byteCount: 8, alignment: 8))], sync: true)])
            _ = p.completed(writeAt: nil, errno: nil)
        }
    }

    @Test func aWriteCompletionDuringTheSyncTraps() async {
        await #expect(processExitsWith: .failure) {
            var p = FlushPipeline()
            _ = p.start([.init(stage: .refcountBlocks, writes: [], sync: true)])
            _ = p.completed(writeAt: 0x1000, errno: nil)
        }
    }

    @Test func aCompletionWithNoFlushRunningTraps() async {
        await #expect(processExitsWith: .failure) {
            var p = FlushPipeline()
            _ = p.completed(writeAt: nil, errno: nil)
        }
    }
}

extension FlushPipeline.Next {
    var isSync: Bool { if case .sync = self { true } else { false } }
}
