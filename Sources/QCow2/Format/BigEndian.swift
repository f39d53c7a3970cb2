// Big-endian field access on byte arrays; qcow2 stores every multi-byte field big-endian. The one
// copy for the engine, the tools and the opener.

extension Array where Element == UInt8 {
    @inline(__always)
    public func be16(_ at: Int) -> UInt16 { UInt16(self[at]) << 8 | UInt16(self[at + 1]) }

    @inline(__always)
    public func be32(_ at: Int) -> UInt32 {
        UInt32(self[at]) << 24 | UInt32(self[at + 1]) << 16 | UInt32(self[at + 2]) << 8 | UInt32(self[at + 3])
    }

    @inline(__always)
    public func be64(_ at: Int) -> UInt64 { UInt64(be32(at)) << 32 | UInt64(be32(at + 4)) }

    /// `count` consecutive 64-bit words from the start (tables: L1, L2, refcount).
    public func be64Words(count: Int) -> [UInt64] { (0..<count).map { be64($0 * 8) } }

    /// Bytes holding `words` big-endian, one after another.
    public static func be64Bytes(_ words: [UInt64]) -> [UInt8] {
        var out = [UInt8](repeating: 0, count: words.count * 8)
        for (i, w) in words.enumerated() { out.setBE64(w, at: i * 8) }
        return out
    }

    @inline(__always)
    public mutating func setBE16(_ v: UInt16, at: Int) {
        self[at] = UInt8(v >> 8)
        self[at + 1] = UInt8(truncatingIfNeeded: v)
    }

    @inline(__always)
    public mutating func setBE32(_ v: UInt32, at: Int) {
        for i in 0..<4 { self[at + i] = UInt8(truncatingIfNeeded: v >> (24 - 8 * i)) }
    }

    @inline(__always)
    public mutating func setBE64(_ v: UInt64, at: Int) {
        for i in 0..<8 { self[at + i] = UInt8(truncatingIfNeeded: v >> (56 - 8 * i)) }
    }
}

extension UnsafeRawBufferPointer {
    @inline(__always)
    public func be64(_ at: Int) -> UInt64 { UInt64(bigEndian: loadUnaligned(fromByteOffset: at, as: UInt64.self)) }
}

extension UnsafeMutableRawBufferPointer {
    @inline(__always)
    public func be64(_ at: Int) -> UInt64 { UInt64(bigEndian: loadUnaligned(fromByteOffset: at, as: UInt64.self)) }

    @inline(__always)
    public func setBE64(_ v: UInt64, at: Int) { storeBytes(of: v.bigEndian, toByteOffset: at, as: UInt64.self) }
}
