// NBD wire constants, named after the spec (NetworkBlockDevice/nbd doc/proto.md). All multi-byte fields
// on the wire are big-endian. The spec's C name of each constant is in its doc comment.

/// Magic numbers that frame every message.
public enum NBDMagic {
    /// NBDMAGIC, the first eight bytes of the greeting.
    public static let greeting: UInt64 = 0x4e42_444d_4147_4943
    /// IHAVEOPT: newstyle greeting and option requests.
    public static let option: UInt64 = 0x4948_4156_454f_5054
    /// Option replies.
    public static let optionReply: UInt64 = 0x0003_e889_0455_65a9
    /// NBD_REQUEST_MAGIC: 28-byte requests.
    public static let request: UInt32 = 0x2560_9513
    /// NBD_EXTENDED_REQUEST_MAGIC: 32-byte requests after NBD_OPT_EXTENDED_HEADERS.
    public static let extendedRequest: UInt32 = 0x21e4_1c71
    /// NBD_SIMPLE_REPLY_MAGIC.
    public static let simpleReply: UInt32 = 0x6744_6698
    /// NBD_STRUCTURED_REPLY_MAGIC.
    public static let structuredReply: UInt32 = 0x668e_33ef
    /// NBD_EXTENDED_REPLY_MAGIC.
    public static let extendedReply: UInt32 = 0x6e8a_278c
}

/// Handshake flags the server sends in its greeting.
public struct HandshakeFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// NBD_FLAG_FIXED_NEWSTYLE.
    public static let fixedNewstyle = HandshakeFlags(rawValue: 1 << 0)
    /// NBD_FLAG_NO_ZEROES.
    public static let noZeroes = HandshakeFlags(rawValue: 1 << 1)
}

/// Flags the client answers the greeting with.
public struct ClientFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    /// NBD_FLAG_C_FIXED_NEWSTYLE.
    public static let fixedNewstyle = ClientFlags(rawValue: 1 << 0)
    /// NBD_FLAG_C_NO_ZEROES.
    public static let noZeroes = ClientFlags(rawValue: 1 << 1)
    public static let known: ClientFlags = [.fixedNewstyle, .noZeroes]
}

/// Option numbers (NBD_OPT_*).
public enum NBDOption: UInt32, Sendable {
    case exportName = 1
    case abort = 2
    case list = 3
    case peekExport = 4
    case startTLS = 5
    case info = 6
    case go = 7
    case structuredReply = 8
    case listMetaContext = 9
    case setMetaContext = 10
    case extendedHeaders = 11
}

/// Option reply types (NBD_REP_*). Errors have bit 31 set.
public enum NBDOptionReply: UInt32, Sendable {
    case ack = 1
    case server = 2
    case info = 3
    case metaContext = 4
    case errorUnsupported = 0x8000_0001
    case errorPolicy = 0x8000_0002
    case errorInvalid = 0x8000_0003
    case errorPlatform = 0x8000_0004
    case errorTLSRequired = 0x8000_0005
    case errorUnknown = 0x8000_0006
    case errorShutdown = 0x8000_0007
    case errorBlockSizeRequired = 0x8000_0008
    case errorTooBig = 0x8000_0009
    case errorExtendedHeaderRequired = 0x8000_000a
}

/// Information types inside NBD_REP_INFO (NBD_INFO_*).
public enum NBDInfoType: UInt16, Sendable {
    case export = 0
    case name = 1
    case description = 2
    case blockSize = 3
}

/// Transmission flags sent with the export size.
public struct TransmissionFlags: OptionSet, Sendable, Equatable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// NBD_FLAG_HAS_FLAGS.
    public static let hasFlags = TransmissionFlags(rawValue: 1 << 0)
    /// NBD_FLAG_READ_ONLY.
    public static let readOnly = TransmissionFlags(rawValue: 1 << 1)
    /// NBD_FLAG_SEND_FLUSH.
    public static let sendFlush = TransmissionFlags(rawValue: 1 << 2)
    /// NBD_FLAG_SEND_FUA.
    public static let sendFUA = TransmissionFlags(rawValue: 1 << 3)
    /// NBD_FLAG_ROTATIONAL.
    public static let rotational = TransmissionFlags(rawValue: 1 << 4)
    /// NBD_FLAG_SEND_TRIM.
    public static let sendTrim = TransmissionFlags(rawValue: 1 << 5)
    /// NBD_FLAG_SEND_WRITE_ZEROES.
    public static let sendWriteZeroes = TransmissionFlags(rawValue: 1 << 6)
    /// NBD_FLAG_SEND_DF.
    public static let sendDF = TransmissionFlags(rawValue: 1 << 7)
    /// NBD_FLAG_CAN_MULTI_CONN.
    public static let canMultiConn = TransmissionFlags(rawValue: 1 << 8)
    /// NBD_FLAG_SEND_RESIZE.
    public static let sendResize = TransmissionFlags(rawValue: 1 << 9)
    /// NBD_FLAG_SEND_CACHE.
    public static let sendCache = TransmissionFlags(rawValue: 1 << 10)
    /// NBD_FLAG_SEND_FAST_ZERO.
    public static let sendFastZero = TransmissionFlags(rawValue: 1 << 11)
    /// NBD_FLAG_BLOCK_STAT_PAYLOAD.
    public static let blockStatusPayload = TransmissionFlags(rawValue: 1 << 12)
}

/// Request types (NBD_CMD_*).
public enum NBDCommand: UInt16, Sendable {
    case read = 0
    case write = 1
    case disconnect = 2
    case flush = 3
    case trim = 4
    case cache = 5
    case writeZeroes = 6
    case blockStatus = 7
}

/// Request flags (NBD_CMD_FLAG_*).
public struct CommandFlags: OptionSet, Sendable, Equatable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    /// NBD_CMD_FLAG_FUA.
    public static let fua = CommandFlags(rawValue: 1 << 0)
    /// NBD_CMD_FLAG_NO_HOLE.
    public static let noHole = CommandFlags(rawValue: 1 << 1)
    /// NBD_CMD_FLAG_DF.
    public static let dontFragment = CommandFlags(rawValue: 1 << 2)
    /// NBD_CMD_FLAG_REQ_ONE.
    public static let requestOne = CommandFlags(rawValue: 1 << 3)
    /// NBD_CMD_FLAG_FAST_ZERO.
    public static let fastZero = CommandFlags(rawValue: 1 << 4)
    /// NBD_CMD_FLAG_PAYLOAD_LEN.
    public static let payloadLength = CommandFlags(rawValue: 1 << 5)
}

/// Structured reply chunk types (NBD_REPLY_TYPE_*).
public enum ReplyChunkType: UInt16, Sendable {
    case none = 0
    case offsetData = 1
    case offsetHole = 2
    case blockStatus = 5
    case blockStatusExtended = 6
    case error = 32769
    case errorOffset = 32770
}

/// NBD_REPLY_FLAG_DONE.
public let replyFlagDone: UInt16 = 1

/// Error values on the wire (NBD_E*). They equal Linux errno numbers, but the spec fixes them.
public enum NBDErrorCode: UInt32, Sendable {
    case ok = 0
    case notPermitted = 1        // NBD_EPERM
    case io = 5                  // NBD_EIO
    case noMemory = 12           // NBD_ENOMEM
    case invalid = 22            // NBD_EINVAL
    case noSpace = 28            // NBD_ENOSPC
    case overflow = 75           // NBD_EOVERFLOW
    case notSupported = 95       // NBD_ENOTSUP
    case shutdown = 108          // NBD_ESHUTDOWN
}

/// Meta context names the server knows.
public enum MetaContextName {
    public static let baseAllocation = "base:allocation"
    public static let allocationDepth = "qemu:allocation-depth"
    /// What precedes a bitmap's name in its context (qemu's docs/interop/nbd.rst).
    public static let dirtyBitmapPrefix = "qemu:dirty-bitmap:"

    /// The context that serves the persistent bitmap `name`.
    public static func dirtyBitmap(_ name: String) -> String { dirtyBitmapPrefix + name }

    /// The bitmap a `qemu:dirty-bitmap:` context serves, or nil for any other context.
    public static func bitmapName(of context: String) -> String? {
        context.hasPrefix(dirtyBitmapPrefix) ? String(context.dropFirst(dirtyBitmapPrefix.count)) : nil
    }
}
