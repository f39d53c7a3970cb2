// One-line log messages to stderr, prefixed so they stand out in a test run or a journal.
//
// Under systemd, stderr is often a stream into the journal; systemd then sets JOURNAL_STREAM to that
// stream's "device:inode". When stderr is that very stream, each line starts with a syslog priority
// ("<3>" error ... "<7>" debug), which the journal turns into the entry's priority and strips.

#if canImport(Glibc)
import Glibc
#endif

public struct Logger: Sendable {
    public enum Level: Int, Sendable, Comparable {
        case error = 0, warning, info, debug, trace
        public static func < (a: Level, b: Level) -> Bool { a.rawValue < b.rawValue }

        /// "error", "warning" (or "warn"), "info", "debug", "trace".
        public init?(name: String) {
            switch name.lowercased() {
            case "error": self = .error
            case "warning", "warn": self = .warning
            case "info": self = .info
            case "debug": self = .debug
            case "trace": self = .trace
            default: return nil
            }
        }

        /// syslog(3) priority: LOG_ERR, LOG_WARNING, LOG_INFO, LOG_DEBUG.
        var syslogPriority: Int { [3, 4, 6, 7, 7][rawValue] }
    }

    public var level: Level
    /// What the lines are about ("export \"disk\""), written after "qnbd: ".
    public var label: String?

    public init(level: Level, label: String? = nil) {
        self.level = level
        self.label = label
    }

    /// The same logger, its lines about `label`.
    public func labelled(_ label: String) -> Logger { Logger(level: level, label: label) }

    @inline(__always)
    public func enabled(_ l: Level) -> Bool { l <= level }

    public func log(_ l: Level, _ message: @autoclosure () -> String) {
        guard l <= level else { return }
        Self.writeLine(label.map { "qnbd: \($0): \(message())" } ?? "qnbd: \(message())", level: l)
    }

    /// Whether stderr is the journal stream systemd told us about.
    static let stderrIsJournal: Bool = {
        guard let value = getenv("JOURNAL_STREAM").map({ String(cString: $0) }) else { return false }
        let parts = value.split(separator: ":")
        guard parts.count == 2, let dev = UInt64(parts[0]), let ino = UInt64(parts[1]) else { return false }
        var info = stat()
        guard fstat(2, &info) == 0 else { return false }
        return UInt64(info.st_dev) == dev && UInt64(info.st_ino) == ino
    }()

    /// One write(2) per line, so lines from a crash or a concurrent process never interleave mid-line.
    public static func writeLine(_ line: String, level: Level = .error) {
        var text = (stderrIsJournal ? "<\(level.syslogPriority)>" : "") + line + "\n"
        text.withUTF8 { bytes in _ = Glibc.write(2, bytes.baseAddress, bytes.count) }
    }

    public func error(_ m: @autoclosure () -> String) { log(.error, m()) }
    public func warning(_ m: @autoclosure () -> String) { log(.warning, m()) }
    public func info(_ m: @autoclosure () -> String) { log(.info, m()) }
    public func debug(_ m: @autoclosure () -> String) { log(.debug, m()) }
}
