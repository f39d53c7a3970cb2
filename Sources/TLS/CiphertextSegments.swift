// Ciphertext waiting for the socket. GnuTLS hands its encrypted records to the push function in
// memory that is only valid during the call, so they are copied into a segment; each segment is
// written to the SocketStream as one buffer and must stay alive until the socket is done with it.
// Segments are pooled, so a steady stream of writes allocates nothing after warming up.

/// Growable bytes for one socket write.
struct Segment {
    var bytes: UnsafeMutableRawPointer?
    var capacity = 0
    var count = 0

    mutating func append(_ source: UnsafeRawPointer, _ length: Int) {
        if count + length > capacity { reserve(max(count + length, capacity * 2)) }
        (bytes! + count).copyMemory(from: source, byteCount: length)
        count += length
    }

    /// Makes room for `wanted` bytes in all, so a large write does not grow by doubling (and copying).
    mutating func reserve(_ wanted: Int) {
        guard wanted > capacity else { return }
        let newCapacity = max(wanted, 16 << 10)
        let grown = UnsafeMutableRawPointer.allocate(byteCount: newCapacity, alignment: 16)
        if let bytes {
            grown.copyMemory(from: bytes, byteCount: count)
            bytes.deallocate()
        }
        bytes = grown
        capacity = newCapacity
    }

    func free() { bytes?.deallocate() }
}

/// A segment handed to the socket, and whom to tell when it is written.
struct InFlightSegment {
    var segment = Segment()
    /// The TLSStream caller's write context, if this segment carries the end of a caller's write.
    var callerContext: UInt64 = 0
    var reportsToCaller = false
}

/// Segments in flight, indexed by slot (the socket write context carries the slot), plus spare ones.
struct SegmentPool {
    private(set) var inFlight: [InFlightSegment] = []
    private var freeSlots: [Int] = []
    private var spares: [Segment] = []
    private var spareBytes = 0
    /// Spare segments kept for reuse, by count and by bytes; more are freed, so a burst of large
    /// writes leaves no hoard behind on an idle connection.
    private let maximumSpares = 16
    private let maximumSpareBytes = 8 << 20

    /// An empty segment, reused if one is spare.
    mutating func take() -> Segment {
        guard let segment = spares.popLast() else { return Segment() }
        spareBytes -= segment.capacity
        return segment
    }

    mutating func giveBack(_ segment: Segment) {
        var segment = segment
        segment.count = 0
        if spares.count < maximumSpares && spareBytes + segment.capacity <= maximumSpareBytes {
            spares.append(segment)
            spareBytes += segment.capacity
        } else {
            segment.free()
        }
    }

    /// Parks a segment until the socket reports it; returns its slot.
    mutating func park(_ entry: InFlightSegment) -> Int {
        if let slot = freeSlots.popLast() {
            inFlight[slot] = entry
            return slot
        }
        inFlight.append(entry)
        return inFlight.count - 1
    }

    /// Ends a slot: its segment becomes spare; returns what was parked.
    mutating func release(_ slot: Int) -> InFlightSegment {
        let entry = inFlight[slot]
        inFlight[slot] = InFlightSegment()
        freeSlots.append(slot)
        giveBack(entry.segment)
        return entry
    }

    func freeAll() {
        for entry in inFlight { entry.segment.free() }
        for segment in spares { segment.free() }
    }
}
