// CPUFeatures: what the processor offers that changes which cipher is cheap. Read once from
// /proc/cpuinfo, whose "flags" (x86) or "Features" (arm64) line names AES support as "aes".

#if canImport(Glibc)
import Glibc
#endif

enum CPUFeatures {
    /// Whether the CPU has AES instructions (AES-NI on x86, the crypto extension on arm64). False
    /// when /proc/cpuinfo cannot be read: then GnuTLS's own order is kept.
    static let hasAESInstructions: Bool = {
        guard let file = fopen("/proc/cpuinfo", "r") else { return false }
        defer { fclose(file) }
        var line: UnsafeMutablePointer<CChar>?
        var capacity = 0
        defer { free(line) }
        while getline(&line, &capacity, file) > 0 {
            let text = String(cString: line!)
            guard text.hasPrefix("flags") || text.hasPrefix("Features") else { continue }
            return names(in: text).contains("aes")
        }
        return false
    }()

    /// The space-separated names after the colon of a cpuinfo line.
    static func names(in line: String) -> Set<Substring> {
        guard let colon = line.firstIndex(of: ":") else { return [] }
        return Set(line[line.index(after: colon)...].split(whereSeparator: { $0 == " " || $0 == "\t" || $0 == "\n" }))
    }
}
