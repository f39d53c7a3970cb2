// The `qnbd` command: parses arguments and hands a configuration to the server. No callbacks are
// formed here, so nothing libuv calls can inherit main-actor isolation (see research/swift-libuv.md).

import ArgumentParser
import NBDProtocol
import NBDServer
import TLS
import UVCore
#if canImport(Glibc)
import Glibc
#endif

@main
struct QNBD: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qnbd",
        abstract: "A network block device (NBD) server for disk images.",
        discussion: """
            qnbd serves a disk image over the NBD protocol to the Linux kernel's nbd-client, qemu and \
            libnbd's tools (nbdinfo, nbdcopy, nbdsh).
            """,
        subcommands: [Serve.self, CreateCommand.self, InfoCommand.self, CheckCommand.self, MapCommand.self, BitmapCommand.self],
        defaultSubcommand: nil)

    /// Usage mistakes are reported as one `qnbd:` line (the operator's log stays readable); help and
    /// version requests print as usual.
    static func main() {
        do {
            var command = try parseAsRoot()
            try command.run()
        } catch {
            let code = exitCode(for: error)
            if code == .success || error is ExitCode {
                exit(withError: error)
            }
            var message = fullMessage(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
            if message.hasPrefix("Error: ") { message.removeFirst(7) }
            Logger.writeLine("qnbd: \(message) (see qnbd --help)")
            Glibc.exit(code.rawValue)
        }
    }
}

struct Serve: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Serve a disk image, or every export of a config file, over NBD.",
        discussion: """
            Examples:
              qnbd serve disk.img                         TCP port 10809 on every address
              qnbd serve --socket /run/disk.sock disk.img  a unix socket
              qnbd serve -r --bind 127.0.0.1 -p 10810 disk.img
              qnbd serve -C /etc/qnbd/qnbd.conf           many exports (nbd-server's config format)

            Attach with: nbdinfo nbd://HOST:PORT   qemu-img info nbd://HOST:PORT
                         nbd-client HOST PORT /dev/nbd0 -N ''
            SIGINT or SIGTERM stops the server cleanly: in-flight requests finish and the image is flushed.
            SIGHUP re-reads the config file. Under systemd, qnbd takes socket-activated sockets
            (LISTEN_FDS) and reports readiness (Type=notify).
            """)

    @Argument(help: "The image file or block device to serve (not with --config).")
    var image: String?

    @Option(name: [.customShort("C"), .long], help: ArgumentHelp(
        "Serve the exports of an nbd-server style config file; SIGHUP re-reads it.", valueName: "FILE"))
    var config: String?

    @Flag(name: .long, help: "Check the config file (or the command line), print the exports and exit.")
    var checkConfig = false

    @Option(name: .long, help: ArgumentHelp("Listen on a unix socket at PATH instead of TCP.", valueName: "PATH"))
    var socket: String?

    @Option(name: .long, help: ArgumentHelp("TCP address to listen on (repeatable; default: every address).", valueName: "ADDR"))
    var bind: [String] = []

    @Option(name: [.short, .long], help: "TCP port (0 picks a free one; default 10809).")
    var port: Int?

    @Option(name: [.customShort("x"), .long], help: "Export name clients ask for.")
    var exportName: String = ""

    @Option(name: [.customShort("D"), .long], help: "Export description shown by nbdinfo and nbd-client -l.")
    var description: String = ""

    @Flag(name: [.short, .long], help: "Refuse writes.")
    var readOnly = false

    @Option(name: [.short, .long], help: "Image format: raw or qcow2 (default: detected from the image).")
    var format: String?

    @Option(name: [.customShort("B"), .long], help: ArgumentHelp(
        "Serve the image's persistent bitmap NAME as meta context qemu:dirty-bitmap:NAME, for incremental backups (repeatable; qemu-nbd's -B).",
        valueName: "NAME"))
    var bitmap: [String] = []

    @Option(name: .long, help: "Most clients served at once; more are turned away (default 128).")
    var maxConnections: Int?

    @Option(name: .long, help: ArgumentHelp("Write the process id to PATH once listening.", valueName: "PATH"))
    var pidFile: String?

    @Option(name: .long, help: "Threads for file I/O that cannot be served from the page cache (default 16).")
    var threads: Int?

    @Option(name: .long, help: "Event loops, one thread each; connections are spread over them (default: one per online CPU; up to 64).")
    var loops: Int?

    @Option(name: .long, help: ArgumentHelp(
        "File I/O backend: io_uring or threads (default: io_uring when the kernel allows it).", valueName: "MODE"))
    var aio: String?

    @Option(name: .long, help: ArgumentHelp(
        "qcow2 metadata cache in bytes (suffixes K, M, G); default: enough for the whole disk, at most 64M.",
        valueName: "SIZE"))
    var cacheSize: String?

    @Option(name: .long, help: "Seconds a client has to finish the handshake (default 10).")
    var handshakeTimeout: Int?

    @Option(name: .long, help: ArgumentHelp(
        "Close a connection whose replies the client has not read for SECONDS (0: never; default 30).", valueName: "SECONDS"))
    var sendTimeout: Int?

    @Option(name: .long, help: ArgumentHelp(
        "TLS: off, on (STARTTLS offered) or require (nothing else answered before it). Default: on when credentials are given.",
        valueName: "MODE"))
    var tls: String?

    @Option(name: .long, help: ArgumentHelp(
        "X.509 credentials: DIR holds ca-cert.pem, server-cert.pem, server-key.pem and optionally ca-crl.pem (qemu's and nbdkit's layout).",
        valueName: "DIR"))
    var tlsCertificates: String?

    @Option(name: .long, help: ArgumentHelp("PSK credentials: a psktool file of username:hexkey lines.", valueName: "FILE"))
    var tlsPsk: String?

    @Flag(name: .long, help: "Require a client certificate signed by the CA in --tls-certificates.")
    var tlsVerifyPeer = false

    @Option(name: .long, help: ArgumentHelp(
        "Allow only the client certificate with this distinguished name (repeatable; implies --tls-verify-peer).",
        valueName: "DN"))
    var tlsAuthz: [String] = []

    @Option(name: .long, help: ArgumentHelp(
        "Allow only the client certificate DNs listed in FILE, one a line (implies --tls-verify-peer).", valueName: "FILE"))
    var tlsAuthzFile: String?

    @Option(name: .long, help: ArgumentHelp(
        "GnuTLS priority string (default \(TLSConfiguration.defaultPriority)).", valueName: "STRING"))
    var tlsPriority: String?

    @Flag(name: .shortAndLong, help: "More logging (repeat for more).")
    var verbose: Int

    @Option(name: .long, help: ArgumentHelp("Log level: error, warning, info, debug or trace (default info).", valueName: "LEVEL"))
    var logLevel: String?

    func validate() throws {
        if config == nil && image == nil { throw ValidationError("give an image to serve, or --config FILE") }
        if config != nil && image != nil { throw ValidationError("give an image or --config, not both (exports of a config file are set in the file)") }
        if config != nil {
            let perExport: [(Bool, String)] = [(!exportName.isEmpty, "--export-name"), (!description.isEmpty, "--description"),
                                               (readOnly, "--read-only"), (format != nil, "--format"), (cacheSize != nil, "--cache-size"),
                                               (!bitmap.isEmpty, "--bitmap")]
            if let (_, name) = perExport.first(where: { $0.0 }) {
                throw ValidationError("\(name) sets one export; with --config set it in the export's section of the file")
            }
        }
        if socket != nil && !bind.isEmpty { throw ValidationError("--socket and --bind cannot be combined") }
        if let port, !(0...65535).contains(port) { throw ValidationError("--port must be between 0 and 65535") }
        if let maxConnections, maxConnections < 1 { throw ValidationError("--max-connections must be at least 1") }
        if let threads, !(1...1024).contains(threads) { throw ValidationError("--threads must be between 1 and 1024") }
        if let aio, case .failure(let error) = FileIOBackend.parse(aio: aio) { throw ValidationError("--\(error.description)") }
        if let loops, !(1...ServerConfiguration.maximumLoops).contains(loops) {
            throw ValidationError("--loops must be between 1 and \(ServerConfiguration.maximumLoops)")
        }
        if let handshakeTimeout, handshakeTimeout < 1 { throw ValidationError("--handshake-timeout must be at least 1 second") }
        if let sendTimeout, !(0...86_400).contains(sendTimeout) { throw ValidationError("--send-timeout must be between 0 and 86400 seconds") }
        if let cacheSize, ServerConfiguration.parseSize(cacheSize) == nil {
            throw ValidationError("--cache-size must be a size such as 1M or 262144, not \(cacheSize)")
        }
        if bitmap.contains(where: \.isEmpty) { throw ValidationError("--bitmap needs a bitmap name") }
        if let format, ServerConfiguration.ImageFormat(rawValue: format) == nil {
            throw ValidationError("--format must be raw or qcow2, not \(format)")
        }
        if let tls, TLSPolicy(rawValue: tls) == nil { throw ValidationError("--tls must be off, on or require, not \(tls)") }
        if tlsPriority?.isEmpty == true { throw ValidationError("--tls-priority needs a GnuTLS priority string") }
        if let logLevel, Logger.Level(name: logLevel) == nil {
            throw ValidationError("--log-level must be error, warning, info, debug or trace, not \(logLevel)")
        }
    }

    /// "64M", "512k", "1G" or plain bytes; binary multiples.
    static func parseSize(_ text: String) -> Int? { ServerConfiguration.parseSize(text) }

    /// The command-line settings that apply on top of a config file (and again at every reload).
    private func commandLineOverrides() -> @Sendable (inout ServerConfiguration) -> Void {
        var listen: [ServerConfiguration.ListenAddress]?
        if let socket {
            listen = [.unix(path: socket)]
        } else if !bind.isEmpty || port != nil {
            listen = (bind.isEmpty ? ["::"] : bind).map { .tcp(host: $0, port: port ?? 10809) }
        }
        let listenOverride = listen
        let tlsMode = tls.flatMap(TLSPolicy.init(rawValue:))
        let (tlsCertificates, tlsPsk, tlsVerifyPeer, tlsAuthz, tlsAuthzFile, tlsPriority)
            = (tlsCertificates, tlsPsk, tlsVerifyPeer, tlsAuthz, tlsAuthzFile, tlsPriority)
        let changesTLS = tlsCertificates != nil || tlsPsk != nil || tlsVerifyPeer || !tlsAuthz.isEmpty || tlsPriority != nil
        let (maxConnections, threads, handshakeTimeout, sendTimeout, pidFile) = (maxConnections, threads, handshakeTimeout, sendTimeout, pidFile)
        let aioBackend = aio.flatMap { try? FileIOBackend.parse(aio: $0).get() }
        let loops = loops
        let level: Logger.Level? = logLevel.flatMap(Logger.Level.init(name:)) ?? (verbose > 0 ? [.debug, .trace][min(verbose, 2) - 1] : nil)
        return { configuration in
            if let listenOverride { configuration.listen = listenOverride }
            if let maxConnections { configuration.maximumConnections = maxConnections }
            if let threads { configuration.threadPoolSize = threads }
            if let aioBackend { configuration.aio = aioBackend }
            if let loops { configuration.loops = loops }
            if let handshakeTimeout { configuration.connectionLimits.handshakeTimeoutMilliseconds = UInt64(handshakeTimeout) * 1000 }
            if let sendTimeout { configuration.connectionLimits.sendTimeoutMilliseconds = UInt64(sendTimeout) * 1000 }
            if let pidFile { configuration.pidFile = pidFile }
            if let level { configuration.logLevel = level }
            if let tlsMode { configuration.tlsMode = tlsMode }
            if changesTLS {
                var settings = configuration.tls ?? TLSConfiguration()
                if let tlsCertificates { settings.certificateDirectory = tlsCertificates }
                if let tlsPsk { settings.pskFile = tlsPsk }
                if tlsVerifyPeer { settings.verifyPeer = true }
                if !tlsAuthz.isEmpty { settings.allowedClientDNs = tlsAuthz }
                if let tlsPriority { settings.priority = tlsPriority }
                configuration.tls = settings
            }
            if let tlsAuthzFile { configuration.tlsAuthzFile = tlsAuthzFile }
        }
    }

    func run() throws {
        var configuration: ServerConfiguration
        if let config {
            do {
                configuration = try ConfigFile.load(config)
            } catch {
                Logger.writeLine("qnbd: \(error)")
                throw ExitCode(1)
            }
        } else {
            configuration = ServerConfiguration(imagePath: image!)
            configuration.exports[0].format = format.flatMap(ServerConfiguration.ImageFormat.init(rawValue:))
            configuration.exports[0].name = exportName
            configuration.exports[0].description = description
            configuration.exports[0].readOnly = readOnly
            configuration.exports[0].cacheBytes = cacheSize.flatMap(Self.parseSize)
            configuration.exports[0].bitmaps = bitmap
            configuration.listen = [.tcp(host: "::", port: 10809)]
        }
        let overrides = commandLineOverrides()
        overrides(&configuration)
        configuration.overrides = overrides
        if checkConfig {
            print(ConfigSummary.describe(configuration))
            return
        }
        // A client that vanishes mid-reply must cost us an EPIPE, not the process.
        signal(SIGPIPE, SIG_IGN)
        let status: Int32
        do {
            let server = try Server(configuration: configuration)
            status = server.run()
        } catch {
            Logger.writeLine("qnbd: \(error)")
            throw ExitCode(1)
        }
        if status != 0 { throw ExitCode(status) }
    }
}
