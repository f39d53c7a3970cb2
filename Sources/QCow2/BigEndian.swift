// Big-endian field access on byte arrays; qcow2 stores every multi-byte field big-endian.

extension Array where Element == UInt8 {
    @inline(__always)
    func be16(_ at: Int) -> UInt16 { UInt16(self[at]) << 8 | UInt16(self[at + 1]) }

    @inline(__always)
    func be32(_ at: Int) -> UInt32 {
        UInt32(self[at]) << 24 | UInt32(self[at + 1]) << 16 | UInt32(self[at + 2]) << 8 | UInt32(self[at + 3])
    }

    @inline(__always)
    func be64(_ at: Int) -> UInt64 { UInt64(be32(at)) << 32 | UInt64(be32(at + 4)) }

    @inline(__always)
    mutating func setBE16(_ v: UInt16, at: Int) {
        self[at] = UInt8(v >> 8)
        self[at + 1] = UInt8(truncatingIfNeeded: v)
    }

    @inline(__always)
    mutating func setBE32(_ v: UInt32, at: Int) {
        for i in 0..<4 { self[at + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * i)) }
    }

    @inline(__always)
    mutating func setBE64(_ v: UInt64, at: Int) {
        for i in 0..<8 { self[at + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * i)) }
    }
}

extension UnsafeRawBufferPointer {
    @inline(__always)
    func be64(_ at: Int) -> UInt64 { UInt64(bigEndian: loadUnaligned(fromByteOffset: at, as: UInt64.self)) }
}

extension UnsafeMutableRawBufferPointer {
    @inline(__always)
    func be64(_ at: Int) -> UInt64 { UInt64(bigEndian: loadUnaligned(fromByteOffset: at, as: UInt64.self)) }

    @inline(__always)
    func setBE64(_ v: UInt64, at: Int) { storeBytes(of: v.bigEndian, toByteOffset: at, as: UInt64.self) }
}
