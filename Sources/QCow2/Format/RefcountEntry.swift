// Refcount entries of any width (1 to 64 bits) inside a refcount block. Sub-byte widths pack entries
// from the least significant bit of each byte; 8 bits and more are big-endian.

public enum RefcountEntry {
    public static func get(_ block: UnsafeRawBufferPointer, index: Int, order: Int) -> UInt64 {
        let bits = 1 << order
        switch bits {
        case 1, 2, 4:
            let bit = index * bits
            let byte = block[bit >> 3]
            return UInt64((byte >> UInt8(bit & 7)) & UInt8((1 << bits) - 1))
        case 8: return UInt64(block[index])
        case 16: return UInt64(UInt16(bigEndian: block.loadUnaligned(fromByteOffset: index * 2, as: UInt16.self)))
        case 32: return UInt64(UInt32(bigEndian: block.loadUnaligned(fromByteOffset: index * 4, as: UInt32.self)))
        default: return UInt64(bigEndian: block.loadUnaligned(fromByteOffset: index * 8, as: UInt64.self))
        }
    }

    public static func set(_ block: UnsafeMutableRawBufferPointer, index: Int, order: Int, value: UInt64) {
        let bits = 1 << order
        switch bits {
        case 1, 2, 4:
            let bit = index * bits
            let mask = UInt8((1 << bits) - 1) << UInt8(bit & 7)
            let old = block[bit >> 3]
            block[bit >> 3] = (old & ~mask) | (UInt8(truncatingIfNeeded: value) << UInt8(bit & 7) & mask)
        case 8: block[index] = UInt8(truncatingIfNeeded: value)
        case 16: block.storeBytes(of: UInt16(truncatingIfNeeded: value).bigEndian, toByteOffset: index * 2, as: UInt16.self)
        case 32: block.storeBytes(of: UInt32(truncatingIfNeeded: value).bigEndian, toByteOffset: index * 4, as: UInt32.self)
        default: block.storeBytes(of: value.bigEndian, toByteOffset: index * 8, as: UInt64.self)
        }
    }
}

/// Refcount table entries: the offset of a refcount block (0: none yet) and bits qemu reserves.
public enum RefcountTableEntry {
    public static let offsetMask: UInt64 = 0xffff_ffff_ffff_fe00
    public static let reserved: UInt64 = 0x1ff
}
