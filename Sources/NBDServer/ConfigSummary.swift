// What `qnbd serve --check-config` prints: the configuration as qnbd understood it.

public enum ConfigSummary {
    public static func describe(_ c: ServerConfiguration) -> String {
        var lines: [String] = []
        lines.append("listen: " + c.listen.map(\.description).joined(separator: ", "))
        lines.append("maxconnections: \(c.maximumConnections), threads: \(c.threadPoolSize), allowlist: \(c.allowList)")
        lines.append("loops: \(c.effectiveLoops)\(c.loops == nil ? " (one per online CPU)" : ""), aio: \(c.aio.map(\.rawValue) ?? "io_uring if the kernel allows it, else threads")")
        if c.user != nil || c.group != nil { lines.append("user: \(c.user ?? "-"), group: \(c.group ?? "-")") }
        for e in c.exports {
            var parts = ["export \"\(e.name)\": \(e.imagePath)"]
            parts.append("format \(e.format?.rawValue ?? "detected")")
            if e.readOnly { parts.append("readonly") }
            if let m = e.maximumConnections { parts.append("maxconnections \(m)") }
            if let a = e.authFile { parts.append("authfile \(a)") }
            if let b = e.cacheBytes { parts.append("cache \(b) bytes") }
            for (name, value) in [("trim", e.trim), ("flush", e.flush), ("fua", e.fua), ("rotational", e.rotational)] {
                if let value { parts.append("\(name) \(value)") }
            }
            if !e.bitmaps.isEmpty { parts.append("bitmaps " + e.bitmaps.map { "\"\($0)\"" }.joined(separator: ", ")) }
            if !e.description.isEmpty { parts.append("description \"\(e.description)\"") }
            lines.append(parts.joined(separator: ", "))
        }
        return lines.joined(separator: "\n")
    }
}
