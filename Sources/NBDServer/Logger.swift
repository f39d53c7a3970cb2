// One-line log messages to stderr, prefixed so they stand out in a test run or a journal.

#if canImport(Glibc)
import Glibc
#endif

public struct Logger: Sendable {
    public enum Level: Int, Sendable, Comparable {
        case error = 0, warning, info, debug, trace
        public static func < (a: Level, b: Level) -> Bool { a.rawValue < b.rawValue }
    }

    public var level: Level

    public init(level: Level) { self.level = level }

    @inline(__always)
    public func enabled(_ l: Level) -> Bool { l <= level }

    public func log(_ l: Level, _ message: @autoclosure () -> String) {
        guard l <= level else { return }
        Self.writeLine("qnbd: \(message())")
    }

    /// One write(2) per line, so lines from a crash or a concurrent process never interleave mid-line.
    public static func writeLine(_ line: String) {
        var text = line + "\n"
        text.withUTF8 { bytes in _ = Glibc.write(2, bytes.baseAddress, bytes.count) }
    }

    public func error(_ m: @autoclosure () -> String) { log(.error, m()) }
    public func warning(_ m: @autoclosure () -> String) { log(.warning, m()) }
    public func info(_ m: @autoclosure () -> String) { log(.info, m()) }
    public func debug(_ m: @autoclosure () -> String) { log(.debug, m()) }
}
