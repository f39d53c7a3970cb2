// Test-only fault injection on an image file: a wrapper a test installs in a driver (RawDriver's and
// QCow2Driver's `faults:`). The server installs one in each image it opens when the QNBD_TEST_FAULTS
// environment variable holds rules; its TestTaps read the variable once at startup, and nothing else
// reads it.
//
// The drivers' error paths (a data write that fails, a metadata write refused for space, an fdatasync
// that reports EIO) cannot be reached on demand with a healthy disk. So before issuing a read, write,
// sync or punch of its image file, a driver asks the injector; when a rule matches, the operation is
// completed with that errno instead of being issued. Without an injector the cost is one nil check per
// operation.
//
// The rules are separated by ';'. A rule is a kind followed by comma-separated conditions:
//   write,errno=EIO,nth=3                      the 3rd write fails
//   sync,errno=EIO,from=2                      the 2nd sync and every later one fail
//   write,errno=ENOSPC,offset=0x40000+0x10000  writes touching [0x40000, 0x50000) fail
//   write,errno=ENOSPC,offset=0x40000-0x50000  the same range, by its end
//   read,errno=EIO,while=/tmp/faults-on        reads fail while that file exists
// Kinds: read, write, sync, punch. errno: EIO, ENOSPC, EDQUOT, EROFS, EFBIG, ENOMEM, EINVAL, or a number.
// `nth` and `from` count, from 1, the operations the rule's kind, range and `while` file select, so
// `while` with nth=1 means "the first one after the file appears". A sync has no offset: a rule with a
// range never matches one. Rules are independent; when several match, the first listed gives the errno.

#if canImport(Glibc)
import Glibc
#endif

public final class FaultInjector {
    public enum Operation: String, Sendable {
        case read, write, sync, punch
    }

    public struct RuleError: Error, CustomStringConvertible {
        public let description: String
    }

    struct Rule {
        let operation: Operation
        let errno: Int32
        /// Fail only the nth selected operation, or (`andLater`) the nth and every later one.
        var ordinal: (n: Int, andLater: Bool)?
        var range: Range<UInt64>?
        var whilePath: String?
        var selected = 0

        func touches(offset: UInt64, length: UInt64) -> Bool {
            guard let range else { return true }
            return length > 0 && offset < range.upperBound && offset + length > range.lowerBound
        }

        var ordinalMatches: Bool {
            guard let ordinal else { return true }
            return ordinal.andLater ? selected >= ordinal.n : selected == ordinal.n
        }
    }

    /// The variable the server's test taps read the rules from, named by the parse errors too.
    public static let environmentVariable = "QNBD_TEST_FAULTS"

    private var rules: [Rule]
    /// The rules as given, for a log line.
    public let text: String

    public init(rules text: String) throws(RuleError) {
        self.text = text
        var rules: [Rule] = []
        for part in text.split(separator: ";") {
            let rule = part.trimmingSpaces
            if !rule.isEmpty { rules.append(try Self.parse(rule)) }
        }
        self.rules = rules
    }

    private init(text: String, rules: [Rule]) {
        self.text = text
        self.rules = rules
    }

    /// An injector with the same rules that has counted nothing yet: `nth` and `from` count one
    /// driver's operations, so each opened image gets its own.
    public func fresh() -> FaultInjector {
        FaultInjector(text: text, rules: rules.map { rule in
            var unused = rule
            unused.selected = 0
            return unused
        })
    }

    /// The errno to complete this operation with, or nil to issue it.
    public func fault(_ operation: Operation, offset: UInt64 = 0, length: UInt64 = 0) -> Int32? {
        var result: Int32?
        for i in rules.indices where rules[i].operation == operation {
            guard rules[i].touches(offset: offset, length: length) else { continue }
            // A stat per selected operation: acceptable on a test-only path, and it lets a test switch
            // the fault on and off while the server runs.
            if let path = rules[i].whilePath, access(path, F_OK) != 0 { continue }
            rules[i].selected += 1
            if result == nil && rules[i].ordinalMatches { result = rules[i].errno }
        }
        return result
    }

    // MARK: - Parsing

    private static func parse(_ text: String) throws(RuleError) -> Rule {
        let fields = text.split(separator: ",").map { $0.trimmingSpaces }
        guard let kind = fields.first.flatMap(Operation.init(rawValue:)) else {
            throw RuleError(description: "\(environmentVariable): \"\(text)\": the kind must be read, write, sync or punch")
        }
        var errno: Int32?
        var ordinal: (n: Int, andLater: Bool)?
        var range: Range<UInt64>?
        var whilePath: String?
        for field in fields.dropFirst() {
            let pair = field.split(separator: "=", maxSplits: 1).map(String.init)
            guard pair.count == 2 else { throw RuleError(description: "\(environmentVariable): \"\(field)\" is not key=value") }
            let (key, value) = (pair[0], pair[1])
            switch key {
            case "errno":
                errno = errnoNames[value] ?? Int32(value)
                guard let e = errno, e > 0 else { throw RuleError(description: "\(environmentVariable): unknown errno \"\(value)\"") }
            case "nth", "from":
                guard let n = Int(value), n >= 1 else { throw RuleError(description: "\(environmentVariable): \(key) wants a number >= 1") }
                ordinal = (n, key == "from")
            case "offset":
                range = try parseRange(value)
            case "while":
                whilePath = value
            default:
                throw RuleError(description: "\(environmentVariable): unknown condition \"\(key)\"")
            }
        }
        guard let errno else { throw RuleError(description: "\(environmentVariable): \"\(text)\" names no errno") }
        if range != nil && kind == .sync {
            throw RuleError(description: "\(environmentVariable): \"\(text)\": a sync has no offset")
        }
        return Rule(operation: kind, errno: errno, ordinal: ordinal, range: range, whilePath: whilePath)
    }

    private static func parseRange(_ text: String) throws(RuleError) -> Range<UInt64> {
        let byLength = text.contains("+")
        let parts = text.split(separator: byLength ? "+" : "-", maxSplits: 1).map { number(String($0)) }
        guard parts.count == 2, let start = parts[0], let second = parts[1] else {
            throw RuleError(description: "\(environmentVariable): offset \"\(text)\" is not start+length or start-end")
        }
        let end = byLength ? start + second : second
        guard end > start else { throw RuleError(description: "\(environmentVariable): offset \"\(text)\" is empty") }
        return start..<end
    }

    private static func number(_ text: String) -> UInt64? {
        text.hasPrefix("0x") ? UInt64(text.dropFirst(2), radix: 16) : UInt64(text)
    }

    private static let errnoNames: [String: Int32] = [
        "EIO": EIO, "ENOSPC": ENOSPC, "EDQUOT": EDQUOT, "EROFS": EROFS, "EFBIG": EFBIG, "ENOMEM": ENOMEM,
        "EINVAL": EINVAL, "EPERM": EPERM,
    ]
}

private extension Substring {
    var trimmingSpaces: String {
        String(drop { $0 == " " }.reversed().drop { $0 == " " }.reversed())
    }
}
