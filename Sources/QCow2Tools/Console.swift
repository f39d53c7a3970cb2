// stdout and stderr for the tool subcommands: reports go to stdout, findings and errors to stderr,
// the split qemu-img uses (scripts parse stdout; people read both). Plain write(2) on the descriptors:
// C's stdio globals are shared mutable state to Swift 6, and there is nothing to buffer here anyway.

import SystemCalls

public enum Console {
    public static func out(_ text: String) { write(text, to: 1) }

    public static func err(_ text: String) { write(text, to: 2) }

    /// One "qnbd: ..." line on stderr, the format of every qnbd error.
    public static func fail(_ message: String) { err("qnbd: \(message)\n") }

    private static func write(_ text: String, to fd: Int32) {
        let bytes = Array(text.utf8)
        // A failure (a closed pipe) is ignored: there is nowhere left to say anything.
        _ = bytes.withUnsafeBytes { SystemCall.writeStream(fd, from: $0) }
    }
}
