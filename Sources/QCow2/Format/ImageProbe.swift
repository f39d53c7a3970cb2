// Which format a file holds, from its first bytes: the one prober for `qnbd serve` (no -f), `qnbd info`,
// `check`, `map` and `create -b`. qnbd serves qcow2 and raw. A file that carries another format's
// signature would otherwise be served as raw bytes, exposing the container instead of the disk inside
// it, so those are named and refused unless the operator says `-f raw`. Signatures: each format's
// specification (VHD footer cookie "conectix", VHDX file identifier "vhdxfile", VMDK sparse "KDMV",
// VMDK3 "COWD" and text descriptors, VDI's signature at offset 64, Parallels' two magic strings, QED,
// LUKS, qcow version 1).

public enum ProbedFormat: Equatable, Sendable {
    case qcow2
    case raw
    /// A format qnbd does not serve, by qemu's name for it ("vpc", "vmdk", ...).
    case foreign(String)
}

public enum ImageProbe {
    /// How many bytes of the file's start `probe` looks at (fewer for a shorter file).
    public static let bytesNeeded = 512

    public static func probe(_ prefix: [UInt8]) -> ProbedFormat {
        func starts(_ text: String, at offset: Int = 0) -> Bool {
            let bytes = Array(text.utf8)
            return prefix.count >= offset + bytes.count && Array(prefix[offset..<(offset + bytes.count)]) == bytes
        }
        if prefix.count >= 4 && prefix.be32(0) == Header.magic {
            return prefix.count >= 8 && prefix.be32(4) == 1 ? .foreign("qcow") : .qcow2
        }
        if starts("conectix") { return .foreign("vpc") }
        if starts("vhdxfile") { return .foreign("vhdx") }
        if starts("KDMV") || starts("COWD") || starts("# Disk DescriptorFile") { return .foreign("vmdk") }
        if starts("WithoutFreeSpace") || starts("WithouFreSpacExt") { return .foreign("parallels") }
        if starts("QED\0") { return .foreign("qed") }
        if prefix.count >= 6 && Array(prefix[0..<6]) == [0x4c, 0x55, 0x4b, 0x53, 0xba, 0xbe] { return .foreign("luks") }
        // VDI: a little-endian signature after the 64-byte text banner.
        if prefix.count >= 68 && Array(prefix[64..<68]) == [0x7f, 0x10, 0xda, 0xbe] { return .foreign("vdi") }
        return .raw
    }

    /// The refusal for a foreign format, naming both ways out.
    public static func refusal(path: String, format: String) -> String {
        "\(path) looks like a \(format) image, which qnbd does not read; serving it as raw would expose the "
            + "\(format) container, not the disk inside. Convert it (`qemu-img convert -O qcow2 \(path) OUT.qcow2`) "
            + "or, to serve the file's bytes as they are, say `-f raw`"
    }
}
