// The life of one connection after the greeting, as a pure state machine.
//
// The connection feeds events (a header was staged, payload bytes arrived, the driver completed a
// request, a reply left the socket, the peer closed, the server is shutting down, ...) and executes the
// actions that come back, in order. The machine owns every decision about the connection's life: where
// the next bytes from the socket go, when reading pauses and resumes, when the connection drains and
// when it may be forgotten. The connection owns buffers and handles only.
//
// Requests are named by the connection's slot numbers: the connection says which slot the next request
// would get, and every action about a request names it. The machine counts what is in flight (requests
// whose slot is busy, including replies still being written, and the bytes of their buffers) because
// back-pressure depends on it.
//
// Negotiation itself is the Handshake machine's; this machine only knows that it is under way, so that
// a timeout, a shutdown or an ABORT during it end the connection the same way as later ones do. A
// STARTTLS stays inside `negotiating`: the connection swaps its plaintext stream for a TLS one with the
// same surface and drops whatever plaintext it had staged; nothing here depends on which stream it is.

/// Per-connection bounds on what may be in flight before reading pauses.
public struct TransmissionLimits: Sendable, Equatable {
    /// Requests in flight, including replies not yet written.
    public var maximumRequests: Int
    /// Bytes of request and reply buffers in flight.
    public var maximumBytes: Int

    public init(maximumRequests: Int, maximumBytes: Int) {
        self.maximumRequests = maximumRequests
        self.maximumBytes = maximumBytes
    }
}

/// How much of the memory budget shared by all connections is in use, when a header is staged.
public struct SharedMemory: Sendable, Equatable {
    public var used: Int
    public var limit: Int

    public init(used: Int, limit: Int) {
        self.used = used
        self.limit = limit
    }

    /// Whether a request holding `cost` more bytes fits. One request may exceed the budget when nothing
    /// else is held, so a budget smaller than the largest request cannot wedge every connection.
    func admits(_ cost: Int) -> Bool {
        cost == 0 || used == 0 || used + cost <= limit
    }
}

/// One thing the connection must do. Actions come in the order they must be executed, and those that
/// hand work out (`execute`, `sendRejection`, `release`) come after any change to reading: their
/// completions may re-enter the machine at once (a driver that answers synchronously, a failed write),
/// and a resume they cause must not be undone by a `stopReading` still queued behind them.
public enum TransmissionAction: Equatable, Sendable {
    /// Consume the staged header: it becomes the request in `slot`, of `command`. A WRITE's payload of
    /// `payload` bytes follows (take its buffer now; the machine then counts payload bytes in).
    case accept(slot: Int, command: NBDCommand, payload: Int)
    /// Hand the request in `slot` to the driver (a READ takes its buffer now).
    case execute(slot: Int)
    /// Consume the staged header: it becomes the rejected request in `slot`. Build its error reply now,
    /// with `Transmission.rejectionReason` as its message; `sendRejection` follows once any payload has
    /// been dropped.
    case reject(slot: Int, error: NBDErrorCode)
    /// Send the error reply built for the rejected request in `slot`.
    case sendRejection(slot: Int)
    /// Encode and send the reply of the request in `slot`, which the driver completed.
    case sendReply(slot: Int)
    /// Free `slot` without a reply: its request never reached the driver, or its reply can no longer
    /// be sent. Report `requestReleased` as for any slot.
    case release(slot: Int)
    /// Stop asking the socket for bytes. The header that caused it (if any) stays staged.
    case stopReading
    /// Stop reading and join the shared budget's queue; `budgetAvailable` follows when there is room.
    /// The staged header stays staged.
    case waitForBudget
    /// Start reading again and process what is already staged.
    case resumeReading
    /// Let the queued replies leave, shut down the sending side, then close the socket.
    case shutdownAndClose
    /// Close the socket now; queued replies are cancelled (their writes report failure).
    case close
    /// Nothing is left in flight and the socket is closed: the connection can be forgotten.
    case finish
}

/// The actions one event produced: at most four, stored inline and trivially copyable, so the request
/// path neither allocates nor retains.
public struct TransmissionActions: Sequence, Equatable, Sendable {
    @usableFromInline var a0: TransmissionAction = .stopReading
    @usableFromInline var a1: TransmissionAction = .stopReading
    @usableFromInline var a2: TransmissionAction = .stopReading
    @usableFromInline var a3: TransmissionAction = .stopReading
    public private(set) var count = 0

    @inlinable public init() {}

    init(_ first: TransmissionAction) {
        append(first)
    }

    init(_ first: TransmissionAction, _ second: TransmissionAction) {
        append(first)
        append(second)
    }

    mutating func append(_ action: TransmissionAction) {
        switch count {
        case 0: a0 = action
        case 1: a1 = action
        case 2: a2 = action
        case 3: a3 = action
        default: preconditionFailure("more than four transmission actions for one event")
        }
        count += 1
    }

    mutating func append(contentsOf other: TransmissionActions) {
        for a in other { append(a) }
    }

    @inlinable public subscript(i: Int) -> TransmissionAction {
        precondition(i >= 0 && i < count)
        switch i {
        case 0: return a0
        case 1: return a1
        case 2: return a2
        default: return a3
        }
    }

    @inlinable public var isEmpty: Bool { count == 0 }

    public struct Iterator: IteratorProtocol {
        @usableFromInline let actions: TransmissionActions
        @usableFromInline var position = 0

        @inlinable init(actions: TransmissionActions) { self.actions = actions }

        @inlinable public mutating func next() -> TransmissionAction? {
            guard position < actions.count else { return nil }
            defer { position += 1 }
            return actions[position]
        }
    }

    @inlinable public func makeIterator() -> Iterator { Iterator(actions: self) }

    public static func == (a: TransmissionActions, b: TransmissionActions) -> Bool {
        a.elementsEqual(b)
    }
}

public struct Transmission: Sendable {
    /// Where the connection is. Each case says what it waits for and where socket bytes go.
    public enum State: Equatable, Sendable {
        /// The handshake machine is negotiating; staged bytes are its messages.
        case negotiating
        /// Reading request headers into the staging buffer.
        case awaitingHeader
        /// Reading the payload of the WRITE in `slot` straight into its buffer; `remaining` bytes to go.
        case receivingPayload(slot: Int, remaining: Int)
        /// Reading and dropping `remaining` payload bytes of the rejected request in `slot`; its error
        /// reply is sent once they are gone, so the stream stays in sync.
        case discardingPayload(slot: Int, remaining: Int)
        /// Not reading until `reason` clears. Staged bytes (possibly a whole header) wait.
        case paused(PauseReason)
        /// No more requests are read: waiting for every request in flight to finish and its reply to be
        /// handed to the socket, then the socket is shut down.
        case draining(DrainReason)
        /// The socket is shutting down or closing; waiting for its close to be reported.
        case closing
        /// The socket is closed; waiting for the driver to complete what it was given, since it may still
        /// be writing into the connection's buffers.
        case closed
        /// Nothing is left; the connection has been told to finish and takes no more events.
        case finished
    }

    /// Why reading is paused, and so what resumes it.
    public enum PauseReason: Equatable, Sendable {
        /// `maximumRequests` are in flight: resumes when at most half are.
        case requests
        /// `maximumBytes` are in flight: resumes when at most half are.
        case bytes
        /// The shared budget had no room for the staged request: resumes when the budget says so.
        case sharedBudget
    }

    /// Why the connection drains.
    public enum DrainReason: Equatable, Sendable {
        /// The client sent NBD_CMD_DISC.
        case clientDisconnect
        /// The server is shutting down.
        case serverShutdown
    }

    public private(set) var state: State = .negotiating
    /// Requests whose slot is busy: receiving a payload, at the driver, or replying.
    public private(set) var requestsInFlight = 0
    /// Bytes of request and reply buffers those requests hold.
    public private(set) var bytesInFlight = 0
    public let limits: TransmissionLimits
    /// Set when negotiation finishes; every header is checked against it.
    private var validator: RequestValidator?
    /// Why the last header ended the connection (DISC, or a request that desynchronises the stream), for
    /// the log; nil while requests are served.
    public private(set) var endReason: String?
    /// Why the last rejected request was rejected: the message of its error reply. (Kept out of the
    /// action so that actions stay trivially copyable.)
    public private(set) var rejectionReason = ""

    public init(limits: TransmissionLimits) {
        self.limits = limits
    }

    /// The negotiated session, once transmission has started.
    public var session: NegotiatedSession? { validator?.session }

    // MARK: - Negotiation

    /// The handshake finished: requests follow.
    public mutating func handshakeFinished(_ session: NegotiatedSession) -> TransmissionActions {
        precondition(state == .negotiating, "handshake finished in \(state)")
        validator = RequestValidator(session: session)
        state = .awaitingHeader
        return TransmissionActions()
    }

    /// The client sent NBD_OPT_ABORT and its acknowledgement is queued: let it leave, then close.
    public mutating func handshakeAborted() -> TransmissionActions {
        guard state == .negotiating else { return TransmissionActions() }
        state = .closing
        return TransmissionActions(.stopReading, .shutdownAndClose)
    }

    /// The handshake machine gave up on the client (or the chosen export vanished).
    public mutating func handshakeFailed() -> TransmissionActions {
        guard state == .negotiating else { return TransmissionActions() }
        return closeNow()
    }

    /// The client did not finish negotiating in time; ignored once transmission has started.
    public mutating func handshakeTimedOut() -> TransmissionActions {
        guard state == .negotiating else { return TransmissionActions() }
        return closeNow()
    }

    // MARK: - Requests

    /// A whole request header is staged (only asked for in `awaitingHeader`). `slot` is the slot the
    /// request gets if it is accepted or rejected; `memory` is the shared budget's state.
    public mutating func receivedHeader(_ request: Request, slot: Int, memory: SharedMemory) -> TransmissionActions {
        precondition(state == .awaitingHeader, "header received in \(state)")
        switch validator!.validate(request) {
        case .execute(let command, let payload):
            let cost = command == .read ? Int(request.length) : payload
            if !memory.admits(cost) {
                state = .paused(.sharedBudget)
                return TransmissionActions(.waitForBudget)
            }
            requestsInFlight += 1
            bytesInFlight += cost
            var actions = TransmissionActions(.accept(slot: slot, command: command, payload: payload))
            if payload > 0 {
                state = .receivingPayload(slot: slot, remaining: payload)
            } else {
                actions.append(contentsOf: readNextHeader())
                actions.append(.execute(slot: slot))
            }
            return actions
        case .reject(let error, let payload, let reason):
            requestsInFlight += 1
            rejectionReason = reason
            var actions = TransmissionActions(.reject(slot: slot, error: error))
            if payload > 0 {
                state = .discardingPayload(slot: slot, remaining: payload)
            } else {
                actions.append(contentsOf: readNextHeader())
                actions.append(.sendRejection(slot: slot))
            }
            return actions
        case .disconnect:
            endReason = "client sent DISC"
            return drain(.clientDisconnect)
        case .fatal(let reason):
            endReason = reason
            return closeNow()
        }
    }

    /// The staged bytes are not a request header: the stream cannot be trusted any more.
    public mutating func receivedMalformedHeader() -> TransmissionActions {
        precondition(state == .awaitingHeader, "header received in \(state)")
        endReason = "bad request magic"
        return closeNow()
    }

    /// `count` payload bytes arrived (or were taken from staging) for the request whose payload is being
    /// received or dropped.
    public mutating func receivedPayload(_ count: Int) -> TransmissionActions {
        switch state {
        case .receivingPayload(let slot, let remaining):
            precondition(count > 0 && count <= remaining, "\(count) payload bytes with \(remaining) to go")
            if count < remaining {
                state = .receivingPayload(slot: slot, remaining: remaining - count)
                return TransmissionActions()
            }
            var actions = readNextHeader()
            actions.append(.execute(slot: slot))
            return actions
        case .discardingPayload(let slot, let remaining):
            precondition(count > 0 && count <= remaining, "\(count) payload bytes with \(remaining) to go")
            if count < remaining {
                state = .discardingPayload(slot: slot, remaining: remaining - count)
                return TransmissionActions()
            }
            var actions = readNextHeader()
            actions.append(.sendRejection(slot: slot))
            return actions
        default:
            preconditionFailure("payload received in \(state)")
        }
    }

    /// The driver completed the request in `slot`: answer it, unless the socket is going away.
    public mutating func requestCompleted(slot: Int) -> TransmissionActions {
        switch state {
        case .negotiating, .finished:
            preconditionFailure("request completed in \(state)")
        case .closing, .closed:
            return TransmissionActions(.release(slot: slot))
        case .awaitingHeader, .receivingPayload, .discardingPayload, .paused, .draining:
            return TransmissionActions(.sendReply(slot: slot))
        }
    }

    /// A request's slot was freed (its reply left the socket or was cancelled, or it was released), and
    /// with it `bytes` of buffers.
    public mutating func requestReleased(bytes: Int) -> TransmissionActions {
        precondition(requestsInFlight > 0 && bytes <= bytesInFlight, "release with \(requestsInFlight) in flight")
        requestsInFlight -= 1
        bytesInFlight -= bytes
        switch state {
        case .paused(.requests), .paused(.bytes):
            return resumeIfUnderLowWater()
        case .draining:
            guard requestsInFlight == 0 else { return TransmissionActions() }
            state = .closing
            return TransmissionActions(.shutdownAndClose)
        case .closed:
            guard requestsInFlight == 0 else { return TransmissionActions() }
            state = .finished
            return TransmissionActions(.finish)
        case .negotiating, .awaitingHeader, .receivingPayload, .discardingPayload, .paused(.sharedBudget),
             .closing, .finished:
            return TransmissionActions()
        }
    }

    /// The shared budget has room again (it only calls connections that waited for it).
    public mutating func budgetAvailable() -> TransmissionActions {
        guard state == .paused(.sharedBudget) else { return TransmissionActions() }
        return resumeIfUnderLowWater()
    }

    // MARK: - Endings

    /// The server is shutting down: finish and answer what was asked, then close. A payload still
    /// arriving is dropped with its request, which never reached the driver.
    public mutating func shutdown() -> TransmissionActions {
        switch state {
        case .negotiating:
            return closeNow()
        case .awaitingHeader, .paused:
            return drain(.serverShutdown)
        case .receivingPayload(let slot, _), .discardingPayload(let slot, _):
            // The release comes last: reporting it may end the drain at once.
            var actions = drain(.serverShutdown, idle: false)
            actions.append(.release(slot: slot))
            return actions
        case .draining, .closing, .closed, .finished:
            return TransmissionActions()
        }
    }

    /// The peer closed its end, or reading failed.
    public mutating func peerClosed() -> TransmissionActions { closeNow() }

    /// Writing a reply failed: the socket is unusable.
    public mutating func writeFailed() -> TransmissionActions { closeNow() }

    /// The owner closes the connection regardless of its state (the server's shutdown deadline). Like a
    /// send stall, it also cuts off a drain whose replies are stuck.
    public mutating func forceClose() -> TransmissionActions { cutOff() }

    /// The client has read none of the queued replies for the send timeout. Unlike other failures this
    /// also cuts off a drain whose replies are stuck (`closing` after `shutdownAndClose`).
    public mutating func sendStalled() -> TransmissionActions { cutOff() }

    /// The socket reported its close; requests the driver still holds are waited for.
    public mutating func socketClosed() -> TransmissionActions {
        var actions = TransmissionActions()
        switch state {
        case .finished, .closed:
            return actions
        case .receivingPayload(let slot, _), .discardingPayload(let slot, _):
            actions.append(.release(slot: slot))
        default:
            break
        }
        if requestsInFlight == 0 && actions.isEmpty {
            state = .finished
            actions.append(.finish)
        } else {
            // The release above, reported back, finishes the connection when it was the last.
            state = .closed
        }
        return actions
    }

    // MARK: - Transitions

    /// After a request is taken in: read the next header, unless a local bound is reached.
    private mutating func readNextHeader() -> TransmissionActions {
        if requestsInFlight >= limits.maximumRequests {
            state = .paused(.requests)
            return TransmissionActions(.stopReading)
        }
        if bytesInFlight >= limits.maximumBytes {
            state = .paused(.bytes)
            return TransmissionActions(.stopReading)
        }
        state = .awaitingHeader
        return TransmissionActions()
    }

    /// The one place reading resumes after a pause: when at most half of each local bound is in use, so
    /// a client at the edge does not toggle reading on every reply. Otherwise the pause goes on, for the
    /// local bound that still holds it.
    private mutating func resumeIfUnderLowWater() -> TransmissionActions {
        if requestsInFlight > limits.maximumRequests / 2 {
            state = .paused(.requests)
            return TransmissionActions()
        }
        if bytesInFlight > limits.maximumBytes / 2 {
            state = .paused(.bytes)
            return TransmissionActions()
        }
        state = .awaitingHeader
        return TransmissionActions(.resumeReading)
    }

    private mutating func drain(_ reason: DrainReason, idle: Bool = true) -> TransmissionActions {
        if idle && requestsInFlight == 0 {
            state = .closing
            return TransmissionActions(.stopReading, .shutdownAndClose)
        }
        state = .draining(reason)
        return TransmissionActions(.stopReading)
    }

    /// Closes the socket at once, even while `shutdownAndClose` waits for queued replies to leave
    /// (closing an already closing socket is harmless).
    private mutating func cutOff() -> TransmissionActions {
        if state == .closing { return TransmissionActions(.close) }
        return closeNow()
    }

    /// Closes the socket at once. A payload still arriving is dropped with its request.
    private mutating func closeNow() -> TransmissionActions {
        switch state {
        case .closing, .closed, .finished:
            return TransmissionActions()
        case .receivingPayload(let slot, _), .discardingPayload(let slot, _):
            state = .closing
            return TransmissionActions(.close, .release(slot: slot))
        case .negotiating, .awaitingHeader, .paused, .draining:
            state = .closing
            return TransmissionActions(.close)
        }
    }
}
