// Reply headers written straight into caller-owned memory, so the hot path builds replies without
// allocating. The caller sends the header bytes followed, for data chunks, by the data itself as a
// second buffer of the same vectored write.
//
// Three header styles exist: the 16-byte simple reply (no structured replies negotiated), the 20-byte
// structured chunk header, and the 32-byte extended header (after NBD_OPT_EXTENDED_HEADERS, where every
// reply must be a chunk and carries the request's offset).

/// How this connection frames replies.
public enum ReplyStyle: Sendable {
    case simple
    case structured
    case extended

    public init(session: NegotiatedSession) {
        self = session.extendedHeaders ? .extended : session.structuredReplies ? .structured : .simple
    }
}

public struct ReplyEncoder: Sendable {
    public let style: ReplyStyle

    public init(style: ReplyStyle) { self.style = style }

    /// Largest header any single call here writes, excluding error messages and block-status extents.
    public static let maximumHeaderSize = 32 + 16

    /// Bytes a chunk header takes in this style.
    @inlinable public var chunkHeaderSize: Int {
        switch style {
        case .simple: return 16
        case .structured: return 20
        case .extended: return 32
        }
    }

    @inlinable
    func chunkHeader(_ out: UnsafeMutableRawPointer, flags: UInt16, type: ReplyChunkType, cookie: UInt64,
                     requestOffset: UInt64, payloadLength: Int) -> Int {
        let s = RawStore(out)
        switch style {
        case .simple:
            preconditionFailure("chunk in a simple-reply session")
        case .structured:
            s.u32(NBDMagic.structuredReply, at: 0)
            s.u16(flags, at: 4)
            s.u16(type.rawValue, at: 6)
            s.u64(cookie, at: 8)
            s.u32(UInt32(payloadLength), at: 16)
            return 20
        case .extended:
            s.u32(NBDMagic.extendedReply, at: 0)
            s.u16(flags, at: 4)
            s.u16(type.rawValue, at: 6)
            s.u64(cookie, at: 8)
            s.u64(requestOffset, at: 16)
            s.u64(UInt64(payloadLength), at: 24)
            return 32
        }
    }

    /// The whole reply to a request without data: success or an error. Simple style writes a simple
    /// reply; the chunked styles write a NONE chunk, or an ERROR chunk carrying `message`.
    /// `out` must hold `completionSize(messageLength:)` bytes.
    @inlinable
    public func completion(into out: UnsafeMutableRawPointer, cookie: UInt64, requestOffset: UInt64,
                           error: NBDErrorCode, message: UnsafeRawBufferPointer = UnsafeRawBufferPointer(start: nil, count: 0)) -> Int {
        if style == .simple {
            let s = RawStore(out)
            s.u32(NBDMagic.simpleReply, at: 0)
            s.u32(error.rawValue, at: 4)
            s.u64(cookie, at: 8)
            return 16
        }
        if error == .ok {
            return chunkHeader(out, flags: replyFlagDone, type: .none, cookie: cookie, requestOffset: requestOffset, payloadLength: 0)
        }
        let messageLength = min(message.count, 4096)
        let n = chunkHeader(out, flags: replyFlagDone, type: .error, cookie: cookie, requestOffset: requestOffset,
                            payloadLength: 6 + messageLength)
        let s = RawStore(out + n)
        s.u32(error.rawValue, at: 0)
        s.u16(UInt16(messageLength), at: 4)
        if messageLength > 0 { (out + n + 6).copyMemory(from: message.baseAddress!, byteCount: messageLength) }
        return n + 6 + messageLength
    }

    /// Space `completion` needs.
    @inlinable public func completionSize(messageLength: Int) -> Int {
        style == .simple ? 16 : chunkHeaderSize + 6 + min(messageLength, 4096)
    }

    /// Header for `dataLength` bytes of read data at `dataOffset`, sent right after this header. Simple
    /// style writes the successful simple reply (the data follows it); chunked styles an OFFSET_DATA chunk.
    @inlinable
    public func dataHeader(into out: UnsafeMutableRawPointer, cookie: UInt64, requestOffset: UInt64,
                           dataOffset: UInt64, dataLength: Int, done: Bool) -> Int {
        if style == .simple {
            return completion(into: out, cookie: cookie, requestOffset: requestOffset, error: .ok)
        }
        let n = chunkHeader(out, flags: done ? replyFlagDone : 0, type: .offsetData, cookie: cookie,
                            requestOffset: requestOffset, payloadLength: 8 + dataLength)
        RawStore(out + n).u64(dataOffset, at: 0)
        return n + 8
    }

    /// An OFFSET_HOLE chunk: `holeLength` bytes at `holeOffset` read as zeros. Chunked styles only.
    @inlinable
    public func holeChunk(into out: UnsafeMutableRawPointer, cookie: UInt64, requestOffset: UInt64,
                          holeOffset: UInt64, holeLength: UInt32, done: Bool) -> Int {
        let n = chunkHeader(out, flags: done ? replyFlagDone : 0, type: .offsetHole, cookie: cookie,
                            requestOffset: requestOffset, payloadLength: 12)
        let s = RawStore(out + n)
        s.u64(holeOffset, at: 0)
        s.u32(holeLength, at: 8)
        return n + 12
    }

    /// Bytes a block-status chunk with `count` extents takes.
    public func blockStatusSize(count: Int) -> Int {
        style == .extended ? 32 + 8 + 16 * count : 20 + 4 + 8 * count
    }

    /// A block-status chunk for one meta context. `extents` are (length, flags) pairs; in compact style
    /// each length must fit in 32 bits (the caller clips).
    public func blockStatusChunk(into out: UnsafeMutableRawPointer, cookie: UInt64, requestOffset: UInt64,
                                 contextID: UInt32, extents: [(length: UInt64, flags: UInt32)], done: Bool) -> Int {
        let flags = done ? replyFlagDone : 0
        if style == .extended {
            let n = chunkHeader(out, flags: flags, type: .blockStatusExtended, cookie: cookie,
                                requestOffset: requestOffset, payloadLength: 8 + 16 * extents.count)
            let s = RawStore(out + n)
            s.u32(contextID, at: 0)
            s.u32(UInt32(extents.count), at: 4)
            for (i, e) in extents.enumerated() {
                s.u64(e.length, at: 8 + 16 * i)
                s.u64(UInt64(e.flags), at: 16 + 16 * i)
            }
            return n + 8 + 16 * extents.count
        }
        let n = chunkHeader(out, flags: flags, type: .blockStatus, cookie: cookie, requestOffset: requestOffset,
                            payloadLength: 4 + 8 * extents.count)
        let s = RawStore(out + n)
        s.u32(contextID, at: 0)
        for (i, e) in extents.enumerated() {
            precondition(e.length <= UInt64(UInt32.max), "compact extent longer than 32 bits")
            s.u32(UInt32(e.length), at: 4 + 8 * i)
            s.u32(e.flags, at: 8 + 8 * i)
        }
        return n + 4 + 8 * extents.count
    }
}
