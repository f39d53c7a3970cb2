// The completion dispatch: every action the shell finishes comes back here with its token, and goes to
// the machine that issued it.

import BlockDevice

extension QCow2Engine {
    public func completed(_ token: IOToken, result: IOResult) {
        let purpose = tokens.remove(token)
        var errno: Int32? = nil
        if case .failure(let e) = result { errno = e }
        switch purpose {
        case .loadL2(let l1Index):
            guard let slot = cache[l1Index] else { preconditionFailure("L2 load for a missing slot") }
            let waiters = slot.waiters
            slot.waiters.removeAll()
            if let errno {
                cache.remove(l1Index)
                let error = BlockError(errno: errno, message: "reading the L2 table at \(hex(slot.hostOffset))")
                for w in waiters { failWaiter(w, error) }
                return
            }
            slot.state = .ready
            // Pinned while its waiters run: one of them moving on to another table must not evict it
            // before the next waiter has looked at it (that would load the same table twice).
            slot.pins += 1
            wake(waiters)
            slot.pins -= 1
        case .readData(let id):
            readDataCompleted(id, errno: errno)
        case .readCompressed(let id, let source, let destination, let copyFrom, let copyTo, let count):
            compressedReadCompleted(id, source: source, destination: destination, copyFrom: copyFrom, copyTo: copyTo,
                                    count: count, errno: errno)
        case .decompress(let id, let source, let destination, let copyFrom, let copyTo, let count):
            decompressCompleted(id, source: source, destination: destination, copyFrom: copyFrom, copyTo: copyTo,
                                count: count, errno: errno)
        case .backingStatus(let id, let length):
            backingStatusCompleted(id, length: length, result: result)
        case .writeInPlace(let id):
            inPlaceWriteCompleted(id, errno: errno, writeSide("an in-place write completion"))
        case .allocationWrite(let a), .cowRead(let a), .cowCompressed(let a, _, _), .cowDecompress(let a, _, _):
            allocationCompleted(purpose, a, errno: errno, writeSide("an allocation's completion"))
        case .flushStep(let buffer, let offset):
            buffer?.deallocate()
            flushStepCompleted(offset: offset, errno: errno, writeSide("a flush completion"))
        case .punch(let cluster, let count):
            punchCompleted(cluster: cluster, count: count, writeSide("a punch completion"))
        case .headerUpdate(let buffer):
            buffer.deallocate()
        }
    }

    func failWaiter(_ w: Waiter, _ error: BlockError) {
        switch w {
        case .read(let id): failRead(id, error)
        case .status(let id):
            let r = statuses.remove(id)
            outbox.append(.complete(r.tag, .failed(error)))
        case .write(let id): failWrite(id, error, writeSide("a parked write"))
        }
    }
}
