// The `qnbd` command: parses arguments and hands a configuration to the server. No callbacks are
// formed here, so nothing libuv calls can inherit main-actor isolation (see research/swift-libuv.md).

import ArgumentParser
import NBDServer
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
        subcommands: [Serve.self, CreateCommand.self, InfoCommand.self, CheckCommand.self, MapCommand.self],
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
        abstract: "Serve a disk image over NBD.",
        discussion: """
            Examples:
              qnbd serve disk.img                         TCP port 10809 on every address
              qnbd serve --socket /run/disk.sock disk.img  a unix socket
              qnbd serve -r --bind 127.0.0.1 -p 10810 disk.img

            Attach with: nbdinfo nbd://HOST:PORT   qemu-img info nbd://HOST:PORT
                         nbd-client HOST PORT /dev/nbd0 -N ''
            SIGINT or SIGTERM stops the server cleanly: in-flight requests finish and the image is flushed.
            """)

    @Argument(help: "The image file or block device to serve.")
    var image: String

    @Option(name: .long, help: ArgumentHelp("Listen on a unix socket at PATH instead of TCP.", valueName: "PATH"))
    var socket: String?

    @Option(name: .long, help: ArgumentHelp("TCP address to listen on (repeatable; default: every address).", valueName: "ADDR"))
    var bind: [String] = []

    @Option(name: [.short, .long], help: "TCP port (0 picks a free one).")
    var port: Int = 10809

    @Option(name: [.customShort("x"), .long], help: "Export name clients ask for.")
    var exportName: String = ""

    @Option(name: [.customShort("D"), .long], help: "Export description shown by nbdinfo and nbd-client -l.")
    var description: String = ""

    @Flag(name: [.short, .long], help: "Refuse writes.")
    var readOnly = false

    @Option(name: [.short, .long], help: "Image format: raw or qcow2 (default: detected from the image).")
    var format: String?

    @Option(name: .long, help: "Most clients served at once; more are turned away.")
    var maxConnections: Int = 128

    @Option(name: .long, help: ArgumentHelp("Write the process id to PATH once listening.", valueName: "PATH"))
    var pidFile: String?

    @Option(name: .long, help: "Threads for file I/O that cannot be served from the page cache.")
    var threads: Int = 16

    @Option(name: .long, help: ArgumentHelp(
        "qcow2 metadata cache in bytes (suffixes K, M, G); default: enough for the whole disk, at most 64M.",
        valueName: "SIZE"))
    var cacheSize: String?

    @Option(name: .long, help: "Seconds a client has to finish the handshake.")
    var handshakeTimeout: Int = 10

    @Option(name: .long, help: ArgumentHelp(
        "Close a connection whose replies the client has not read for SECONDS (0: never).", valueName: "SECONDS"))
    var sendTimeout: Int = 30

    @Flag(name: .shortAndLong, help: "More logging (repeat for more).")
    var verbose: Int

    func validate() throws {
        if socket != nil && !bind.isEmpty { throw ValidationError("--socket and --bind cannot be combined") }
        if !(0...65535).contains(port) { throw ValidationError("--port must be between 0 and 65535") }
        if maxConnections < 1 { throw ValidationError("--max-connections must be at least 1") }
        if !(1...1024).contains(threads) { throw ValidationError("--threads must be between 1 and 1024") }
        if handshakeTimeout < 1 { throw ValidationError("--handshake-timeout must be at least 1 second") }
        if !(0...86_400).contains(sendTimeout) { throw ValidationError("--send-timeout must be between 0 and 86400 seconds") }
        if let cacheSize, Self.parseSize(cacheSize) == nil {
            throw ValidationError("--cache-size must be a size such as 1M or 262144, not \(cacheSize)")
        }
        if let format, ServerConfiguration.ImageFormat(rawValue: format) == nil {
            throw ValidationError("--format must be raw or qcow2, not \(format)")
        }
    }

    /// "64M", "512k", "1G" or plain bytes; binary multiples.
    static func parseSize(_ text: String) -> Int? {
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

    func run() throws {
        var configuration = ServerConfiguration(imagePath: image)
        configuration.format = format.flatMap(ServerConfiguration.ImageFormat.init(rawValue:))
        configuration.exportName = exportName
        configuration.description = description
        configuration.readOnly = readOnly
        if let socket {
            configuration.listen = [.unix(path: socket)]
        } else {
            configuration.listen = (bind.isEmpty ? ["::"] : bind).map { .tcp(host: $0, port: port) }
        }
        configuration.maximumConnections = maxConnections
        configuration.pidFile = pidFile
        configuration.threadPoolSize = threads
        configuration.cacheBytes = cacheSize.flatMap(Self.parseSize)
        configuration.connectionLimits.handshakeTimeoutMilliseconds = UInt64(handshakeTimeout) * 1000
        configuration.connectionLimits.sendTimeoutMilliseconds = UInt64(sendTimeout) * 1000
        configuration.logLevel = [.info, .debug, .trace][min(verbose, 2)]
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
