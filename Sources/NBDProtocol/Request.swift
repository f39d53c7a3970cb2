// Request headers: 28 bytes compact, 32 bytes once extended headers are negotiated.

/// A parsed request header, lengths widened to 64 bits for both header styles.
public struct Request: Equatable, Sendable {
    public var flags: CommandFlags
    /// The raw command number; `command` is nil for numbers the spec does not define.
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    /// Effect length; for WRITE it is also the payload length.
    public var length: UInt64

    public init(flags: CommandFlags, type: UInt16, cookie: UInt64, offset: UInt64, length: UInt64) {
        self.flags = flags
        self.type = type
        self.cookie = cookie
        self.offset = offset
        self.length = length
    }

    public var command: NBDCommand? { NBDCommand(rawValue: type) }

    /// Size of a request header in each style.
    public static func headerSize(extended: Bool) -> Int { extended ? 32 : 28 }

    /// Parses a header. Returns nil when the magic is wrong, which desynchronises the stream.
    @inlinable
    public static func parse(_ raw: UnsafeRawBufferPointer, extended: Bool) -> Request? {
        precondition(raw.count >= headerSize(extended: extended))
        let magic = UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
        guard magic == (extended ? NBDMagic.extendedRequest : NBDMagic.request) else { return nil }
        let flags = UInt16(bigEndian: raw.loadUnaligned(fromByteOffset: 4, as: UInt16.self))
        let type = UInt16(bigEndian: raw.loadUnaligned(fromByteOffset: 6, as: UInt16.self))
        let cookie = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        let offset = UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 16, as: UInt64.self))
        let length = extended
            ? UInt64(bigEndian: raw.loadUnaligned(fromByteOffset: 24, as: UInt64.self))
            : UInt64(UInt32(bigEndian: raw.loadUnaligned(fromByteOffset: 24, as: UInt32.self)))
        return Request(flags: CommandFlags(rawValue: flags), type: type, cookie: cookie, offset: offset, length: length)
    }

    /// Encodes the header (tests and clients).
    public func encoded(extended: Bool) -> [UInt8] {
        var w = WireWriter()
        w.u32(extended ? NBDMagic.extendedRequest : NBDMagic.request)
        w.u16(flags.rawValue)
        w.u16(type)
        w.u64(cookie)
        w.u64(offset)
        if extended { w.u64(length) } else { w.u32(UInt32(truncatingIfNeeded: length)) }
        return w.bytes
    }
}
