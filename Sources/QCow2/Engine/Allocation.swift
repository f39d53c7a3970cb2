// A run of guest clusters being allocated, following QED's request steps: the clusters are reserved
// (no other writer may touch them, Q3), the parts the write does not cover are copied from the old
// contents (COW; a compressed old cluster is read, then inflated), the new clusters are written in one
// piece, and only then linked into the L2 table (O2: the flush makes the data durable before the entry).
// Linking, or undoing after a failure, ends the allocation: its record leaves the table then.
//
// Pure: the transitions below say what the engine does next; the engine issues the I/O. There is no
// "waiting for an L2 table" or "waiting for refcount growth" step: an allocation is created only once
// its L2 table is in memory, and refcounts live in memory, so growing them is synchronous.

struct Allocation {
    enum State: Equatable {
        /// Host clusters taken and guest clusters reserved; nothing issued yet.
        case reserved
        /// `pending` COW reads of the old contents (file or backing image) are in flight.
        case copying(pending: Int)
        /// The compressed old cluster is being read (H5).
        case readingCompressed
        /// The compressed old cluster is being inflated into scratch, whose gaps then fill the buffer.
        case inflating
        /// The new clusters' write is in flight; when it is back they are linked (or given back).
        case writing
    }

    /// What the engine does next.
    enum Next: Equatable {
        /// More completions are due first.
        case wait
        /// Issue the write of the new clusters.
        case write
        /// Issue the inflation of the compressed source.
        case inflate
        /// Link the new clusters into the L2 table (their data is in the file).
        case link
        /// Give the clusters back and fail the request's part with this errno (never linked).
        case undo(Int32)
    }

    let request: WriteID
    let l1Index: Int
    /// L2 index of the first cluster.
    let firstIndex: Int
    let count: Int
    /// Host offset of the first new cluster; the run is contiguous on the host.
    let host: UInt64
    /// The entries being replaced, for deferred frees after the link.
    let oldWords: [UInt64]
    /// Assembly buffer for a partial write (head COW + data + tail COW); nil when writing straight from
    /// the request.
    var buffer: UnsafeMutableRawBufferPointer?
    /// What to write, and where, once COW reads are done.
    var writeOffset: UInt64
    var source: UnsafeRawBufferPointer
    /// Extended L2: the subcluster bitmap to link with (nil: every subcluster allocated).
    var bitmap: UInt64?
    /// Whether the old entries lose their clusters at the link (false when subclusters are filled in
    /// inside a cluster that is already ours).
    var freesOld = true
    /// The cluster offset that the assembly buffer's first byte stands for.
    var cowOrigin = 0
    /// Ranges of the buffer a compressed old cluster fills once inflated.
    var cowGaps: [Range<Int>] = []
    private(set) var state: State = .reserved
    /// The first failure while copying; the allocation is undone once every read is back.
    private(set) var error: Int32?
    /// Writers parked on these guest clusters.
    var waiters: [WriteID] = []

    init(request: WriteID, l1Index: Int, firstIndex: Int, count: Int, host: UInt64, oldWords: [UInt64],
         buffer: UnsafeMutableRawBufferPointer?, writeOffset: UInt64, source: UnsafeRawBufferPointer,
         bitmap: UInt64? = nil, freesOld: Bool = true) {
        self.request = request
        self.l1Index = l1Index
        self.firstIndex = firstIndex
        self.count = count
        self.host = host
        self.oldWords = oldWords
        self.buffer = buffer
        self.writeOffset = writeOffset
        self.source = source
        self.bitmap = bitmap
        self.freesOld = freesOld
    }

    // MARK: - Setting up the copy

    /// One more COW read was issued.
    mutating func copyIssued() {
        switch state {
        case .reserved: state = .copying(pending: 1)
        case .copying(let n): state = .copying(pending: n + 1)
        default: preconditionFailure("a COW read issued for an allocation that is \(state)")
        }
    }

    /// The compressed old cluster's read was issued (the only copy such an allocation makes).
    mutating func compressedReadIssued() {
        precondition(state == .reserved, "a compressed COW read issued for an allocation that is \(state)")
        state = .readingCompressed
    }

    /// Every copy is issued (possibly none): write now, or wait for the reads.
    mutating func copiesIssued() -> Next {
        if state == .reserved {
            state = .writing
            return .write
        }
        return .wait
    }

    /// The old contents turned out unreadable (corrupt metadata) while setting up: undo now, or once the
    /// reads already issued are back, so the request is answered and the reservation released.
    mutating func abandon() -> Next {
        switch state {
        case .reserved: return .undo(EIO_)
        case .copying, .readingCompressed, .inflating:
            if error == nil { error = EIO_ }
            return .wait
        case .writing: preconditionFailure("abandoning an allocation whose write is in flight")
        }
    }

    // MARK: - Completions

    /// A COW read is back.
    mutating func copyCompleted(errno: Int32?) -> Next {
        guard case .copying(let n) = state else { preconditionFailure("a COW read completed for an allocation that is \(state)") }
        if let errno, error == nil { error = errno }
        state = .copying(pending: n - 1)
        return n == 1 ? copied() : .wait
    }

    /// The compressed old cluster's read is back.
    mutating func compressedReadCompleted(errno: Int32?) -> Next {
        precondition(state == .readingCompressed, "a compressed COW read completed for an allocation that is \(state)")
        if let errno, error == nil { error = errno }
        if error != nil { return copied() }
        state = .inflating
        return .inflate
    }

    /// The inflation is back (its failure is the image's: EIO).
    mutating func inflated(ok: Bool) -> Next {
        precondition(state == .inflating, "an inflation completed for an allocation that is \(state)")
        if !ok, error == nil { error = EIO_ }
        return copied()
    }

    /// The new clusters' write is back: link them, or undo with `errno`.
    func written(errno: Int32?) -> Next {
        precondition(state == .writing, "an allocation write completed for an allocation that is \(state)")
        return errno.map { .undo($0) } ?? .link
    }

    private mutating func copied() -> Next {
        if let error { return .undo(error) }
        state = .writing
        return .write
    }
}
