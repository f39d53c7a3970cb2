// The flush pipeline's sequence: stages of metadata writes, each closed by a sync, run strictly one
// after the other, because that order is what keeps every crash point consistent.
//
// Pure: the pipeline is given the stages a flush captured (their writes already copied into buffers),
// and answers each event (a write or a sync completed) with what to do next. The engine turns those
// answers into IOActions and completes the flush's members. A failure stops the pipeline once the
// running stage's writes are back (H10): no later stage runs, so what is durable is still consistent.

/// One stage of a flush, in the order they run. Each exists only when it has work; a stage's writes all
/// complete before its sync is issued, and its sync completes before the next stage starts.
enum FlushStage: String, CaseIterable {
    /// A: dirty refcount blocks, then a sync. O1: a cluster's count is durable before any reference to it
    /// (stages C, D). O2: the same sync makes the data and COW writes durable before the L2 entries that
    /// point at them. With no dirty block the stage is the sync alone, when data or a later stage needs it.
    case refcountBlocks = "refcount block"
    /// B, when the refcount table grew (H3): the whole new table, then a sync. O3: a refcount block is
    /// durable before the table entry that points to it; the new table is durable before the header
    /// points to it.
    case newRefcountTable = "new refcount table"
    /// B, after a growth: the header's refcount-table offset and size switched to the new table, then a
    /// sync. Once that sync is back the old table is unreferenced and is freed at the end of the flush.
    case refcountTableSwitch = "header's refcount table fields"
    /// B, when the table did not move: changed refcount-table sectors written in place, then a sync (O3).
    case refcountTableEntries = "refcount table"
    /// C: dirty L2 tables, then a sync. O3: a new (or copied) L2 table is durable before the L1 entry that
    /// points to it (stage D); O2 holds because stage A synced the data first.
    case l2Tables = "L2 table"
    /// D: changed L1 sectors, then a sync. After it every change captured is durable; the engine then
    /// applies the deferred frees (O4: a removal is durable before the refcount decrease, and a freed
    /// cluster is reused or punched only after that; O5/H8: and only once no older I/O is in flight).
    case l1Table = "L1 table"
}

struct FlushPipeline {
    typealias Write = (offset: UInt64, bytes: UnsafeMutableRawBufferPointer)

    /// One stage's work, as captured.
    struct Plan {
        let stage: FlushStage
        var writes: [Write]
        let sync: Bool
    }

    /// The first failure of the running stage.
    struct Failure: Equatable {
        let errno: Int32
        /// "writing the L2 table at 0x50000", "syncing after the refcount block writes".
        let what: String
        let isSync: Bool

        /// Only a write refused for space leaves nothing uncertain behind.
        var isRecoverable: Bool { !isSync && (errno == ENOSPC_ || errno == EDQUOT_) }
    }

    enum State: Equatable {
        /// No flush is running.
        case idle
        /// The stage's writes are in flight; `pending` of them are not back yet.
        case writing(FlushStage, pending: Int)
        /// The stage's writes are back (or it had none); its sync is in flight.
        case syncing(FlushStage)
    }

    /// What the engine does next.
    enum Next {
        /// Issue these writes (the pipeline is now `writing`); their buffers are the engine's to free
        /// when each completes.
        case write(FlushStage, [Write])
        /// Issue one sync.
        case sync(FlushStage)
        /// Nothing until more completions arrive.
        case wait
        /// Every stage is durable: retire the frees and complete the members.
        case done
        /// A stage failed; nothing later was issued and the unissued buffers are freed.
        case failed(Failure)
    }

    private(set) var state: State = .idle
    /// Stages not started yet, in order (the running one is not among them).
    private var plans: [Plan] = []
    private var next = 0
    /// Writes the running stage issued: a failed sync of stage A without any says it was the data's.
    private var issued = 0
    private var failure: Failure?
    /// The header's switch to a new refcount table is durable (set by the switch stage's sync, kept
    /// until the next start so that a failure after it knows which table is live).
    private(set) var refcountTableSwitched = false

    var isRunning: Bool { state != .idle }

    /// Starts a flush over the captured stages (empty stages already left out).
    mutating func start(_ plans: [Plan]) -> Next {
        precondition(state == .idle, "a flush started while another runs")
        self.plans = plans
        next = 0
        failure = nil
        refcountTableSwitched = false
        return advance()
    }

    /// A write (`offset`) or the sync (`offset` nil) of the running stage completed.
    mutating func completed(writeAt offset: UInt64?, errno: Int32?) -> Next {
        let stage: FlushStage
        let last: Bool
        switch (state, offset) {
        case (.writing(let s, let pending), .some):
            stage = s
            last = pending == 1
            state = last ? .syncing(s) : .writing(s, pending: pending - 1)
        case (.syncing(let s), .none):
            stage = s
            last = true
        case (.idle, _):
            preconditionFailure("a flush completion with no flush running")
        case (.writing, .none):
            preconditionFailure("a sync completed while the stage's writes were in flight")
        case (.syncing, .some):
            preconditionFailure("a write completed while the stage's sync was in flight")
        }
        if let errno { note(errno: errno, stage: stage, offset: offset) }
        guard last else { return .wait }
        if let failure { return stop(failure) }
        if offset != nil {
            // The stage's writes are back; its sync makes them durable.
            if plans[next - 1].sync { return .sync(stage) }
        } else if stage == .refcountTableSwitch {
            refcountTableSwitched = true
        }
        return advance()
    }

    /// Starts the next stage that has work, or finishes.
    private mutating func advance() -> Next {
        guard next < plans.count else {
            state = .idle
            plans = []
            return .done
        }
        let plan = plans[next]
        plans[next].writes = []
        next += 1
        issued = plan.writes.count
        if plan.writes.isEmpty {
            precondition(plan.sync, "an empty flush stage")
            state = .syncing(plan.stage)
            return .sync(plan.stage)
        }
        state = .writing(plan.stage, pending: plan.writes.count)
        return .write(plan.stage, plan.writes)
    }

    private mutating func note(errno: Int32, stage: FlushStage, offset: UInt64?) {
        let what = offset.map { "writing the \(stage.rawValue) at \(hex($0))" }
            ?? (stage == .refcountBlocks && issued == 0
                ? "syncing the data written before the flush" : "syncing after the \(stage.rawValue) writes")
        let new = Failure(errno: errno, what: what, isSync: offset == nil)
        // An unrecoverable failure wins over a recoverable one of the same stage.
        if failure.map({ $0.isRecoverable && !new.isRecoverable }) ?? true { failure = new }
    }

    /// H10: later stages must not run; their buffers are never written.
    private mutating func stop(_ failure: Failure) -> Next {
        for plan in plans[next...] { for w in plan.writes { w.bytes.deallocate() } }
        plans = []
        state = .idle
        return .failed(failure)
    }
}
