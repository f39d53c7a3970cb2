// Host errno to NBD error mapping, and the spec's numbers for every constant.

import Testing
@testable import NBDProtocol
#if canImport(Glibc)
import Glibc
#endif

@Suite("Constants and errno mapping")
struct ConstantsTests {
    @Test("NBDErrorCode(errno:)", arguments: [
        (Int32(0), NBDErrorCode.ok),
        (EPERM, .notPermitted), (EROFS, .notPermitted),
        (ENOSPC, .noSpace), (EDQUOT, .noSpace), (EFBIG, .noSpace),
        (ENOMEM, .noMemory),
        (EINVAL, .invalid),
        (EOVERFLOW, .overflow),
        (ENOTSUP, .notSupported), (EOPNOTSUPP, .notSupported),
        (ESHUTDOWN, .shutdown),
        (EIO, .io), (EACCES, .io), (EAGAIN, .io), (EBADF, .io), (ENOENT, .io), (EINTR, .io), (ENXIO, .io),
        (ENODEV, .io), (ETIMEDOUT, .io), (EFAULT, .io), (-1, .io), (9999, .io), (.max, .io), (.min, .io),
    ])
    func errnoMapping(errno: Int32, expected: NBDErrorCode) {
        #expect(NBDErrorCode(errno: errno) == expected)
    }

    @Test func errorNumbersAreTheSpecs() {
        let table: [(NBDErrorCode, UInt32)] = [(.ok, 0), (.notPermitted, 1), (.io, 5), (.noMemory, 12), (.invalid, 22),
                                               (.noSpace, 28), (.overflow, 75), (.notSupported, 95), (.shutdown, 108)]
        for (code, value) in table { #expect(code.rawValue == value) }
    }

    @Test func magics() {
        #expect(NBDMagic.greeting == 0x4e42_444d_4147_4943)
        #expect(NBDMagic.option == 0x4948_4156_454f_5054)
        #expect(NBDMagic.optionReply == 0x0003_e889_0455_65a9)
        #expect(NBDMagic.request == 0x2560_9513)
        #expect(NBDMagic.extendedRequest == 0x21e4_1c71)
        #expect(NBDMagic.simpleReply == 0x6744_6698)
        #expect(NBDMagic.structuredReply == 0x668e_33ef)
        #expect(NBDMagic.extendedReply == 0x6e8a_278c)
    }

    @Test func optionAndReplyNumbers() {
        let options: [(NBDOption, UInt32)] = [(.exportName, 1), (.abort, 2), (.list, 3), (.peekExport, 4), (.startTLS, 5),
                                              (.info, 6), (.go, 7), (.structuredReply, 8), (.listMetaContext, 9),
                                              (.setMetaContext, 10), (.extendedHeaders, 11)]
        for (o, v) in options { #expect(o.rawValue == v) }
        let replies: [(NBDOptionReply, UInt32)] = [
            (.ack, 1), (.server, 2), (.info, 3), (.metaContext, 4), (.errorUnsupported, 0x8000_0001),
            (.errorPolicy, 0x8000_0002), (.errorInvalid, 0x8000_0003), (.errorPlatform, 0x8000_0004),
            (.errorTLSRequired, 0x8000_0005), (.errorUnknown, 0x8000_0006), (.errorShutdown, 0x8000_0007),
            (.errorBlockSizeRequired, 0x8000_0008), (.errorTooBig, 0x8000_0009), (.errorExtendedHeaderRequired, 0x8000_000a),
        ]
        for (r, v) in replies { #expect(r.rawValue == v) }
        let infos: [(NBDInfoType, UInt16)] = [(.export, 0), (.name, 1), (.description, 2), (.blockSize, 3)]
        for (i, v) in infos { #expect(i.rawValue == v) }
    }

    @Test func flagBits() {
        #expect(HandshakeFlags.fixedNewstyle.rawValue == 1 && HandshakeFlags.noZeroes.rawValue == 2)
        #expect(ClientFlags.known.rawValue == 3)
        let transmission: [(TransmissionFlags, Int)] = [
            (.hasFlags, 0), (.readOnly, 1), (.sendFlush, 2), (.sendFUA, 3), (.rotational, 4), (.sendTrim, 5),
            (.sendWriteZeroes, 6), (.sendDF, 7), (.canMultiConn, 8), (.sendResize, 9), (.sendCache, 10),
            (.sendFastZero, 11), (.blockStatusPayload, 12),
        ]
        for (f, bit) in transmission { #expect(f.rawValue == 1 << bit) }
        let command: [(CommandFlags, Int)] = [(.fua, 0), (.noHole, 1), (.dontFragment, 2), (.requestOne, 3),
                                              (.fastZero, 4), (.payloadLength, 5)]
        for (f, bit) in command { #expect(f.rawValue == 1 << bit) }
        let commands: [(NBDCommand, UInt16)] = [(.read, 0), (.write, 1), (.disconnect, 2), (.flush, 3), (.trim, 4),
                                                (.cache, 5), (.writeZeroes, 6), (.blockStatus, 7)]
        for (c, v) in commands { #expect(c.rawValue == v) }
        let chunks: [(ReplyChunkType, UInt16)] = [(.none, 0), (.offsetData, 1), (.offsetHole, 2), (.blockStatus, 5),
                                                  (.blockStatusExtended, 6), (.error, 32769), (.errorOffset, 32770)]
        for (c, v) in chunks { #expect(c.rawValue == v) }
        #expect(replyFlagDone == 1)
        #expect(MetaContextName.baseAllocation == "base:allocation")
        #expect(MetaContextName.allocationDepth == "qemu:allocation-depth")
    }
}
