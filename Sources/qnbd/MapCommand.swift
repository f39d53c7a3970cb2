// `qnbd map`: where every guest byte comes from, like `qemu-img map`.

import ArgumentParser
import QCow2Tools

struct MapCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "map",
        abstract: "Show the image's extents: allocated, zero or from a backing file, and where on the host.",
        discussion: """
            JSON output lists every extent with start, length, depth (0 = this image, 1 = its backing \
            file, ...), present, zero, data and the host offset, exactly as `qemu-img map --output=json`.
            The human format lists only data extents with their host offset and file.
            With --bitmap NAME, the persistent dirty bitmap NAME's dirty and clean runs instead (what
            `nbdinfo --map=qemu:dirty-bitmap:NAME` shows when the image is served with it); JSON:
            [{ "start", "length", "dirty" }, ...].
            """)

    @Argument(help: "The image file.")
    var file: String

    @Option(name: .long, help: "Output format: human or json.")
    var output: String = "human"

    @Flag(name: .long, help: "JSON output (same as --output json).")
    var json = false

    @Option(name: .long, help: ArgumentHelp("Show the dirty and clean runs of persistent bitmap NAME.", valueName: "NAME"))
    var bitmap: String?

    func validate() throws {
        guard output == "human" || output == "json" else { throw ValidationError("--output must be human or json, not \(output)") }
    }

    func run() throws {
        do {
            if let bitmap {
                let runs = try BitmapMap.runs(path: file, name: bitmap)
                Console.out(json || output == "json" ? BitmapMap.json(runs) : BitmapMap.human(runs))
                return
            }
            let entries = try ImageChain(path: file).map()
            if json || output == "json" {
                Console.out(MapFormatter.json(entries))
            } else {
                try MapFormatter.human(entries) { Console.out($0) }
            }
        } catch {
            Console.fail(error.message)
            throw ExitCode(1)
        }
    }
}
