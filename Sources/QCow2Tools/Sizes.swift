// Sizes as operators type them ("10G", "1.5M", "64KiB", "4096") and as qemu-img prints them
// ("10 GiB", "1.39 MiB"), so that qnbd's output reads the same as the tool people already know.

#if canImport(Glibc)
import Glibc
#endif

public enum SizeParser {
    /// Binary multipliers by suffix letter; qemu-img's letters plus the IEC spellings (KiB, MiB, ...).
    private static let multipliers: [Character: UInt64] = [
        "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50, "e": 1 << 60,
    ]

    /// Parses a byte count. A bare number is bytes; a fraction needs a unit ("1.5G"), and is truncated to
    /// whole bytes like qemu-img does.
    public static func parse(_ text: String) throws(ToolError) -> UInt64 {
        let trimmed = text.trimmingSpaces
        var digits = Substring(trimmed)
        var suffix = ""
        while let last = digits.last, !(last.isASCII && (last.isNumber || last == ".")) {
            suffix.insert(last, at: suffix.startIndex)
            digits.removeLast()
        }
        let lower = suffix.lowercased()
        var multiplier: UInt64 = 1
        if !lower.isEmpty {
            let letter = lower.first!
            let rest = lower.dropFirst()
            guard let m = multipliers[letter], rest.isEmpty || (rest == "ib" && letter != "b") else {
                throw ToolError("invalid size '\(text)': unknown unit '\(suffix)' (use K, M, G, T, P, E or KiB, MiB, ...)")
            }
            multiplier = m
        }
        let parts = digits.split(separator: ".", omittingEmptySubsequences: false)
        guard !digits.isEmpty, parts.count <= 2, let wholePart = parts.first, !wholePart.isEmpty || parts.count == 2,
              wholePart.allSatisfy({ $0.isASCII && $0.isNumber }) else {
            throw ToolError("invalid size '\(text)'")
        }
        let whole: UInt64
        if wholePart.isEmpty {
            whole = 0
        } else {
            guard let w = UInt64(wholePart) else { throw ToolError("size '\(text)' is too large") }
            whole = w
        }
        let (product, overflow) = whole.multipliedReportingOverflow(by: multiplier)
        guard !overflow else { throw ToolError("size '\(text)' is too large") }
        var total = product
        if parts.count == 2 {
            let fraction = parts[1]
            guard !fraction.isEmpty, fraction.allSatisfy({ $0.isASCII && $0.isNumber }) else {
                throw ToolError("invalid size '\(text)'")
            }
            guard multiplier > 1 else { throw ToolError("invalid size '\(text)': a fraction of a byte needs a unit") }
            let (sum, overflow) = product.addingReportingOverflow(
                fractionalBytes(String(fraction.prefix(18)), multiplier: multiplier))
            guard !overflow else { throw ToolError("size '\(text)' is too large") }
            total = sum
        }
        guard total <= UInt64(Int64.max) else { throw ToolError("size '\(text)' is too large") }
        return total
    }

    /// floor(0.fraction × multiplier) without floating point.
    private static func fractionalBytes(_ fraction: String, multiplier: UInt64) -> UInt64 {
        // The numerator times a multiplier up to 2^60 needs 128 bits; the quotient fits in 64.
        var numerator: UInt64 = 0
        var denominator: UInt64 = 1
        for digit in fraction {
            if denominator > UInt64.max / 10 { break }
            numerator = numerator * 10 + UInt64(digit.wholeNumberValue!)
            denominator *= 10
        }
        let (high, low) = numerator.multipliedFullWidth(by: multiplier)
        return denominator.dividingFullWidth((high, low)).quotient
    }
}

extension String {
    var trimmingSpaces: String {
        String(drop { $0 == " " || $0 == "\t" }.reversed().drop { $0 == " " || $0 == "\t" }.reversed())
    }
}

public enum SizeFormatter {
    /// qemu's size_to_str(): three significant digits and a binary unit, switching unit once the value
    /// reaches 1000 of the smaller one ("1000 KiB" is printed as "0.977 MiB").
    public static func human(_ value: UInt64) -> String {
        let suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
        var exponent: Int32 = 0
        _ = frexp(Double(value) / (1000.0 / 1024.0), &exponent)
        let index = max(0, min(suffixes.count - 1, Int((exponent - 1) / 10)))
        let divisor = Double(UInt64(1) << UInt64(index * 10))
        return cFormat("%0.3g", Double(value) / divisor) + " \(suffixes[index])B"
    }
}

/// printf-style formatting of numbers through vsnprintf, for the few places where qemu's exact number
/// formatting (%g, %0.2f, %#x) is part of the output people compare. Numbers only: Swift strings are not
/// C varargs.
public func cFormat(_ format: String, _ arguments: CVarArg...) -> String {
    withVaList(arguments) { list in
        var buffer = [CChar](repeating: 0, count: 512)
        let n = buffer.withUnsafeMutableBufferPointer { vsnprintf($0.baseAddress, 512, format, list) }
        guard n >= 0 else { return "" }
        return String(decoding: buffer.prefix(min(Int(n), 511)).map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }
}
