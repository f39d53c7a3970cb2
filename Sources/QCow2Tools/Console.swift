// stdout and stderr for the tool subcommands: reports go to stdout, findings and errors to stderr,
// the split qemu-img uses (scripts parse stdout; people read both). Plain write(2) on the descriptors:
// C's stdio globals are shared mutable state to Swift 6, and there is nothing to buffer here anyway.

#if canImport(Glibc)
import Glibc
#endif

public enum Console {
    public static func out(_ text: String) { write(text, to: 1) }

    public static func err(_ text: String) { write(text, to: 2) }

    /// One "qnbd: ..." line on stderr, the format of every qnbd error.
    public static func fail(_ message: String) { err("qnbd: \(message)\n") }

    private static func write(_ text: String, to fd: Int32) {
        var bytes = Array(text.utf8)
        var done = 0
        while done < bytes.count {
            let n = bytes.withUnsafeMutableBytes { Glibc.write(fd, $0.baseAddress! + done, $0.count - done) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return }   // a closed pipe: nothing more to say
            done += n
        }
    }
}
