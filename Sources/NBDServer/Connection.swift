// One client connection: the glue between a socket, the pure protocol machines and the shared driver.
//
// Life. The Handshake machine negotiates; from its end on, the Transmission machine (NBDProtocol) decides
// everything about the connection's life: where the next socket bytes go, when reading pauses and
// resumes, when it drains and closes, and when it can be forgotten. This class feeds it events and
// executes its actions; it keeps buffers, handles, the request slab and nothing else about the life.
//
// Receive path. libuv asks `streamWantsReadBuffer` before every read, and the answer follows the
// machine's state: request headers (and handshake messages) land in a staging buffer, while the payload
// of a WRITE lands directly in the pooled buffer the driver will write from, so large writes are copied
// once, by the kernel. Parsing runs as long as whole headers are staged, so pipelined requests are
// dispatched in one loop turn.
//
// Requests live in a slab; a slot's index is the tag the driver returns, and replies go out in
// completion order. A slot stays busy until its reply has left the socket, which gives back-pressure
// for free: the machine pauses reading when too many requests or bytes are in flight (including replies
// a slow reader has not drained), or when the memory budget all connections share is spent.
//
// Back-pressure alone would let a client that sends requests and never reads the replies hold its
// buffers forever, so one timer per connection watches the socket while replies are queued: when the
// kernel has taken no byte of them for the send timeout, the connection is cut off.
//
// The socket is used only through the ByteStream surface (reads into a buffer the delegate hands out,
// vectored writes with a context, coalescing, shutdown and close), so after STARTTLS a TLSStream
// wrapping the same socket takes its place. Plaintext staged after the STARTTLS request is dropped,
// never parsed (an attacker on the path could otherwise inject options that would count as sent over
// TLS). The handshake timer keeps running through the TLS handshake, so a client that stalls in it is
// cut off like one that stalls in option haggling.

import BlockDevice
import NBDProtocol
import TLS
import UVCore
#if canImport(Glibc)
import Glibc
#endif

final class Connection {
    let id: Int
    /// The socket, then the TLS stream over it once STARTTLS succeeded.
    var stream: any ByteStream { tls ?? socket }
    private let socket: SocketStream
    /// Credentials for STARTTLS (nil when TLS is off).
    private let tlsCredentials: TLSCredentials?
    /// Set once STARTTLS began; replies and reads go through it from then on.
    private(set) var tls: TLSStream?
    /// `tls != nil`, as a plain flag: replies test it instead of loading `tls` (or an `any ByteStream`),
    /// which costs a retain/release pair per use. Plaintext replies call the socket directly (callgrind,
    /// 4k reads at QD1: an existential `stream` cost ~60 instructions per request more than main).
    @exclusivity(unchecked) private var usesTLS = false
    private unowned let server: any ConnectionOwner
    private let exports: ExportTable
    /// Bytes the client sent, for the server's close log line (bytes sent: stream.bytesWritten).
    private(set) var bytesReceived: UInt64 = 0
    /// The export the handshake chose; set when transmission starts.
    @exclusivity(unchecked) private var export: Export?
    private let pool: BufferPool
    private var log: Logger
    private let limits: ConnectionLimits
    private let budget: MemoryBudget

    // Request-path state is `@exclusivity(unchecked)`: Swift's dynamic exclusivity checks on class
    // properties cost about 80 instructions each, some 20 per 4k read (a third of the server's
    // user-space instructions per request under callgrind), and this loop-confined class never
    // modifies one of these while another access to it is open.
    @exclusivity(unchecked) private var machine: Transmission
    /// Negotiates until transmission starts; nil afterwards.
    private var handshake: Handshake?
    /// The handshake deadline, then the send-stall watch (see `watchSendProgress`).
    private var timer: LoopTimer?
    private var bytesWrittenAtLastCheck: UInt64 = 0
    private var checksWithoutProgress = 0
    @exclusivity(unchecked) private var encoder = ReplyEncoder(style: .simple)
    @exclusivity(unchecked) private var headerSize = 28
    @exclusivity(unchecked) private var extendedHeaders = false
    /// The selected meta contexts: what BLOCK_STATUS asks the device and how it answers.
    @exclusivity(unchecked) private var statusPlan = BlockStatusPlan(selected: [])
    /// The export's device as a bitmap keeper, when a `qemu:dirty-bitmap:` context is selected.
    private var bitmapDevice: DirtyBitmapDevice?
    /// `!statusPlan.bitmaps.isEmpty`, as a plain flag: every completion tests it (callgrind, 4 KiB reads
    /// at QD1: looking at `gatherings` there instead cost ~16 instructions per request).
    @exclusivity(unchecked) private var bitmapsSelected = false
    /// BLOCK_STATUS requests gathering several sources (a bitmap context is selected): the extents
    /// each finished step returned, by slot. The device calls run one after another, so one tag
    /// (the slot) serves them all; empty on connections that select no bitmap.
    @exclusivity(unchecked) private var gatherings: [Int: [[Extent]]] = [:]

    private let staging: UnsafeMutableRawBufferPointer
    @exclusivity(unchecked) private var stagingStart = 0
    @exclusivity(unchecked) private var stagingEnd = 0

    @exclusivity(unchecked) private var slab = RequestSlab()
    /// Handshake replies waiting for their socket write, keyed by write context.
    private var handshakeWrites: [UInt64: UnsafeMutableRawBufferPointer] = [:]
    private var nextHandshakeWrite: UInt64 = 0
    private static let handshakeContextBit: UInt64 = 1 << 63

    init(id: Int, stream: SocketStream, server: any ConnectionOwner, exports: ExportTable, pool: BufferPool, log: Logger,
         limits: ConnectionLimits, budget: MemoryBudget, loop: EventLoop, tls: TLSCredentials? = nil,
         tlsPolicy: TLSPolicy = .off) {
        self.id = id
        self.socket = stream
        self.tlsCredentials = tlsPolicy == .off ? nil : tls
        self.server = server
        self.exports = exports
        self.pool = pool
        self.log = log
        self.limits = limits
        self.budget = budget
        self.staging = .allocate(byteCount: Self.stagingSize, alignment: 16)
        self.handshake = exports.handshake(forPeer: stream.peerDescription, tls: tls == nil ? .off : tlsPolicy)
        self.machine = Transmission(limits: TransmissionLimits(maximumRequests: limits.maximumRequests,
                                                               maximumBytes: limits.maximumInFlightBytes))
        let timer = LoopTimer(loop: loop)
        self.timer = timer
        stream.delegate = self
        // Replies produced in one loop turn (pipelined requests answered from the page cache, a batch of
        // pool completions) leave in one writev instead of one each.
        socket.coalesceWrites()
        socket.enlargeUnixSendBuffer(toAtLeast: Self.sendBufferSize)
        timer.start(afterMilliseconds: limits.handshakeTimeoutMilliseconds) { [unowned self] in
            let actions = self.machine.handshakeTimedOut()
            if !actions.isEmpty {
                self.log.info("connection \(self.id) from \(self.stream.peerDescription): handshake timed out")
            }
            self.perform(actions)
        }
    }

    deinit {
        staging.deallocate()
        slab.deallocateAll()
        for (_, b) in handshakeWrites { b.deallocate() }
    }

    /// Unix sockets only (TCP autotunes): the kernel doubles it, so two 1 MiB replies fit and a big read
    /// leaves in one write instead of five or six. Not more: at 4 MiB the socket's pages no longer stay in
    /// the cache and seqread 1M cost more CPU per MiB than with the default (~208 KiB).
    private static let sendBufferSize = 1 << 20

    /// Staging holds the largest handshake message (an option payload) plus a header.
    private static let stagingSize = (64 << 10) + 4096

    func start() {
        sendHandshakeBytes(Handshake.greeting)
        stream.startReading()
    }

    /// Server shutdown: finish what was asked, answer it, then close.
    func beginShutdown() {
        perform(machine.shutdown())
    }

    /// Closes at once, whatever is in flight (the server's shutdown deadline).
    func close() {
        perform(machine.forceClose())
    }

    /// The shared budget has room again.
    func budgetAvailable() {
        perform(machine.budgetAvailable())
    }

    // MARK: - Actions

    /// Executes actions in order; `header` is the request just parsed, for `accept` and `reject`.
    private func perform(_ actions: TransmissionActions, header: Request? = nil) {
        for action in actions { perform(action, header: header) }
    }

    private func perform(_ action: TransmissionAction, header: Request? = nil) {
        switch action {
        case .accept(let i, let command, let payload):
            let taken = slab.allocate()
            precondition(taken == i, "slot \(taken) taken where \(i) was announced")
            stagingStart += headerSize
            slab[i].request = header!
            slab[i].command = command
            if payload > 0 {
                slab[i].buffer = pool.take(count: payload)
                budget.take(payload)
            }
        case .execute(let i):
            execute(slot: i)
        case .reject(let i, let error):
            let reason = machine.rejectionReason
            let taken = slab.allocate()
            precondition(taken == i, "slot \(taken) taken where \(i) was announced")
            slab[i].request = header!
            stagingStart += headerSize
            log.debug("connection \(id): request rejected (\(error)): \(reason)")
            // The reply is built now, while the reason is at hand, and sent once any payload is drained.
            slab[i].rejectionLength = encodeCompletion(slot: i, error: error, message: reason)
        case .sendRejection(let i):
            sendRejection(slot: i)
        case .sendReply:
            preconditionFailure("replies are sent by completed(slot:outcome:), which has the outcome")
        case .release(let i):
            release(slot: i)
        case .stopReading:
            stream.stopReading()
        case .waitForBudget:
            stream.stopReading()
            budget.wait(self)
        case .resumeReading:
            stream.startReading()
            processInput()
        case .shutdownAndClose:
            stream.shutdownAndClose()
        case .close:
            closeTimer()
            stream.stopReading()
            stream.close()
        case .finish:
            server.connectionDidFinish(self)
        }
    }

    // MARK: - Receiving

    private var stagedCount: Int { stagingEnd - stagingStart }

    /// The staged request header (only valid while one is staged).
    private var currentHeader: UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: staging[stagingStart..<stagingStart + headerSize])
    }

    /// Moves staged bytes to the front when the tail is too short for the next message.
    private func compactStaging() {
        if stagingStart == stagingEnd {
            stagingStart = 0
            stagingEnd = 0
        } else if stagingStart > 0 && Self.stagingSize - stagingEnd < 4096 + 64 {
            let n = stagedCount
            staging.baseAddress!.copyMemory(from: staging.baseAddress! + stagingStart, byteCount: n)
            stagingStart = 0
            stagingEnd = n
        }
    }

    fileprivate func readBuffer() -> UnsafeMutableRawBufferPointer {
        if case .receivingPayload(let i, let remaining) = machine.state {
            let bytes = slab[i].buffer!.bytes
            return UnsafeMutableRawBufferPointer(rebasing: bytes[(bytes.count - remaining)...])
        }
        compactStaging()
        precondition(stagingEnd < Self.stagingSize, "staging buffer full while reading")
        return UnsafeMutableRawBufferPointer(rebasing: staging[stagingEnd...])
    }

    fileprivate func didRead(_ count: Int) {
        if case .receivingPayload = machine.state {
            perform(machine.receivedPayload(count))
        } else {
            stagingEnd += count
        }
        processInput()
    }

    /// Consumes staged bytes until a message is incomplete or the machine stops taking input.
    private func processInput() {
        loop: while true {
            switch machine.state {
            case .negotiating:
                guard handshakeStep() else { break loop }
            case .awaitingHeader:
                guard stagedCount >= headerSize else { break loop }
                guard let request = Request.parse(currentHeader, extended: extendedHeaders) else {
                    log.info("connection \(id) from \(stream.peerDescription): bad request magic, closing")
                    perform(machine.receivedMalformedHeader())
                    break loop
                }
                let actions = machine.receivedHeader(request, slot: slab.nextSlot, memory: budget.snapshot)
                if let reason = machine.endReason {
                    if actions.contains(.close) {
                        log.info("connection \(id) from \(stream.peerDescription): \(reason), closing")
                    } else {
                        log.debug("connection \(id): \(reason)")
                    }
                }
                perform(actions, header: request)
            case .receivingPayload(let i, let remaining):
                // Payload bytes that arrived with the header; the rest is read straight into the buffer.
                let n = min(remaining, stagedCount)
                guard n > 0 else { break loop }
                let bytes = slab[i].buffer!.bytes
                (bytes.baseAddress! + (bytes.count - remaining))
                    .copyMemory(from: staging.baseAddress! + stagingStart, byteCount: n)
                stagingStart += n
                perform(machine.receivedPayload(n))
            case .discardingPayload(_, let remaining):
                let n = min(remaining, stagedCount)
                guard n > 0 else { break loop }
                stagingStart += n
                perform(machine.receivedPayload(n))
            case .paused, .draining, .closing, .closed, .finished:
                break loop
            }
        }
        compactStaging()
    }

    /// Feeds one handshake message if it is complete. Returns whether to keep going.
    private func handshakeStep() -> Bool {
        guard var negotiation = handshake else { return false }
        let need = negotiation.bytesNeeded
        guard stagedCount >= need else { return false }
        let bytes = Array(UnsafeRawBufferPointer(rebasing: staging[stagingStart..<stagingStart + need]))
        stagingStart += need
        let action = negotiation.receive(bytes)
        handshake = negotiation
        switch action {
        case .proceed(let reply):
            if !reply.isEmpty { sendHandshakeBytes(reply) }
            return true
        case .startTransmission(let reply, let session):
            sendHandshakeBytes(reply)
            enterTransmission(session)
            return true
        case .abort(let reply):
            log.debug("connection \(id): client aborted the handshake")
            sendHandshakeBytes(reply)
            perform(machine.handshakeAborted())
            return false
        case .close(let reason):
            log.info("connection \(id) from \(stream.peerDescription): \(reason)")
            perform(machine.handshakeFailed())
            return false
        case .startTLS(let reply):
            sendHandshakeBytes(reply)
            startTLS()
            return false
        }
    }

    /// After the STARTTLS ACK (queued on the socket ahead of the TLS records): drop the plaintext staged
    /// behind the request and let a TLSStream take the socket over. The handshake timer keeps running.
    private func startTLS() {
        stagingStart = stagingEnd
        guard let credentials = tlsCredentials, !socket.isClosing else { return }
        do {
            let session = try TLSStream(wrapping: socket, credentials: credentials, delegate: self)
            tls = session
            usesTLS = true
            session.startReading()
        } catch {
            log.warning("connection \(id) from \(socket.peerDescription): cannot start TLS: \(error)")
            perform(machine.handshakeFailed())
        }
    }

    private func enterTransmission(_ session: NegotiatedSession) {
        handshake = nil
        guard let chosen = exports.attach(session.export, connection: id) else {
            // A reload removed or changed the export, or other clients filled it, while this one negotiated.
            log.info("connection \(id): export \"\(session.export.name)\" is gone, changed or full, closing")
            perform(machine.handshakeFailed())
            return
        }
        export = chosen
        log = log.labelled("export \"\(chosen.name)\"")
        encoder = ReplyEncoder(style: ReplyStyle(session: session))
        extendedHeaders = session.extendedHeaders
        headerSize = Request.headerSize(extended: session.extendedHeaders)
        statusPlan = BlockStatusPlan(selected: session.metaContexts)
        bitmapsSelected = !statusPlan.bitmaps.isEmpty
        if bitmapsSelected { bitmapDevice = chosen.device as? DirtyBitmapDevice }
        perform(machine.handshakeFinished(session))
        watchSendProgress()
        log.debug("connection \(id): transmission (\(encoder.style), contexts \(session.metaContexts.map(\.name)))")
    }

    // MARK: - Executing

    private func execute(slot i: Int) {
        let r = slab[i].request
        let device = export!.device
        let tag = UInt64(i)
        switch slab[i].command {
        case .read:
            if r.length == 0 { return reply(slot: i, error: .ok) }
            let buffer = pool.take(count: Int(r.length))
            slab[i].buffer = buffer
            budget.take(Int(r.length))
            device.read(offset: r.offset, into: buffer.bytes, tag: tag, handler: self)
        case .write:
            let bytes = slab[i].buffer.map { UnsafeRawBufferPointer($0.bytes) } ?? UnsafeRawBufferPointer(start: nil, count: 0)
            device.write(offset: r.offset, from: bytes, fua: r.flags.contains(.fua), tag: tag, handler: self)
        case .flush:
            device.flush(tag: tag, handler: self)
        case .trim:
            device.trim(offset: r.offset, length: r.length, fua: r.flags.contains(.fua), tag: tag, handler: self)
        case .writeZeroes:
            var options: ZeroOptions = []
            if r.flags.contains(.noHole) { options.insert(.noHole) }
            if r.flags.contains(.fastZero) { options.insert(.fastZero) }
            if r.flags.contains(.fua) { options.insert(.fua) }
            device.writeZeroes(offset: r.offset, length: r.length, options: options, tag: tag, handler: self)
        case .cache:
            device.cache(offset: r.offset, length: r.length, tag: tag, handler: self)
        case .blockStatus:
            if !bitmapsSelected {
                device.blockStatus(offset: r.offset, length: r.length, tag: tag, handler: self)
            } else {
                gatherings[i] = []
                gatherNext(slot: i)
            }
        case .disconnect:
            preconditionFailure("DISC is never executed")
        }
    }

    /// Starts the next device call of a gathering BLOCK_STATUS. The call may complete inline, which
    /// starts the one after it from inside this one: recursion as deep as the selected bitmaps.
    private func gatherNext(slot i: Int) {
        let r = slab[i].request
        let tag = UInt64(i)
        guard let name = statusPlan.bitmap(atStep: gatherings[i]!.count) else {
            return export!.device.blockStatus(offset: r.offset, length: r.length, tag: tag, handler: self)
        }
        guard let bitmapDevice else {
            return gathered(slot: i, outcome: .failed(BlockError(errno: BlockError.invalid.errno, message: "no bitmap \(name)")))
        }
        bitmapDevice.dirtyBitmapStatus(name: name, offset: r.offset, length: r.length, tag: tag, handler: self)
    }

    /// One step of a gathering BLOCK_STATUS finished: start the next, or reply once all are in. The
    /// first failure fails the request.
    private func gathered(slot i: Int, outcome: BlockOutcome) {
        guard case .extents(let extents) = outcome else {
            gatherings[i] = nil
            return completed(slot: i, outcome: outcome)
        }
        gatherings[i]!.append(extents)
        if gatherings[i]!.count < statusPlan.steps { return gatherNext(slot: i) }
        var results = gatherings.removeValue(forKey: i)!
        let allocation = statusPlan.needsAllocation ? results.removeFirst() : []
        for action in machine.requestCompleted(slot: i) {
            guard case .sendReply = action else {
                perform(action)
                continue
            }
            replyBlockStatus(slot: i, allocation: allocation, bitmaps: results)
        }
    }

    fileprivate func completed(slot i: Int, outcome: BlockOutcome) {
        for action in machine.requestCompleted(slot: i) {
            guard case .sendReply = action else {
                perform(action)
                continue
            }
            switch outcome {
            case .failed(let error):
                if log.enabled(.debug) { log.debug("connection \(id): \(slab[i].command) failed: \(error)") }
                reply(slot: i, error: NBDErrorCode(errno: error.errno), message: error.description)
            case .done:
                reply(slot: i, error: .ok)
            case .read(let zeroRanges):
                replyRead(slot: i, zeroRanges: zeroRanges)
            case .extents(let extents):
                replyBlockStatus(slot: i, allocation: extents, bitmaps: [])
            }
        }
    }

    // MARK: - Replying

    private func reply(slot i: Int, error: NBDErrorCode, message: String = "") {
        let n = encodeCompletion(slot: i, error: error, message: message)
        send(slot: i, UnsafeRawBufferPointer(start: slab[i].overflow?.baseAddress ?? slab[i].headers.baseAddress!, count: n))
    }

    /// Writes a data-less reply (success, or an error with its message) into the slot's scratch.
    private func encodeCompletion(slot i: Int, error: NBDErrorCode, message: String) -> Int {
        let r = slab[i].request
        var message = message
        let out = scratch(slot: i, size: encoder.completionSize(messageLength: message.utf8.count))
        return message.withUTF8 { text in
            encoder.completion(into: out, cookie: r.cookie, requestOffset: r.offset, error: error,
                               message: UnsafeRawBufferPointer(text))
        }
    }

    private func sendRejection(slot i: Int) {
        let base = slab[i].overflow?.baseAddress ?? slab[i].headers.baseAddress!
        send(slot: i, UnsafeRawBufferPointer(start: base, count: slab[i].rejectionLength))
    }

    /// Memory for a reply of `size` bytes that lives until the slot is released.
    private func scratch(slot i: Int, size: Int) -> UnsafeMutableRawPointer {
        if size <= RequestSlot.headerBytes { return slab[i].headers.baseAddress! }
        let extra = UnsafeMutableRawBufferPointer.allocate(byteCount: size, alignment: 16)
        slab[i].overflow = extra
        return extra.baseAddress!
    }

    private func replyRead(slot i: Int, zeroRanges: [Range<UInt64>]) {
        let r = slab[i].request
        let data = UnsafeRawBufferPointer(slab[i].buffer!.bytes)
        let headers = slab[i].headers.baseAddress!
        // Holes become OFFSET_HOLE chunks when the client can take them (structured, no DF) and the
        // split fits one vectored write; otherwise the zeros already in the buffer go out as data.
        if encoder.style != .simple && !zeroRanges.isEmpty && !r.flags.contains(.dontFragment)
            && zeroRanges.count <= 7 {
            var parts: [UnsafeRawBufferPointer] = []
            parts.reserveCapacity(16)
            var used = 0
            var position: UInt64 = 0
            var segments: [(range: Range<UInt64>, hole: Bool)] = []
            for z in zeroRanges {
                if z.lowerBound > position { segments.append((position..<z.lowerBound, false)) }
                segments.append((z, true))
                position = z.upperBound
            }
            if position < r.length { segments.append((position..<r.length, false)) }
            for (k, s) in segments.enumerated() {
                let done = k == segments.count - 1
                let h = headers + used
                let n: Int
                if s.hole {
                    n = encoder.holeChunk(into: h, cookie: r.cookie, requestOffset: r.offset,
                                          holeOffset: r.offset + s.range.lowerBound,
                                          holeLength: UInt32(s.range.count), done: done)
                    parts.append(UnsafeRawBufferPointer(start: h, count: n))
                } else {
                    n = encoder.dataHeader(into: h, cookie: r.cookie, requestOffset: r.offset,
                                           dataOffset: r.offset + s.range.lowerBound, dataLength: s.range.count, done: done)
                    parts.append(UnsafeRawBufferPointer(start: h, count: n))
                    parts.append(UnsafeRawBufferPointer(rebasing: data[Int(s.range.lowerBound)..<Int(s.range.upperBound)]))
                }
                used += n
            }
            return send(slot: i, parts)
        }
        let n = encoder.dataHeader(into: headers, cookie: r.cookie, requestOffset: r.offset,
                                   dataOffset: r.offset, dataLength: data.count, done: true)
        send(slot: i, UnsafeRawBufferPointer(start: headers, count: n), data)
    }

    /// One chunk per selected context, in context-id order, each cut from its source's extents:
    /// `allocation` (blockStatus) for the allocation contexts, `bitmaps[k]` for the k-th bitmap.
    private func replyBlockStatus(slot i: Int, allocation: [Extent], bitmaps: [[Extent]]) {
        let r = slab[i].request
        let maximumLength: UInt64 = extendedHeaders ? .max : UInt64(UInt32.max)
        var chunks: [(id: UInt32, extents: [(length: UInt64, flags: UInt32)])] = []
        chunks.reserveCapacity(statusPlan.contexts.count)
        for context in statusPlan.contexts {
            var source = allocation
            if case .dirtyBitmap(let index) = context.source { source = index < bitmaps.count ? bitmaps[index] : [] }
            chunks.append((context.id, BlockStatusPlan.chunk(source, source: context.source, length: r.length,
                                                             requestOne: r.flags.contains(.requestOne),
                                                             maximumLength: maximumLength)))
        }
        let size = chunks.reduce(0) { $0 + encoder.blockStatusSize(count: $1.extents.count) }
        let out = scratch(slot: i, size: size)
        var used = 0
        for (k, chunk) in chunks.enumerated() {
            used += encoder.blockStatusChunk(into: out + used, cookie: r.cookie, requestOffset: r.offset,
                                             contextID: chunk.id, extents: chunk.extents, done: k == chunks.count - 1)
        }
        send(slot: i, UnsafeRawBufferPointer(start: out, count: used))
    }

    /// Sends a reply of one or two parts (header, data) without building an array. Inlined: called
    /// out of line, it cost each 4 KiB read ~40 instructions more (callgrind).
    @inline(__always)
    private func send(slot i: Int, _ first: UnsafeRawBufferPointer, _ second: UnsafeRawBufferPointer? = nil) {
        let outcome = withUnsafeTemporaryAllocation(of: UnsafeRawBufferPointer.self, capacity: 2) { parts in
            parts[0] = first
            var count = 1
            if let second {
                parts[1] = second
                count = 2
            }
            return write(UnsafeBufferPointer(rebasing: parts[0..<count]), context: UInt64(i))
        }
        sent(slot: i, outcome)
    }

    private func send(slot i: Int, _ parts: [UnsafeRawBufferPointer]) {
        sent(slot: i, parts.withUnsafeBufferPointer { write($0, context: UInt64(i)) })
    }

    /// The plaintext path is a direct call on the socket; after STARTTLS, the TLS stream encrypts.
    @inline(__always)
    private func write(_ buffers: UnsafeBufferPointer<UnsafeRawBufferPointer>, context: UInt64) -> WriteOutcome {
        if usesTLS { return tls!.write(buffers, context: context) }
        return socket.write(buffers, context: context)
    }

    private func sent(slot i: Int, _ outcome: WriteOutcome) {
        switch outcome {
        case .completed: release(slot: i)
        case .pending: break
        case .failed(let error):
            release(slot: i)
            let actions = machine.writeFailed()
            if !actions.isEmpty { log.info("connection \(id): write failed: \(error)") }
            perform(actions)
        }
    }

    private func sendHandshakeBytes(_ bytes: [UInt8]) {
        let copy = UnsafeMutableRawBufferPointer.allocate(byteCount: bytes.count, alignment: 8)
        copy.copyBytes(from: bytes)
        let context = Self.handshakeContextBit | nextHandshakeWrite
        nextHandshakeWrite += 1
        let parts = [UnsafeRawBufferPointer(copy)]
        let outcome = parts.withUnsafeBufferPointer { write($0, context: context) }
        switch outcome {
        case .completed: copy.deallocate()
        case .pending: handshakeWrites[context] = copy
        case .failed:
            copy.deallocate()
            perform(machine.writeFailed())
        }
    }

    fileprivate func writeFinished(context: UInt64, error: UVError?) {
        if context & Self.handshakeContextBit != 0 {
            handshakeWrites.removeValue(forKey: context)?.deallocate()
        } else {
            release(slot: Int(context))
        }
        if let error {
            let actions = machine.writeFailed()
            if !actions.isEmpty { log.info("connection \(id): write failed: \(error)") }
            perform(actions)
        }
    }

    /// Frees a slot and tells the machine, which may resume reading, end a drain or finish.
    private func release(slot i: Int) {
        let bytes = slab[i].buffer?.bytes.count ?? 0
        slab.release(i, pool: pool)
        let actions = machine.requestReleased(bytes: bytes)
        // Giving budget back may resume other connections (or this one, through budgetAvailable); the
        // machine has already counted the release, so it sees the same numbers either way.
        if bytes > 0 { budget.give(bytes) }
        perform(actions)
    }

    // MARK: - Send stalls

    /// A timeout is checked this many times, so a stall is noticed between one and 1.25 timeouts
    /// after the last byte left.
    private static let checksPerSendTimeout = 4

    /// Turns the handshake timer into a periodic check of reply progress (or closes it when the
    /// send timeout is off): one timer per connection, and nothing at all per request.
    private func watchSendProgress() {
        guard let timer else { return }
        let timeout = limits.sendTimeoutMilliseconds
        guard timeout > 0 else { return closeTimer() }
        let period = max(timeout / UInt64(Self.checksPerSendTimeout), 1)
        bytesWrittenAtLastCheck = stream.bytesWritten
        checksWithoutProgress = 0
        timer.start(afterMilliseconds: period, repeatMilliseconds: period) { [unowned self] in
            self.checkSendProgress()
        }
    }

    private func checkSendProgress() {
        let written = stream.bytesWritten
        let queued = stream.pendingWriteBytes
        if queued == 0 || written != bytesWrittenAtLastCheck {
            bytesWrittenAtLastCheck = written
            checksWithoutProgress = 0
            return
        }
        checksWithoutProgress += 1
        guard checksWithoutProgress > Self.checksPerSendTimeout else { return }
        let actions = machine.sendStalled()
        if !actions.isEmpty {
            log.info("connection \(id) from \(stream.peerDescription): the client read none of \(queued) queued "
                     + "reply bytes for \(limits.sendTimeoutMilliseconds) ms, closing")
        }
        perform(actions)
    }

    private func closeTimer() {
        timer?.close()
        timer = nil
    }

    // MARK: - Closing

    fileprivate func readFailed(_ error: UVError) {
        if error != .eof { log.info("connection \(id) from \(stream.peerDescription): read failed: \(error)") }
        else { log.debug("connection \(id): client closed the connection") }
        perform(machine.peerClosed())
    }

    fileprivate func didClose() {
        budget.forget(self)
        closeTimer()
        perform(machine.socketClosed())
    }
}

extension Connection: TLSStreamDelegate {
    func tlsStreamDidCompleteHandshake(_ stream: TLSStream) {
        let who = stream.pskUsername.map { "PSK user \"\($0)\"" } ?? stream.peerCertificateDN.map { "certificate \"\($0)\"" }
        log.debug("connection \(id): TLS \(stream.sessionDescription ?? "?")\(who.map { ", " + $0 } ?? "")")
        guard handshake?.state == .awaitingTLS else { return }
        handshake!.tlsEstablished(pskUsername: stream.pskUsername)
        processInput()
    }

    func tlsStream(_ stream: TLSStream, didFail error: TLSError) {
        log.info("connection \(id) from \(stream.peerDescription): TLS failed: \(error)")
        if case .negotiating = machine.state {
            perform(machine.handshakeFailed())
        } else {
            perform(machine.peerClosed())
        }
    }

    func streamWantsReadBuffer(_ stream: any ByteStream) -> UnsafeMutableRawBufferPointer { readBuffer() }

    func stream(_ stream: any ByteStream, didRead count: Int) {
        bytesReceived &+= UInt64(count)
        didRead(count)
    }

    func stream(_ stream: any ByteStream, didFailReadingWith error: UVError) {
        readFailed(error)
    }

    func stream(_ stream: any ByteStream, didFinishWrite context: UInt64, error: UVError?) {
        writeFinished(context: context, error: error)
    }

    func streamDidClose(_ stream: any ByteStream) { didClose() }
}

extension Connection: SocketStreamDelegate {
    func streamWantsReadBuffer(_ stream: SocketStream) -> UnsafeMutableRawBufferPointer { readBuffer() }

    func stream(_ stream: SocketStream, didRead count: Int) {
        bytesReceived &+= UInt64(count)
        didRead(count)
    }

    func stream(_ stream: SocketStream, didFailReadingWith error: UVError) {
        readFailed(error)
    }

    func stream(_ stream: SocketStream, didFinishWrite context: UInt64, error: UVError?) {
        writeFinished(context: context, error: error)
    }

    func streamDidClose(_ stream: SocketStream) { didClose() }
}

extension Connection: BlockIOHandler {
    func blockIOCompleted(tag: UInt64, outcome: BlockOutcome) {
        if bitmapsSelected, gatherings[Int(tag)] != nil { return gathered(slot: Int(tag), outcome: outcome) }
        completed(slot: Int(tag), outcome: outcome)
    }
}

/// Per-connection resource bounds.
public struct ConnectionLimits: Sendable {
    /// Requests in flight (including replies not yet written) before reading pauses.
    public var maximumRequests = 256
    /// Payload and read bytes in flight before reading pauses: room for a few maximum-size requests
    /// (the shared budget in ServerConfiguration bounds all connections together).
    public var maximumInFlightBytes = 64 << 20
    /// A client must finish the handshake within this time.
    public var handshakeTimeoutMilliseconds: UInt64 = 10_000
    /// A connection whose queued replies make no progress for this long is closed (0: never), so a
    /// client that stops reading cannot pin its buffers.
    public var sendTimeoutMilliseconds: UInt64 = 30_000

    public init() {}
}
