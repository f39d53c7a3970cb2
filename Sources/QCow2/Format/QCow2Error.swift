// Errors that name the structure at fault, so an operator reading "qcow2 L2 table at 0x50000: entry
// 17 points past the end of the file" knows what is broken without a hex editor.

public struct QCow2Error: Error, Equatable, Sendable, CustomStringConvertible {
    /// The structure at fault ("header", "L1 table", "L2 table at 0x30000", "refcount table", ...).
    public let structure: String
    public let message: String
    /// True when the image is damaged (as opposed to using a feature qnbd does not implement).
    public let corrupt: Bool

    public init(_ structure: String, _ message: String, corrupt: Bool = true) {
        self.structure = structure
        self.message = message
        self.corrupt = corrupt
    }

    public static func unsupported(_ structure: String, _ message: String) -> QCow2Error {
        QCow2Error(structure, message, corrupt: false)
    }

    public var description: String { "qcow2 \(structure): \(message)" }
}

/// How `hex` spells a number. The tools copy qemu's messages, which use two printf styles.
public enum HexStyle: Sendable {
    /// "0x1f000" (and "0x0"): qnbd's own messages.
    case prefixed
    /// "1f000": qemu's PRIx64.
    case bare
    /// "0x1f000", but "0" for zero: qemu's %#x.
    case alternate
}

/// Lower-case hexadecimal, the one spelling of offsets and entries in every message.
public func hex(_ value: UInt64, _ style: HexStyle = .prefixed) -> String {
    let digits = String(value, radix: 16)
    switch style {
    case .prefixed: return "0x" + digits
    case .bare: return digits
    case .alternate: return value == 0 ? "0" : "0x" + digits
    }
}
