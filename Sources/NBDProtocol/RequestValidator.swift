// Every request is checked here before it reaches a driver, so drivers only ever see in-range,
// well-formed work. The checks follow the spec's error rules: writes past the end are ENOSPC, other
// out-of-range requests EINVAL, writes on a read-only export EPERM, unknown commands and flags EINVAL.

/// What to do with a request once its header is in.
public enum RequestVerdict: Equatable, Sendable {
    /// Hand the request to the driver (after reading `payload` bytes for a WRITE).
    case execute(NBDCommand, payload: Int)
    /// Read and drop `payload` bytes, then reply with `error`.
    case reject(NBDErrorCode, payload: Int, reason: String)
    /// NBD_CMD_DISC: finish what is in flight, then close. No reply.
    case disconnect
    /// The stream cannot be trusted any more (e.g. an absurd payload length): close the connection.
    case fatal(reason: String)
}

/// Checks requests against one negotiated session.
public struct RequestValidator: Sendable {
    public let session: NegotiatedSession
    /// Largest READ or WRITE served, matching the advertised maximum block size.
    public let maximumPayload: UInt64
    /// A compact WRITE payload beyond this closes the connection instead of being drained (with extended
    /// headers, any PAYLOAD_LEN beyond `maximumPayload` does).
    public let drainLimit: UInt64

    public init(session: NegotiatedSession) {
        self.session = session
        self.maximumPayload = UInt64(session.export.maximumBlockSize)
        self.drainLimit = UInt64(session.export.maximumBlockSize) * 2
    }

    public func validate(_ request: Request) -> RequestVerdict {
        let export = session.export
        let flags = export.flags
        // Which bytes follow the header. Compact headers: only WRITE's, `length` of them. Extended headers
        // (proto.md, extension-ext-header): "the meaning of the *length* field depends on whether *flags*
        // contains `NBD_CMD_FLAG_PAYLOAD_LEN` (that many additional bytes of payload are present), or if
        // the flag is absent (there is no payload, and *length* instead is an effect length describing
        // how much of the export the request operates on)". That holds for WRITE too: one without the
        // flag is refused, but its length is not a payload to read.
        var payload: UInt64 = 0
        if session.extendedHeaders {
            if request.flags.contains(.payloadLength) {
                payload = request.length
                // "A server SHOULD initiate hard disconnect if a client sets the
                // `NBD_CMD_FLAG_PAYLOAD_LEN` flag and uses a *length* larger than a server's advertised or
                // default maximum payload length"
                if payload > maximumPayload {
                    return .fatal(reason: "PAYLOAD_LEN of \(payload) bytes exceeds \(maximumPayload)")
                }
            }
        } else if request.type == NBDCommand.write.rawValue {
            payload = request.length
        }
        if payload > drainLimit {
            return .fatal(reason: "request payload of \(payload) bytes")
        }
        let payloadCount = Int(payload)
        func reject(_ code: NBDErrorCode, _ reason: String) -> RequestVerdict {
            .reject(code, payload: payloadCount, reason: reason)
        }

        guard let command = request.command else {
            return reject(.invalid, "unknown command \(request.type)")
        }
        if command == .disconnect { return .disconnect }

        // Flags: FUA is valid on any command; the others only where the spec defines them.
        var allowed: CommandFlags = [.fua]
        switch command {
        case .read: if session.structuredReplies { allowed.insert(.dontFragment) }
        case .writeZeroes:
            allowed.insert(.noHole)
            if flags.contains(.sendFastZero) { allowed.insert(.fastZero) }
        case .blockStatus: allowed.insert(.requestOne)
        default: break
        }
        if session.extendedHeaders && command == .write { allowed.insert(.payloadLength) }
        guard request.flags.isSubset(of: allowed) else {
            return reject(.invalid, "flags 0x\(String(request.flags.rawValue, radix: 16)) not valid for \(command)")
        }
        if session.extendedHeaders && command == .write && !request.flags.contains(.payloadLength) {
            // "The command `NBD_CMD_WRITE` MUST use the flag `NBD_CMD_FLAG_PAYLOAD_LEN` in this mode";
            // without it nothing follows the header (see above), so EINVAL keeps the stream in sync.
            return reject(.invalid, "extended WRITE without PAYLOAD_LEN")
        }
        if payload > 0 && command != .write {
            // A BLOCK_STATUS payload (context filter) is optional; we do not advertise it.
            return reject(.invalid, "payload on \(command) is not supported")
        }

        let writes = command == .write || command == .trim || command == .writeZeroes
        if writes && flags.contains(.readOnly) {
            return reject(.notPermitted, "\(command) on a read-only export")
        }
        switch command {
        case .trim where !flags.contains(.sendTrim),
             .writeZeroes where !flags.contains(.sendWriteZeroes),
             .cache where !flags.contains(.sendCache),
             .flush where !flags.contains(.sendFlush):
            return reject(.invalid, "\(command) not advertised")
        case .blockStatus where session.metaContexts.isEmpty:
            return reject(.invalid, "BLOCK_STATUS without a selected meta context")
        default: break
        }

        if (command == .read || command == .write) && request.length > maximumPayload {
            return reject(.invalid, "\(command) of \(request.length) bytes exceeds \(maximumPayload)")
        }
        if command == .blockStatus && request.length == 0 {
            return reject(.invalid, "BLOCK_STATUS of length 0")
        }
        if command != .flush {
            let (end, overflow) = request.offset.addingReportingOverflow(request.length)
            if overflow || end > export.size {
                let code: NBDErrorCode = (command == .write || command == .writeZeroes) ? .noSpace : .invalid
                return reject(code, "\(command) at \(request.offset)+\(request.length) past the end (\(export.size))")
            }
        } else if request.offset != 0 || request.length != 0 {
            return reject(.invalid, "FLUSH with offset or length")
        }
        if session.clientHonoursBlockSize, export.minimumBlockSize > 1, command != .flush, command != .blockStatus {
            let mask = UInt64(export.minimumBlockSize - 1)
            if request.offset & mask != 0 || request.length & mask != 0 {
                return reject(.invalid, "\(command) not aligned to \(export.minimumBlockSize)")
            }
        }
        return .execute(command, payload: payloadCount)
    }
}
