// Big-endian encoding helpers for the handshake, which is rare enough to build replies in arrays, and for
// reply headers written into caller-owned memory on the hot path.

/// Appends big-endian fields to a byte array (handshake messages).
struct WireWriter {
    var bytes: [UInt8] = []

    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.bigEndian) { bytes.append(contentsOf: $0) } }
    mutating func raw(_ v: some Sequence<UInt8>) { bytes.append(contentsOf: v) }
    mutating func zeros(_ n: Int) { bytes.append(contentsOf: repeatElement(0, count: n)) }
}

/// Reads big-endian fields from a byte slice, failing softly when the input is short (peer input is
/// never trusted to be well formed).
struct WireReader {
    private let bytes: [UInt8]
    private(set) var position = 0

    init(_ bytes: [UInt8]) { self.bytes = bytes }

    var remaining: Int { bytes.count - position }

    mutating func u16() -> UInt16? {
        guard remaining >= 2 else { return nil }
        defer { position += 2 }
        return UInt16(bytes[position]) << 8 | UInt16(bytes[position + 1])
    }

    mutating func u32() -> UInt32? {
        guard remaining >= 4 else { return nil }
        var v: UInt32 = 0
        for i in 0..<4 { v = v << 8 | UInt32(bytes[position + i]) }
        position += 4
        return v
    }

    mutating func u64() -> UInt64? {
        guard remaining >= 8 else { return nil }
        var v: UInt64 = 0
        for i in 0..<8 { v = v << 8 | UInt64(bytes[position + i]) }
        position += 8
        return v
    }

    mutating func bytes(_ n: Int) -> ArraySlice<UInt8>? {
        guard n >= 0, remaining >= n else { return nil }
        defer { position += n }
        return bytes[position..<position + n]
    }

    /// A length-prefixed UTF-8 string; nil when short, too long or not UTF-8.
    mutating func string(length: Int, maximum: Int) -> String? {
        guard length <= maximum, let raw = bytes(length) else { return nil }
        return String(validating: raw, as: UTF8.self)
    }
}

/// Stores big-endian integers into raw memory; used to build reply headers without allocating.
@usableFromInline
struct RawStore {
    @usableFromInline let base: UnsafeMutableRawPointer

    @inlinable init(_ base: UnsafeMutableRawPointer) { self.base = base }

    @inlinable func u16(_ v: UInt16, at offset: Int) { base.storeBytes(of: v.bigEndian, toByteOffset: offset, as: UInt16.self) }
    @inlinable func u32(_ v: UInt32, at offset: Int) { base.storeBytes(of: v.bigEndian, toByteOffset: offset, as: UInt32.self) }
    @inlinable func u64(_ v: UInt64, at offset: Int) { base.storeBytes(of: v.bigEndian, toByteOffset: offset, as: UInt64.self) }
}
