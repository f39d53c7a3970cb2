// The config file: nbd-server's INI dialect (`/etc/nbd-server/config`, nbd-server(5)), so an existing
// nbd-server configuration serves as it is, plus qnbd's own keys.
//
// Dialect. Section headers `[name]`; the first section of the main file is `[generic]`, every other
// section is one export named after the section. Option lines are `key = value`: the value is taken as
// written (no quoting), surrounding whitespace removed. Comment lines start with optional whitespace
// and `#`; comments cannot follow a value on the same line. Booleans are `true` or `false` (also `1` and
// `0`, which nbd-server's GLib parser accepts). `includedir` in [generic] names a directory whose `*.conf`
// files (in name order) add export sections; they cannot contain [generic].
//
// Every mistake stops the load with "FILE:LINE: ..." naming the key and what to do: unknown keys (with
// the closest known key), keys of nbd-server that qnbd does not implement (a boolean one set to false
// asks for nothing and is accepted), values of the wrong type, duplicates. Relative paths are taken
// relative to the directory of the file they appear in.

import SystemCalls
#if canImport(Glibc)
import Glibc
#endif

/// A config file mistake, reported as "FILE:LINE: message".
public struct ConfigError: Error, CustomStringConvertible, Equatable {
    public let file: String
    public let line: Int
    public let message: String

    public init(file: String, line: Int, _ message: String) {
        self.file = file
        self.line = line
        self.message = message
    }

    public var description: String { line > 0 ? "\(file):\(line): \(message)" : "\(file): \(message)" }
}

public enum ConfigFile {
    /// Reads `path` (and its includedir) into a configuration.
    public static func load(_ path: String) throws(ConfigError) -> ServerConfiguration {
        let text = try readText(path, referencedFrom: nil)
        return try parse(text, file: path)
    }

    /// Parses the text of the main file; includedir files are read from disk.
    public static func parse(_ text: String, file: String) throws(ConfigError) -> ServerConfiguration {
        let sections = try lex(text, file: file)
        guard let generic = sections.first, generic.name == "generic" else {
            let line = sections.first?.line ?? 1
            throw ConfigError(file: file, line: line, "the first section must be [generic] (it may be empty), as in nbd-server's config")
        }
        var builder = Builder()
        try builder.readGeneric(generic)
        var exportSections = Array(sections.dropFirst())
        if let dir = builder.includeDir {
            exportSections += try includedSections(dir.path, from: dir.entry)
        }
        var seen: [String: Section] = [:]
        for section in exportSections {
            if section.name == "generic" {
                throw ConfigError(file: section.file, line: section.line, "[generic] must be the first section of the main file and appear once")
            }
            if let first = seen[section.name] {
                throw ConfigError(file: section.file, line: section.line,
                                  "export [\(section.name)] is defined twice (first at \(first.file):\(first.line)); rename one")
            }
            seen[section.name] = section
            try builder.readExport(section)
        }
        guard !builder.exports.isEmpty else {
            throw ConfigError(file: file, line: 0, "no exports; add a section such as [disk] with exportname = /path/to/image")
        }
        var configuration = builder.configuration
        configuration.exports = builder.exports
        configuration.configFile = file
        return configuration
    }

    // MARK: - Lexing

    struct Entry {
        var key: String
        var value: String
        var file: String
        var line: Int
    }

    struct Section {
        var name: String
        var file: String
        var line: Int
        var entries: [Entry] = []
    }

    static func lex(_ text: String, file: String) throws(ConfigError) -> [Section] {
        var sections: [Section] = []
        var number = 0
        for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
            number += 1
            let line = raw.drop { $0 == " " || $0 == "\t" || $0 == "\r" }.reversed().drop { $0 == " " || $0 == "\t" || $0 == "\r" }
            let trimmed = String(line.reversed())
            if trimmed.isEmpty || trimmed.hasPrefix("#") { continue }
            if trimmed.hasPrefix("[") {
                guard trimmed.hasSuffix("]"), trimmed.count >= 3 else {
                    throw ConfigError(file: file, line: number, "a section header is [name] on a line of its own, not \(trimmed)")
                }
                let name = String(trimmed.dropFirst().dropLast())
                if let previous = sections.last(where: { $0.name == name }), previous.file == file {
                    throw ConfigError(file: file, line: number, "section [\(name)] appears twice (first at line \(previous.line))")
                }
                sections.append(Section(name: name, file: file, line: number))
                continue
            }
            guard let equals = trimmed.firstIndex(of: "=") else {
                throw ConfigError(file: file, line: number, "expected \"key = value\", \"[section]\" or a # comment, not \(trimmed)")
            }
            let key = String(trimmed[..<equals]).trimmingSpaces
            let value = String(trimmed[trimmed.index(after: equals)...]).trimmingSpaces
            guard !key.isEmpty else { throw ConfigError(file: file, line: number, "a key is missing before \"=\"") }
            guard !sections.isEmpty else {
                throw ConfigError(file: file, line: number, "key \"\(key)\" comes before any section; start the file with [generic]")
            }
            if let first = sections[sections.count - 1].entries.first(where: { $0.key == key }) {
                throw ConfigError(file: file, line: number, "key \"\(key)\" is set twice in [\(sections[sections.count - 1].name)] (first at line \(first.line)); keep one")
            }
            sections[sections.count - 1].entries.append(Entry(key: key, value: value, file: file, line: number))
        }
        return sections
    }

    private static func includedSections(_ dir: String, from entry: Entry) throws(ConfigError) -> [Section] {
        guard let handle = opendir(dir) else {
            throw ConfigError(file: entry.file, line: entry.line,
                              "includedir \(dir) cannot be read: \(String(cString: strerror(errno))); create it or remove the line")
        }
        var names: [String] = []
        while let item = readdir(handle) {
            let name = withUnsafeBytes(of: item.pointee.d_name) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if name.hasSuffix(".conf") && !name.hasPrefix(".") { names.append(name) }
        }
        closedir(handle)
        var sections: [Section] = []
        for name in names.sorted() {
            let path = dir + "/" + name
            let text = try readText(path, referencedFrom: entry)
            let found = try lex(text, file: path)
            if let stray = found.first(where: { $0.name == "generic" }) {
                throw ConfigError(file: path, line: stray.line, "an included file cannot contain [generic]; move those keys to the main file")
            }
            if found.isEmpty, let first = text.split(separator: "\n").firstIndex(where: { !$0.trimmingSpaces.isEmpty && !$0.trimmingSpaces.hasPrefix("#") }) {
                throw ConfigError(file: path, line: first + 1, "keys outside a section")
            }
            sections += found
        }
        return sections
    }

    static func readText(_ path: String, referencedFrom entry: Entry?, what: String = "the config file") throws(ConfigError) -> String {
        let bytes: [UInt8]
        do {
            bytes = try SystemCall.readSmallFile(path, limit: 16 << 20)
        } catch {
            let why = error.systemMessage
            switch error.reason {
            case .cannotOpen:
                if let entry { throw ConfigError(file: entry.file, line: entry.line, "cannot read \(path): \(why)") }
                throw ConfigError(file: path, line: 0, "cannot read \(what): \(why) (as uid \(getuid()))")
            case .cannotRead:
                throw ConfigError(file: path, line: 0, "cannot read: \(why)")
            case .tooLarge:
                throw ConfigError(file: path, line: 0, "larger than 16 MiB; is this a config file?")
            }
        }
        guard let text = String(validating: bytes, as: UTF8.self) else {
            throw ConfigError(file: path, line: 0, "is not UTF-8 text")
        }
        return text
    }
}

extension StringProtocol {
    var trimmingSpaces: String {
        let isSpace: (Character) -> Bool = { $0 == " " || $0 == "\t" || $0 == "\r" }
        return String(self.drop(while: isSpace).reversed().drop(while: isSpace).reversed())
    }
}
