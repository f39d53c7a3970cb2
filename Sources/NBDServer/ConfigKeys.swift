// What each config key means: nbd-server's keys with the same meaning, qnbd's own keys, and the
// nbd-server keys qnbd refuses with a reason (see ConfigFile.swift for the dialect).

import NBDProtocol
import TLS
import UVCore
#if canImport(Glibc)
import Glibc
#endif

extension ConfigFile {
    /// Keys of [generic].
    static let genericKeys = [
        "port", "listenaddr", "unixsock", "duallisten", "user", "group", "allowlist", "includedir",
        "maxconnections", "max_threads", "threads", "loops", "aio", "handshake-timeout", "send-timeout",
        "tls", "tls-certificates", "tls-psk", "tls-verify-peer", "tls-authz-file", "tls-priority",
    ]
    /// Keys of an export section. `listenaddr` is accepted and ignored there, as nbd-server does.
    static let exportKeys = [
        "exportname", "readonly", "authfile", "maxconnections", "trim", "flush", "fua", "rotational",
        "listenaddr", "format", "description", "cache-size", "tls", "tls-psk-users", "bitmap",
    ]
    /// nbd-server keys qnbd does not implement, with what they do there.
    static let unimplementedKeys: [String: String] = [
        "copyonwrite": "writes go to a diff file dropped at disconnect",
        "cowdir": "where copy-on-write diff files go",
        "sparse_cow": "sparse copy-on-write diff files",
        "filesize": "a forced export size",
        "multifile": "an export split over numbered files",
        "treefiles": "an export split over a tree of 4 KiB files",
        "temporary": "a temporary image deleted at exit",
        "prerun": "a command run before serving a client",
        "postrun": "a command run after a client leaves",
        "sdp": "the Socket Direct Protocol",
        "sync": "an fsync after every write (qnbd makes FLUSH and FUA durable instead)",
        "timeout": "an idle timeout (qnbd has send-timeout for clients that stop reading)",
        "transactionlog": "a log of every request",
        "virtstyle": "a different file per client address",
        "waitfile": "live migration with SIGUSR1",
        "splice": "splice(2) for reads and writes",
        "force_tls": "TLS required; qnbd: tls = require in [generic]",
        "tlsonly": "a TLS-only export; qnbd: tls = require in the export's section",
        "certfile": "the TLS server certificate; qnbd: tls-certificates = DIR with server-cert.pem",
        "keyfile": "the TLS server key; qnbd: tls-certificates = DIR with server-key.pem",
        "cacertfile": "the TLS CA certificate; qnbd: tls-certificates = DIR with ca-cert.pem",
        "tlsprio": "the TLS priority string; qnbd: tls-priority",
        "oldstyle": "the oldstyle handshake (removed from nbd-server 3.10 too)",
        "modernport": "the oldstyle handshake's second port (removed from nbd-server too)",
    ]

    struct Builder {
        var configuration = ServerConfiguration(exports: [])
        var exports: [ExportConfiguration] = []
        var includeDir: (path: String, entry: Entry)?
        private var port = 10809
        private var listenHosts: [String] = []
        private var unixSocket: String?
        private var dualListen = false

        mutating func readGeneric(_ section: Section) throws(ConfigError) {
            for entry in section.entries {
                switch entry.key {
                case "port": port = try integer(entry, 0...65535)
                case "listenaddr":
                    listenHosts = entry.value.split(separator: ",").map { $0.trimmingSpaces }.filter { !$0.isEmpty }
                    if listenHosts.isEmpty { throw ConfigError(file: entry.file, line: entry.line, "listenaddr needs at least one address, such as 127.0.0.1 or ::") }
                case "unixsock": unixSocket = try path(entry)
                case "duallisten": dualListen = try boolean(entry)
                case "user": configuration.user = try text(entry)
                case "group": configuration.group = try text(entry)
                case "allowlist": configuration.allowList = try boolean(entry)
                case "includedir": includeDir = (try path(entry), entry)
                case "maxconnections": configuration.maximumConnections = try integer(entry, 1...1_000_000)
                case "max_threads", "threads": configuration.threadPoolSize = try integer(entry, 1...1024)
                case "aio":
                    switch FileIOBackend.parse(aio: entry.value) {
                    case .success(let backend): configuration.aio = backend
                    case .failure(let error): throw ConfigError(file: entry.file, line: entry.line, error.description)
                    }
                case "loops": configuration.loops = try integer(entry, 1...ServerConfiguration.maximumLoops)
                case "handshake-timeout":
                    configuration.connectionLimits.handshakeTimeoutMilliseconds = UInt64(try integer(entry, 1...86_400)) * 1000
                case "send-timeout":
                    configuration.connectionLimits.sendTimeoutMilliseconds = UInt64(try integer(entry, 0...86_400)) * 1000
                case "tls":
                    guard let mode = TLSPolicy(rawValue: entry.value) else {
                        throw ConfigError(file: entry.file, line: entry.line, "key \"tls\" must be off, on or require, not \"\(entry.value)\"")
                    }
                    configuration.tlsMode = mode
                case "tls-certificates":
                    let directory = try path(entry)
                    configuration.tls = withTLS { $0.certificateDirectory = directory }
                case "tls-psk":
                    let file = try path(entry)
                    configuration.tls = withTLS { $0.pskFile = file }
                case "tls-verify-peer":
                    let on = try boolean(entry)
                    configuration.tls = withTLS { $0.verifyPeer = on }
                case "tls-authz-file": configuration.tlsAuthzFile = try path(entry)
                case "tls-priority":
                    let priority = try text(entry)
                    configuration.tls = withTLS { $0.priority = priority }
                default: try refuse(entry, in: section, generic: true)
                }
            }
            // nbd-server: a unix socket replaces TCP unless duallisten says both.
            var listen: [ServerConfiguration.ListenAddress] = []
            if let unixSocket { listen.append(.unix(path: unixSocket)) }
            if unixSocket == nil || dualListen {
                listen += (listenHosts.isEmpty ? ["::"] : listenHosts).map { .tcp(host: $0, port: port) }
            }
            configuration.listen = listen
            // nbd-server answers LIST only with allowlist = true.
            if !section.entries.contains(where: { $0.key == "allowlist" }) { configuration.allowList = false }
        }

        mutating func readExport(_ section: Section) throws(ConfigError) {
            var export = ExportConfiguration(name: section.name, imagePath: "")
            export.origin = "\(section.file):\(section.line)"
            for entry in section.entries {
                switch entry.key {
                case "exportname": export.imagePath = try path(entry)
                case "readonly": export.readOnly = try boolean(entry)
                case "authfile": export.authFile = try path(entry)
                case "maxconnections": export.maximumConnections = try integer(entry, 1...1_000_000)
                case "trim": export.trim = try boolean(entry)
                case "flush": export.flush = try boolean(entry)
                case "fua": export.fua = try boolean(entry)
                case "rotational": export.rotational = try boolean(entry)
                case "listenaddr": break
                case "format":
                    guard let format = ServerConfiguration.ImageFormat(rawValue: entry.value) else {
                        throw ConfigError(file: entry.file, line: entry.line, "key \"format\" must be raw or qcow2, not \"\(entry.value)\"; or remove it to detect the format")
                    }
                    export.format = format
                case "description": export.description = entry.value
                case "tls":
                    // nbd-server's tlsonly, per export; `on` is the default and says so explicitly.
                    switch entry.value {
                    case "require": export.tlsRequired = true
                    case "on": export.tlsRequired = false
                    default:
                        throw ConfigError(file: entry.file, line: entry.line, "key \"tls\" in an export must be require or on, not \"\(entry.value)\"")
                    }
                case "tls-psk-users":
                    let users = entry.value.split(separator: ",").map { String($0.trimmingSpaces) }.filter { !$0.isEmpty }
                    if users.isEmpty {
                        throw ConfigError(file: entry.file, line: entry.line, "key \"tls-psk-users\" needs at least one PSK username (name,name)")
                    }
                    export.allowedPSKUsernames = users
                case "bitmap":
                    // qemu-nbd's -B, once per bitmap; here one key with names separated by commas.
                    let names = entry.value.split(separator: ",").map { String($0.trimmingSpaces) }.filter { !$0.isEmpty }
                    if names.isEmpty {
                        throw ConfigError(file: entry.file, line: entry.line, "key \"bitmap\" needs at least one bitmap name (name,name)")
                    }
                    export.bitmaps = names
                case "cache-size":
                    guard let bytes = ServerConfiguration.parseSize(entry.value) else {
                        throw ConfigError(file: entry.file, line: entry.line, "key \"cache-size\" must be a size such as 16M or 262144, not \"\(entry.value)\"")
                    }
                    export.cacheBytes = bytes
                default: try refuse(entry, in: section, generic: false)
                }
            }
            guard !export.imagePath.isEmpty else {
                throw ConfigError(file: section.file, line: section.line, "export [\(section.name)] has no exportname; add exportname = /path/to/image")
            }
            exports.append(export)
        }

        /// Every key that is not handled above ends here, with the reason and what to do.
        private func refuse(_ entry: Entry, in section: Section, generic: Bool) throws(ConfigError) {
            let key = entry.key
            let place = generic ? "[generic]" : "export [\(section.name)]"
            if let what = ConfigFile.unimplementedKeys[key] {
                if entry.value == "false" || entry.value == "0" { return }
                let isBoolean = ["true", "1"].contains(entry.value)
                throw ConfigError(file: entry.file, line: entry.line,
                                  "key \"\(key)\" (nbd-server: \(what)) is not implemented by qnbd; "
                                    + (isBoolean ? "set it to false or remove the line" : "remove the line"))
            }
            if generic && ConfigFile.exportKeys.contains(key) {
                throw ConfigError(file: entry.file, line: entry.line, "key \"\(key)\" belongs in an export section, not [generic]")
            }
            if !generic && ConfigFile.genericKeys.contains(key) {
                throw ConfigError(file: entry.file, line: entry.line, "key \"\(key)\" belongs in [generic], not in \(place)")
            }
            let known = generic ? ConfigFile.genericKeys : ConfigFile.exportKeys
            var message = "unknown key \"\(key)\" in \(place)"
            if let guess = closest(to: key, in: known) {
                message += "; did you mean \"\(guess)\"?"
            } else {
                message += "; the keys there are " + known.joined(separator: ", ")
            }
            throw ConfigError(file: entry.file, line: entry.line, message)
        }

        /// The TLS settings so far with one change.
        private func withTLS(_ change: (inout TLSConfiguration) -> Void) -> TLSConfiguration {
            var settings = configuration.tls ?? TLSConfiguration()
            change(&settings)
            return settings
        }

        private func boolean(_ entry: Entry) throws(ConfigError) -> Bool {
            switch entry.value {
            case "true", "1": return true
            case "false", "0": return false
            default:
                throw ConfigError(file: entry.file, line: entry.line, "key \"\(entry.key)\" must be true or false, not \"\(entry.value)\"")
            }
        }

        private func integer(_ entry: Entry, _ range: ClosedRange<Int>) throws(ConfigError) -> Int {
            guard let value = Int(entry.value), range.contains(value) else {
                throw ConfigError(file: entry.file, line: entry.line,
                                  "key \"\(entry.key)\" must be a whole number from \(range.lowerBound) to \(range.upperBound), not \"\(entry.value)\"")
            }
            return value
        }

        private func text(_ entry: Entry) throws(ConfigError) -> String {
            guard !entry.value.isEmpty else {
                throw ConfigError(file: entry.file, line: entry.line, "key \"\(entry.key)\" needs a value; remove the line to leave it unset")
            }
            return entry.value
        }

        /// Relative paths are relative to the file they are written in.
        private func path(_ entry: Entry) throws(ConfigError) -> String {
            let value = try text(entry)
            if value.hasPrefix("/") { return value }
            guard let slash = entry.file.lastIndex(of: "/") else { return value }
            return String(entry.file[...slash]) + value
        }
    }

    /// The known key within two edits of `key`, if any.
    static func closest(to key: String, in known: [String]) -> String? {
        let scored = known.map { ($0, editDistance(key, $0)) }.filter { $0.1 <= 2 }
        return scored.min { $0.1 < $1.1 }?.0
    }

    static func editDistance(_ a: String, _ b: String) -> Int {
        let a = Array(a), b = Array(b)
        var previous = Array(0...b.count)
        for i in 1...max(a.count, 1) where !a.isEmpty {
            var current = [i] + Array(repeating: 0, count: b.count)
            for j in 1...max(b.count, 1) where !b.isEmpty {
                current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1))
            }
            previous = current
        }
        return a.isEmpty ? b.count : previous[b.count]
    }
}

extension ServerConfiguration {
    /// "64M", "512k", "1G" or plain bytes; binary multiples.
    public static func parseSize(_ text: String) -> Int? {
        let units: [Character: Int] = ["k": 10, "m": 20, "g": 30, "t": 40]
        var digits = Substring(text.lowercased())
        if digits.hasSuffix("ib") { digits = digits.dropLast(2) } else if digits.hasSuffix("b") { digits = digits.dropLast() }
        var shift = 0
        if let last = digits.last, let s = units[last] {
            shift = s
            digits = digits.dropLast()
        }
        guard let value = Int(digits), value > 0, value <= Int.max >> shift else { return nil }
        return value << shift
    }
}
