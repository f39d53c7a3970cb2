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

@inline(__always)
func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
