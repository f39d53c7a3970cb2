// `qnbd bitmap`: qemu-img bitmap's operations on persistent dirty bitmaps, applied in the order given.
// The operations are parsed by hand because their order matters (`--add --disable` adds, then
// disables), which flag properties cannot record.

import ArgumentParser
import QCow2Tools

struct BitmapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bitmap",
        abstract: "Add, remove, clear, enable, disable or merge an image's persistent dirty bitmaps.",
        usage: "qnbd bitmap (--add | --remove | --clear | --enable | --disable | --merge SOURCE [-b SOURCE_FILE [-F SOURCE_FMT]])... [-g GRANULARITY] FILE NAME",
        discussion: """
            Like qemu-img bitmap: the operations run in the order given on bitmap NAME of FILE (qcow2).
              --add            create NAME, enabled (-g: granularity, default the cluster size within 4K...64K)
              --remove         delete NAME
              --clear          mark every bit of NAME clean
              --enable         NAME records writes (the "auto" flag)
              --disable        NAME stops recording writes
              --merge SOURCE   set in NAME every bit set in bitmap SOURCE (of SOURCE_FILE with -b)
            Examples:
              qnbd bitmap --add disk.qcow2 backup-1
              qnbd bitmap --add --disable -g 1M disk.qcow2 frozen
              qnbd bitmap --merge backup-1 -b old.qcow2 disk.qcow2 backup-2
            Exit status 0 on success, 1 on any error (qemu-img's). An operation that fails stops the
            rest; what the earlier ones did is kept.
            """)

    @Argument(parsing: .captureForPassthrough, help: "Operations, options, FILE and NAME.")
    var arguments: [String] = []

    func run() throws {
        do {
            let parsed = try Self.parse(arguments)
            try BitmapEditor.run(path: parsed.file, name: parsed.name, operations: parsed.operations,
                                 granularity: parsed.granularity)
        } catch {
            for line in error.message.split(separator: "\n") { Console.fail(String(line)) }
            throw ExitCode(1)
        }
    }

    struct Parsed {
        var operations: [BitmapOperation] = []
        var granularity: UInt64?
        var file = ""
        var name = ""
    }

    static func parse(_ arguments: [String]) throws(ToolError) -> Parsed {
        var parsed = Parsed()
        var positional: [String] = []
        var sourceFile: String?
        var i = 0
        func value(_ flag: String) throws(ToolError) -> String {
            i += 1
            guard i < arguments.count else { throw ToolError("option \(flag) needs a value") }
            return arguments[i]
        }
        var mergeSource: String?
        while i < arguments.count {
            let a = arguments[i]
            switch a {
            case "--add": parsed.operations.append(.add)
            case "--remove": parsed.operations.append(.remove)
            case "--clear": parsed.operations.append(.clear)
            case "--enable": parsed.operations.append(.enable)
            case "--disable": parsed.operations.append(.disable)
            case "--merge":
                mergeSource = try value(a)
                parsed.operations.append(.merge(source: mergeSource!, file: nil))
            case "-g", "--granularity":
                let text = try value(a)
                guard let g = try? SizeParser.parse(text), g > 0 else { throw ToolError("Invalid granularity specified: \(text)") }
                parsed.granularity = g
            case "-b", "--source-file": sourceFile = try value(a)
            case "-F", "--source-format":
                let f = try value(a)
                guard f == "qcow2" else { throw ToolError("source format \(f): only qcow2 images hold bitmaps") }
            case "-f", "--format":
                let f = try value(a)
                guard f == "qcow2" else { throw ToolError("Format driver '\(f)' does not support bitmaps") }
            case "-q", "--quiet": break
            default:
                guard !a.hasPrefix("-") || a == "-" else { throw ToolError("unknown option \(a) (see qnbd bitmap --help)") }
                positional.append(a)
            }
            i += 1
        }
        guard !parsed.operations.isEmpty else {
            throw ToolError("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge")
        }
        if parsed.granularity != nil && !parsed.operations.contains(.add) {
            throw ToolError("granularity only supported with --add")
        }
        if let sourceFile {
            guard mergeSource != nil else { throw ToolError("-b requires --merge") }
            parsed.operations = parsed.operations.map {
                if case .merge(let source, nil) = $0 { return .merge(source: source, file: sourceFile) }
                return $0
            }
        }
        guard positional.count == 2 else { throw ToolError("Expecting filename and bitmap name") }
        parsed.file = positional[0]
        parsed.name = positional[1]
        return parsed
    }
}
