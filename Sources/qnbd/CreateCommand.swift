// `qnbd create`: a new qcow2 or raw image, with qemu-img create's options and defaults.

import ArgumentParser
import QCow2Tools

struct CreateCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "create",
        abstract: "Create a qcow2 or raw disk image.",
        discussion: """
            SIZE takes a unit: 10G, 512M, 1.5T, 64KiB (plain numbers are bytes); it is rounded \
            up to whole 512-byte sectors. With --backing it may be left out: the backing file's size.
            Examples:
              qnbd create disk.qcow2 20G
              qnbd create -b base.qcow2 overlay.qcow2
              qnbd create -b base.img -F raw overlay.qcow2 40G
              qnbd create --cluster-size 2M --extended-l2 big.qcow2 1T
              qnbd create -f raw disk.img 4G
            The image passes `qemu-img check`. An existing FILE is kept unless --force is given.
            """)

    @Option(name: [.short, .long], help: "Image format: qcow2 or raw.")
    var format: String = "qcow2"

    @Argument(help: "The image file to create.")
    var file: String

    @Argument(help: "Virtual disk size (optional with --backing: the backing file's size).")
    var size: String?

    @Option(name: .long, help: "qcow2 cluster size, a power of two from 512 to 2M.")
    var clusterSize: String = "64K"

    @Option(name: [.short, .long], help: ArgumentHelp("Backing file (qcow2 only), stored as given; a relative name is relative to FILE's directory.", valueName: "FILE"))
    var backing: String?

    @Option(name: [.customShort("F"), .long], help: "Backing file format: qcow2 or raw (needed unless the backing file is qcow2).")
    var backingFormat: String?

    @Option(name: .long, help: "Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64.")
    var refcountBits: Int = 16

    @Flag(name: .long, help: "Lazy refcounts (compat 1.1 only).")
    var lazyRefcounts = false

    @Flag(name: .long, help: "Extended L2 entries with 32 subclusters (clusters of 16K or more).")
    var extendedL2 = false

    @Option(name: .long, help: "qcow2 version: 3 (or 1.1, the default) or 2 (or 0.10, for very old readers).")
    var compat: String = "1.1"

    @Option(name: .long, help: "off, or metadata: every L2 table and data cluster reserved up front (sparse).")
    var preallocation: String = "off"

    @Option(name: .long, help: "Compression type for compressed clusters: zlib or zstd (compat 1.1 only).")
    var compressionType: String = "zlib"

    @Flag(name: .long, help: "Replace FILE if it exists.")
    var force = false

    @Flag(name: [.short, .long], help: "Do not print the \"Formatting ...\" line.")
    var quiet = false

    func options() throws -> CreateOptions {
        var o = CreateOptions()
        guard let f = ImageFormat(rawValue: format) else { throw ValidationError("--format must be qcow2 or raw, not \(format)") }
        o.format = f
        do {
            o.size = try size.map(SizeParser.parse)
            o.clusterSize = try SizeParser.parse(clusterSize)
        } catch {
            throw ValidationError(error.message)
        }
        switch compat {
        case "2", "0.10": o.version = 2
        case "3", "1.1": o.version = 3
        default: throw ValidationError("--compat must be 2 (0.10) or 3 (1.1), not \(compat)")
        }
        o.refcountBits = refcountBits
        o.lazyRefcounts = lazyRefcounts
        o.extendedL2 = extendedL2
        guard let p = Preallocation(rawValue: preallocation) else {
            throw ValidationError("--preallocation must be off or metadata, not \(preallocation)")
        }
        o.preallocation = p
        switch compressionType {
        case "zlib": o.compressionType = 0
        case "zstd": o.compressionType = 1
        default: throw ValidationError("--compression-type must be zlib or zstd, not \(compressionType)")
        }
        o.backingFile = backing
        if let backingFormat {
            guard let bf = ImageFormat(rawValue: backingFormat) else {
                throw ValidationError("--backing-format must be qcow2 or raw, not \(backingFormat)")
            }
            guard backing != nil else { throw ValidationError("--backing-format needs --backing") }
            o.backingFormat = bf
        }
        if o.size == nil && backing == nil { throw ValidationError("a SIZE is needed (it can only be left out with --backing)") }
        // The combinations qemu-img refuses are usage errors too.
        var check = o
        if check.size == nil { check.size = 0 }
        do { try check.validate() } catch { throw ValidationError(error.message) }
        return o
    }

    func validate() throws {
        _ = try options()
    }

    func run() throws {
        do {
            let summary = try ImageCreator.create(path: file, options: try options(), force: force)
            if !quiet { Console.out(summary.line + "\n") }
        } catch let error as ToolError {
            Console.fail(error.message)
            throw ExitCode(1)
        }
    }
}
