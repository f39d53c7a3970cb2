// LoopProxyDevice: a qcow2 export served on a loop that does not own its engine.
//
// A qcow2 engine is single-threaded by design (pure state machine, one outbox, one L2 cache), so it
// lives on one loop, its owner (the main loop). A connection on any other loop sees the export through
// a ProxyDevice, a BlockDevice like any other, so Connection does not know the difference.
//
// How a request crosses loops:
//   loop k:     Connection.execute → ProxyDevice.read: takes a slot (handler, tag), posts a
//               ProxyRequest (link, slot, operation, range, buffer address) to the owner's mailbox
//   owner loop: ProxyLink.execute calls the real device with tag = slot and the link as handler
//   owner loop: ProxyLink.blockIOCompleted posts a ProxyCompletion (proxy, slot, outcome) to loop k
//   loop k:     ProxyDevice.complete frees the slot and calls the connection's handler
//
// Batching: each side gathers a loop turn's requests (or completions) and posts them at the turn's end
// (EventLoop.runAtTurnEnd) with one lock and one wake-up, instead of one per request.
//
// Memory: buffers are the connection's pooled buffers, crossing as raw addresses; the connection keeps
// a request's buffer until the device completed it, so the owner loop never sees freed memory. Slots
// are an array with a free list, and the gathering and mailbox arrays are reused, so once warm the proxy
// path allocates nothing per request. A flush goes to the one engine, so it covers writes completed through
// every loop (multi-conn stays honest).
//
// Threads: a ProxyDevice is confined to its loop k. A ProxyLink's stored properties are immutable; its
// `device` is used only on the owner loop, and the mailboxes are thread-safe; hence @unchecked Sendable.
// Lifetime: the ProxyDevice owns its link; messages carry unretained references, valid because a
// connection (which holds the device through its Export) finishes only after every request completed.

import BlockDevice
import UVCore

enum ProxyOperation: UInt8 {
    case read, write, writeZeroes, trim, flush, cache, blockStatus, dirtyBitmapStatus
}

/// One request on its way to the owner loop.
struct ProxyRequest: @unchecked Sendable {
    let link: Unmanaged<ProxyLink>
    let operation: ProxyOperation
    /// FUA for write and trim; ZeroOptions' raw value for writeZeroes.
    let flags: UInt8
    /// dirtyBitmapStatus: the bitmap's index in the device's `dirtyBitmaps` (qcow2 allows 65535).
    var bitmap: UInt16 = 0
    let slot: UInt32
    let offset: UInt64
    let length: UInt64
    let buffer: UnsafeMutableRawPointer?
}

/// One outcome on its way back to the requesting loop.
struct ProxyCompletion: @unchecked Sendable {
    let proxy: Unmanaged<ProxyDevice>
    let slot: UInt32
    let outcome: BlockOutcome
}

/// The owner loop's half of one (export, requesting loop) pair.
final class ProxyLink: BlockIOHandler, TurnEndTask, @unchecked Sendable {
    /// The real device and the loop it runs on; owner loop only.
    private let device: BlockDevice
    private let ownerLoop: EventLoop
    private let completions: Mailbox<ProxyCompletion>
    /// The requesting half; unretained (it owns this link).
    fileprivate let proxy: Unmanaged<ProxyDevice>
    /// Completions of this turn, posted at its end; owner loop only.
    @exclusivity(unchecked) private var gathered: [ProxyCompletion] = []
    @exclusivity(unchecked) private var flushScheduled = false

    fileprivate init(device: BlockDevice, ownerLoop: EventLoop, completions: Mailbox<ProxyCompletion>, proxy: ProxyDevice) {
        self.device = device
        self.ownerLoop = ownerLoop
        self.completions = completions
        self.proxy = Unmanaged.passUnretained(proxy)
        gathered.reserveCapacity(64)
    }

    /// Runs a batch of requests on the owner loop (the owner's request mailbox handler).
    static func execute(_ batch: [ProxyRequest]) {
        for request in batch {
            request.link._withUnsafeGuaranteedRef { $0.execute(request) }
        }
    }

    private func execute(_ r: ProxyRequest) {
        let tag = UInt64(r.slot)
        switch r.operation {
        case .read:
            device.read(offset: r.offset, into: UnsafeMutableRawBufferPointer(start: r.buffer, count: Int(r.length)),
                        tag: tag, handler: self)
        case .write:
            device.write(offset: r.offset, from: UnsafeRawBufferPointer(start: r.buffer, count: Int(r.length)),
                         fua: r.flags != 0, tag: tag, handler: self)
        case .writeZeroes:
            device.writeZeroes(offset: r.offset, length: r.length, options: ZeroOptions(rawValue: r.flags), tag: tag, handler: self)
        case .trim:
            device.trim(offset: r.offset, length: r.length, fua: r.flags != 0, tag: tag, handler: self)
        case .flush:
            device.flush(tag: tag, handler: self)
        case .cache:
            device.cache(offset: r.offset, length: r.length, tag: tag, handler: self)
        case .blockStatus:
            device.blockStatus(offset: r.offset, length: r.length, tag: tag, handler: self)
        case .dirtyBitmapStatus:
            // The proxy only asks for bitmaps it copied from this device, so the index is in range.
            let bitmaps = device as! DirtyBitmapDevice
            bitmaps.dirtyBitmapStatus(name: bitmaps.dirtyBitmaps[Int(r.bitmap)].name, offset: r.offset, length: r.length,
                                      tag: tag, handler: self)
        }
    }

    /// Owner loop: the real device finished; the outcome goes back to the requesting loop.
    func blockIOCompleted(tag: UInt64, outcome: BlockOutcome) {
        gathered.append(ProxyCompletion(proxy: proxy, slot: UInt32(truncatingIfNeeded: tag), outcome: outcome))
        if !flushScheduled {
            flushScheduled = true
            ownerLoop.runAtTurnEnd(self)
        }
    }

    func runAtTurnEnd() {
        flushScheduled = false
        completions.post(draining: &gathered)
    }
}

/// The export's device on a loop that does not own the engine; see the file comment. It serves the
/// device's dirty bitmaps too (none if the device keeps none), so qemu:dirty-bitmap works on every loop.
final class ProxyDevice: DirtyBitmapDevice, TurnEndTask {
    let size: UInt64
    let capabilities: BlockCapabilities
    let summary: String
    let dirtyBitmaps: [DirtyBitmapInfo]
    private let requests: Mailbox<ProxyRequest>
    private let loop: EventLoop
    private var link: ProxyLink!
    /// Requests of this turn, posted at its end.
    @exclusivity(unchecked) private var gathered: [ProxyRequest] = []
    @exclusivity(unchecked) private var flushScheduled = false

    private struct Slot {
        /// The connection waiting for this request; it outlives the request (see the file comment).
        unowned(unsafe) var handler: (any BlockIOHandler)?
        var tag: UInt64 = 0
    }

    // Loop-confined and touched once per request, never re-entered: unchecked exclusivity (see Connection).
    @exclusivity(unchecked) private var slots: [Slot] = []
    @exclusivity(unchecked) private var freeSlots: [UInt32] = []
    /// Requests posted and not completed yet.
    @exclusivity(unchecked) private(set) var inFlight = 0

    /// Made on the owner loop (it reads `device`'s properties), used on the requesting loop from then on.
    /// `requests`: the owner loop's mailbox; `completions`: the requesting loop's (`loop`).
    init(device: BlockDevice, ownerLoop: EventLoop, requests: Mailbox<ProxyRequest>,
         loop: EventLoop, completions: Mailbox<ProxyCompletion>) {
        size = device.size
        capabilities = device.capabilities
        summary = device.summary
        dirtyBitmaps = (device as? DirtyBitmapDevice)?.dirtyBitmaps ?? []
        self.requests = requests
        self.loop = loop
        slots.reserveCapacity(256)
        freeSlots.reserveCapacity(256)
        gathered.reserveCapacity(64)
        link = ProxyLink(device: device, ownerLoop: ownerLoop, completions: completions, proxy: self)
    }

    func runAtTurnEnd() {
        flushScheduled = false
        requests.post(draining: &gathered)
    }

    /// Runs a batch of completions on the requesting loop (that loop's completion mailbox handler).
    static func complete(_ batch: [ProxyCompletion]) {
        for completion in batch {
            completion.proxy._withUnsafeGuaranteedRef { $0.complete(slot: completion.slot, outcome: completion.outcome) }
        }
    }

    private func complete(slot: UInt32, outcome: BlockOutcome) {
        let i = Int(slot)
        let handler = slots[i].handler!
        let tag = slots[i].tag
        slots[i].handler = nil
        freeSlots.append(slot)
        inFlight -= 1
        handler.blockIOCompleted(tag: tag, outcome: outcome)
    }

    private func post(_ operation: ProxyOperation, offset: UInt64 = 0, length: UInt64 = 0, flags: UInt8 = 0,
                      bitmap: UInt16 = 0, buffer: UnsafeMutableRawPointer? = nil, tag: UInt64, handler: BlockIOHandler) {
        let slot: UInt32
        if let free = freeSlots.popLast() {
            slot = free
            slots[Int(free)] = Slot(handler: handler, tag: tag)
        } else {
            slot = UInt32(slots.count)
            slots.append(Slot(handler: handler, tag: tag))
        }
        inFlight += 1
        gathered.append(ProxyRequest(link: .passUnretained(link), operation: operation, flags: flags, bitmap: bitmap,
                                     slot: slot, offset: offset, length: length, buffer: buffer))
        if !flushScheduled {
            flushScheduled = true
            loop.runAtTurnEnd(self)
        }
    }

    func read(offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, tag: UInt64, handler: BlockIOHandler) {
        post(.read, offset: offset, length: UInt64(buffer.count), buffer: buffer.baseAddress, tag: tag, handler: handler)
    }

    func write(offset: UInt64, from buffer: UnsafeRawBufferPointer, fua: Bool, tag: UInt64, handler: BlockIOHandler) {
        post(.write, offset: offset, length: UInt64(buffer.count), flags: fua ? 1 : 0,
             buffer: UnsafeMutableRawPointer(mutating: buffer.baseAddress), tag: tag, handler: handler)
    }

    func writeZeroes(offset: UInt64, length: UInt64, options: ZeroOptions, tag: UInt64, handler: BlockIOHandler) {
        post(.writeZeroes, offset: offset, length: length, flags: options.rawValue, tag: tag, handler: handler)
    }

    func trim(offset: UInt64, length: UInt64, fua: Bool, tag: UInt64, handler: BlockIOHandler) {
        post(.trim, offset: offset, length: length, flags: fua ? 1 : 0, tag: tag, handler: handler)
    }

    func flush(tag: UInt64, handler: BlockIOHandler) {
        post(.flush, tag: tag, handler: handler)
    }

    func cache(offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler) {
        post(.cache, offset: offset, length: length, tag: tag, handler: handler)
    }

    func blockStatus(offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler) {
        post(.blockStatus, offset: offset, length: length, tag: tag, handler: handler)
    }

    /// An unknown or inconsistent name fails here, as the device itself would fail it.
    func dirtyBitmapStatus(name: String, offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler) {
        guard let index = dirtyBitmaps.servableIndex(named: name) else {
            return handler.blockIOCompleted(tag: tag, outcome: .failed(.invalid))
        }
        post(.dirtyBitmapStatus, offset: offset, length: length, bitmap: UInt16(index), tag: tag, handler: handler)
    }

    /// The image is the owner's to close (after every proxy is idle); a proxy has nothing of its own.
    func close(tag: UInt64, handler: BlockIOHandler) {
        precondition(inFlight == 0, "a proxy closes only when idle")
        handler.blockIOCompleted(tag: tag, outcome: .done)
    }
}
