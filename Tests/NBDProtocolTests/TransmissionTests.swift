// Transmission: every state and transition of a connection's life, driven by events alone.

import Testing
@testable import NBDProtocol

/// A machine and a fake slab: slots are handed out lowest-first and freed when the test releases them.
private struct Rig {
    var machine: Transmission
    var nextSlot = 0
    var cookie: UInt64 = 0
    static let roomy = SharedMemory(used: 0, limit: 1 << 30)

    init(maximumRequests: Int = 8, maximumBytes: Int = 1 << 20, extended: Bool = false, start: Bool = true) {
        machine = Transmission(limits: TransmissionLimits(maximumRequests: maximumRequests, maximumBytes: maximumBytes))
        if start { #expect(machine.handshakeFinished(V.session(extended: extended)).isEmpty) }
    }

    mutating func header(_ command: NBDCommand, flags: CommandFlags = [], offset: UInt64 = 0, length: UInt64,
                         memory: SharedMemory = Rig.roomy) -> [TransmissionAction] {
        cookie += 1
        let slot = nextSlot
        let actions = Array(machine.receivedHeader(Request(flags: flags, type: command.rawValue, cookie: cookie,
                                                           offset: offset, length: length),
                                                   slot: slot, memory: memory))
        if actions.contains(where: { if case .accept = $0 { true } else if case .reject = $0 { true } else { false } }) {
            nextSlot += 1
        }
        return actions
    }

    mutating func read(_ length: UInt64 = 4096) -> [TransmissionAction] { header(.read, length: length) }
}

@Suite("Transmission")
struct TransmissionTests {
    // MARK: - Negotiation

    @Test func negotiationEndsInEveryWay() {
        var m = Rig(start: false).machine
        #expect(m.state == .negotiating)
        #expect(m.handshakeFinished(V.session()).isEmpty)
        #expect(m.state == .awaitingHeader)
        #expect(m.handshakeTimedOut().isEmpty, "the handshake timer means nothing once requests flow")
        #expect(m.state == .awaitingHeader)

        var abort = Rig(start: false).machine
        #expect(Array(abort.handshakeAborted()) == [.stopReading, .shutdownAndClose])
        #expect(abort.state == .closing)

        var failed = Rig(start: false).machine
        #expect(Array(failed.handshakeFailed()) == [.close])
        #expect(failed.state == .closing)

        var late = Rig(start: false).machine
        #expect(Array(late.handshakeTimedOut()) == [.close])
        #expect(late.state == .closing)
        #expect(Array(late.socketClosed()) == [.finish])
        #expect(late.state == .finished)
    }

    @Test func shutdownDuringTheHandshakeClosesAtOnce() {
        var m = Rig(start: false).machine
        #expect(Array(m.shutdown()) == [.close])
        #expect(m.state == .closing)
        #expect(m.shutdown().isEmpty)
        #expect(Array(m.socketClosed()) == [.finish])
    }

    // MARK: - Requests

    @Test func aReadIsAcceptedExecutedAndAnsweredThenItsSlotReleased() {
        var r = Rig()
        #expect(r.read() == [.accept(slot: 0, command: .read, payload: 0), .execute(slot: 0)])
        #expect(r.machine.state == .awaitingHeader)
        #expect(r.machine.requestsInFlight == 1)
        #expect(r.machine.bytesInFlight == 4096)
        #expect(Array(r.machine.requestCompleted(slot: 0)) == [.sendReply(slot: 0)])
        #expect(r.machine.requestReleased(bytes: 4096).isEmpty)
        #expect(r.machine.requestsInFlight == 0 && r.machine.bytesInFlight == 0)
    }

    @Test func aWritePayloadIsCountedInThenExecuted() {
        var r = Rig()
        #expect(r.header(.write, length: 10_000) == [.accept(slot: 0, command: .write, payload: 10_000)])
        #expect(r.machine.state == .receivingPayload(slot: 0, remaining: 10_000))
        #expect(r.machine.bytesInFlight == 10_000)
        #expect(r.machine.receivedPayload(4000).isEmpty)
        #expect(r.machine.state == .receivingPayload(slot: 0, remaining: 6000))
        #expect(Array(r.machine.receivedPayload(6000)) == [.execute(slot: 0)])
        #expect(r.machine.state == .awaitingHeader)
        // A zero-length write has no payload to wait for.
        #expect(r.header(.write, length: 0) == [.accept(slot: 1, command: .write, payload: 0), .execute(slot: 1)])
    }

    @Test func aRejectedRequestsPayloadIsDroppedBeforeItsErrorReply() {
        var r = Rig()
        // Past the end of the export: ENOSPC, after the 4096 payload bytes are read and dropped.
        #expect(r.header(.write, offset: 1 << 30, length: 4096) == [.reject(slot: 0, error: .noSpace)])
        #expect(r.machine.rejectionReason.contains("past the end"))
        #expect(r.machine.state == .discardingPayload(slot: 0, remaining: 4096))
        #expect(r.machine.bytesInFlight == 0, "a dropped payload holds no buffer")
        #expect(r.machine.receivedPayload(96).isEmpty)
        #expect(Array(r.machine.receivedPayload(4000)) == [.sendRejection(slot: 0)])
        #expect(r.machine.state == .awaitingHeader)
        // Without a payload the error reply goes at once.
        #expect(r.header(.flush, offset: 1, length: 0) == [.reject(slot: 1, error: .invalid), .sendRejection(slot: 1)])
        #expect(r.machine.requestsInFlight == 2, "rejected requests hold their slot until the reply leaves")
    }

    @Test func anAbsurdPayloadOrABadMagicCloses() {
        var r = Rig()
        #expect(r.header(.write, length: 1 << 40) == [.close])
        #expect(r.machine.state == .closing)
        #expect(r.machine.endReason != nil)

        var bad = Rig()
        #expect(Array(bad.machine.receivedMalformedHeader()) == [.close])
        #expect(bad.machine.endReason == "bad request magic")
    }

    // MARK: - Pauses

    @Test func theRequestBoundPausesAndHalfOfItResumes() {
        var r = Rig(maximumRequests: 4)
        for slot in 0..<3 { #expect(r.read(512) == [.accept(slot: slot, command: .read, payload: 0), .execute(slot: slot)]) }
        #expect(r.read(512) == [.accept(slot: 3, command: .read, payload: 0), .stopReading, .execute(slot: 3)])
        #expect(r.machine.state == .paused(.requests))
        #expect(r.machine.budgetAvailable().isEmpty, "the budget does not resume a local pause")
        #expect(r.machine.requestReleased(bytes: 512).isEmpty)        // 3 in flight: still over half
        #expect(r.machine.state == .paused(.requests))
        #expect(Array(r.machine.requestReleased(bytes: 512)) == [.resumeReading])   // 2 = half
        #expect(r.machine.state == .awaitingHeader)
    }

    @Test func theByteBoundPausesAndHalfOfItResumes() {
        var r = Rig(maximumRequests: 100, maximumBytes: 64 << 10)
        #expect(r.read(40 << 10).count == 2)
        #expect(r.header(.write, length: 24 << 10) == [.accept(slot: 1, command: .write, payload: 24 << 10)])
        #expect(Array(r.machine.receivedPayload(24 << 10)) == [.stopReading, .execute(slot: 1)])
        #expect(r.machine.state == .paused(.bytes))
        #expect(r.machine.requestReleased(bytes: 24 << 10).isEmpty)     // 40 KiB: still over half
        #expect(r.machine.state == .paused(.bytes))
        #expect(Array(r.machine.requestReleased(bytes: 40 << 10)) == [.resumeReading])
        #expect(r.machine.state == .awaitingHeader)
    }

    @Test func theSharedBudgetPausesWithTheHeaderStagedUntilItHasRoom() {
        var r = Rig()
        #expect(r.read(4096).count == 2)
        let full = SharedMemory(used: 1000, limit: 4096)
        #expect(r.header(.read, length: 4096, memory: full) == [.waitForBudget])
        #expect(r.machine.state == .paused(.sharedBudget))
        #expect(r.machine.requestsInFlight == 1, "the waiting header is not taken in")
        #expect(r.machine.requestReleased(bytes: 4096).isEmpty, "a local release does not end a budget pause")
        #expect(r.machine.state == .paused(.sharedBudget))
        #expect(Array(r.machine.budgetAvailable()) == [.resumeReading])
        #expect(r.machine.state == .awaitingHeader)
        // Nothing held anywhere: one request may exceed the budget; requests without buffers always pass.
        #expect(r.header(.read, length: 8192, memory: SharedMemory(used: 0, limit: 4096)).count == 2)
        #expect(r.header(.flush, length: 0, memory: SharedMemory(used: 4096, limit: 4096)).count == 2)
    }

    @Test func aBudgetThatFreesUpWhileLocalUseIsHighHandsThePauseToTheLocalBound() {
        var r = Rig(maximumRequests: 4)
        for _ in 0..<3 { _ = r.read(512) }
        #expect(r.header(.read, length: 512, memory: SharedMemory(used: 10, limit: 16)) == [.waitForBudget])
        #expect(r.machine.budgetAvailable().isEmpty)
        #expect(r.machine.state == .paused(.requests))
        #expect(Array(r.machine.requestReleased(bytes: 512)) == [.resumeReading])
    }

    // MARK: - Draining

    @Test func discWithRequestsInFlightDrainsThenShutsDown() {
        var r = Rig()
        _ = r.read()
        _ = r.header(.write, length: 4)
        #expect(Array(r.machine.receivedPayload(4)) == [.execute(slot: 1)])
        #expect(r.header(.disconnect, length: 0) == [.stopReading])
        #expect(r.machine.state == .draining(.clientDisconnect))
        #expect(r.machine.endReason == "client sent DISC")
        // Completions are still answered while draining.
        #expect(Array(r.machine.requestCompleted(slot: 1)) == [.sendReply(slot: 1)])
        #expect(r.machine.requestReleased(bytes: 4).isEmpty)
        #expect(Array(r.machine.requestCompleted(slot: 0)) == [.sendReply(slot: 0)])
        #expect(Array(r.machine.requestReleased(bytes: 4096)) == [.shutdownAndClose])
        #expect(r.machine.state == .closing)
        #expect(Array(r.machine.socketClosed()) == [.finish])
        #expect(r.machine.state == .finished)
    }

    @Test func discWhenIdleShutsDownAtOnce() {
        var r = Rig()
        #expect(r.header(.disconnect, length: 0) == [.stopReading, .shutdownAndClose])
        #expect(r.machine.state == .closing)
    }

    @Test func shutdownDrainsFromEveryReadingState() {
        var idle = Rig()
        #expect(Array(idle.machine.shutdown()) == [.stopReading, .shutdownAndClose])

        var busy = Rig()
        _ = busy.read()
        #expect(Array(busy.machine.shutdown()) == [.stopReading])
        #expect(busy.machine.state == .draining(.serverShutdown))
        #expect(busy.machine.shutdown().isEmpty, "a second shutdown changes nothing")
        #expect(busy.machine.budgetAvailable().isEmpty)

        var paused = Rig(maximumRequests: 1)
        #expect(paused.read() == [.accept(slot: 0, command: .read, payload: 0), .stopReading, .execute(slot: 0)])
        #expect(Array(paused.machine.shutdown()) == [.stopReading])
        #expect(paused.machine.state == .draining(.serverShutdown))
        #expect(Array(paused.machine.requestReleased(bytes: 4096)) == [.shutdownAndClose], "a drain never resumes")
    }

    @Test func shutdownDropsAPayloadStillArriving() {
        var r = Rig()
        _ = r.read()
        _ = r.header(.write, length: 100)
        #expect(Array(r.machine.shutdown()) == [.stopReading, .release(slot: 1)])
        #expect(r.machine.state == .draining(.serverShutdown))
        #expect(r.machine.requestReleased(bytes: 100).isEmpty)
        #expect(Array(r.machine.requestCompleted(slot: 0)) == [.sendReply(slot: 0)])
        #expect(Array(r.machine.requestReleased(bytes: 4096)) == [.shutdownAndClose])

        var discarding = Rig()
        _ = discarding.header(.write, offset: 1 << 30, length: 100)
        #expect(Array(discarding.machine.shutdown()) == [.stopReading, .release(slot: 0)])
        #expect(Array(discarding.machine.requestReleased(bytes: 0)) == [.shutdownAndClose])
    }

    // MARK: - Closing

    @Test func closingWhilePayloadsArePendingReleasesThemAndWaitsForTheDriver() {
        var r = Rig()
        _ = r.read()                          // at the driver
        _ = r.header(.write, length: 100)     // payload half there
        #expect(r.machine.receivedPayload(50).isEmpty)
        #expect(Array(r.machine.peerClosed()) == [.close, .release(slot: 1)])
        #expect(r.machine.state == .closing)
        #expect(r.machine.requestReleased(bytes: 100).isEmpty)
        #expect(r.machine.peerClosed().isEmpty && r.machine.writeFailed().isEmpty && r.machine.shutdown().isEmpty)
        #expect(r.machine.socketClosed().isEmpty, "the driver still holds the read's buffer")
        #expect(r.machine.state == .closed)
        #expect(Array(r.machine.requestCompleted(slot: 0)) == [.release(slot: 0)], "no reply on a closed socket")
        #expect(Array(r.machine.requestReleased(bytes: 4096)) == [.finish])
        #expect(r.machine.state == .finished)
    }

    @Test func closingWhileDiscardingReleasesTheRejectedRequest() {
        var r = Rig()
        _ = r.header(.write, offset: 1 << 30, length: 100)
        #expect(Array(r.machine.writeFailed()) == [.close, .release(slot: 0)])
        #expect(r.machine.requestReleased(bytes: 0).isEmpty)
        #expect(Array(r.machine.socketClosed()) == [.finish])
    }

    @Test func everyFailureClosesFromEveryLiveState() {
        let failures: [(String, (inout Transmission) -> TransmissionActions)] = [
            ("peer closed", { $0.peerClosed() }), ("write failed", { $0.writeFailed() }),
            ("forced", { $0.forceClose() }), ("send stalled", { $0.sendStalled() }),
        ]
        for (name, fail) in failures {
            var reading = Rig()
            #expect(Array(fail(&reading.machine)) == [.close], "\(name) while reading")
            var paused = Rig(maximumRequests: 1)
            _ = paused.read()
            #expect(Array(fail(&paused.machine)) == [.close], "\(name) while paused")
            var draining = Rig()
            _ = draining.read()
            _ = draining.machine.shutdown()
            #expect(Array(fail(&draining.machine)) == [.close], "\(name) while draining")
            #expect(draining.machine.state == .closing)
        }
    }

    @Test func aSendStallCutsOffADrainWhoseRepliesAreStuck() {
        var r = Rig()
        #expect(Array(r.machine.shutdown()) == [.stopReading, .shutdownAndClose])
        #expect(r.machine.writeFailed().isEmpty, "a failed write during shutdownAndClose needs nothing more")
        #expect(Array(r.machine.sendStalled()) == [.close], "but a stall closes the socket for good")
        #expect(Array(r.machine.forceClose()) == [.close], "and so does the server's shutdown deadline")
        #expect(r.machine.state == .closing)
        #expect(Array(r.machine.socketClosed()) == [.finish])
        #expect(r.machine.sendStalled().isEmpty && r.machine.forceClose().isEmpty && r.machine.socketClosed().isEmpty)
        #expect(r.machine.shutdown().isEmpty && r.machine.budgetAvailable().isEmpty)
    }

    // MARK: - Fidelity

    @Test func extendedWriteWithoutPayloadLengthCarriesNoPayload() {
        var r = Rig(extended: true)
        // Without NBD_CMD_FLAG_PAYLOAD_LEN "there is no payload": the next bytes are the next header.
        #expect(r.header(.write, length: 4096) == [.reject(slot: 0, error: .invalid), .sendRejection(slot: 0)])
        #expect(r.machine.state == .awaitingHeader)
        #expect(r.header(.write, flags: .payloadLength, length: 4096)
                == [.accept(slot: 1, command: .write, payload: 4096)])
    }

    @Test func anOversizePayloadLengthIsAHardDisconnect() {
        var r = Rig(extended: true)
        #expect(r.header(.write, flags: .payloadLength, length: (32 << 20) + 1) == [.close])
        #expect(r.machine.state == .closing)
    }

    @Test func actionsHoldFourInline() {
        var a = TransmissionActions()
        #expect(a.isEmpty)
        for i in 0..<4 { a.append(.execute(slot: i)) }
        #expect(a.count == 4)
        #expect(Array(a) == (0..<4).map { .execute(slot: $0) })
        #expect(a == a)
        #expect(a != TransmissionActions(.execute(slot: 0)))
    }
}
