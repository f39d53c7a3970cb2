// `qnbd info`: describe an image (and its backing chain) like `qemu-img info`.

import ArgumentParser
import QCow2Tools

struct InfoCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "info",
        abstract: "Show what an image is: format, sizes, qcow2 features, backing file, snapshots.",
        discussion: """
            Examples:
              qnbd info disk.qcow2
              qnbd info --backing-chain --json overlay.qcow2
            The JSON keys are qemu-img info's (virtual-size, actual-size, format-specific, ...).
            """)

    @Argument(help: "The image file.")
    var file: String

    @Flag(name: .long, help: "JSON output (same as --output json).")
    var json = false

    @Option(name: .long, help: "Output format: human or json.")
    var output: String = "human"

    @Flag(name: .long, help: "Describe every image of the backing chain, top first.")
    var backingChain = false

    func validate() throws {
        guard output == "human" || output == "json" else { throw ValidationError("--output must be human or json, not \(output)") }
    }

    func run() throws {
        let infos: [ImageInfo]
        do {
            infos = try ImageInfo.collect(path: file, chain: backingChain)
        } catch {
            Console.fail(error.message)
            throw ExitCode(1)
        }
        if json || output == "json" {
            let value: JSONValue = backingChain ? .array(infos.map(\.json)) : infos[0].json
            Console.out(value.pretty() + "\n")
        } else {
            Console.out(infos.map(\.human).joined(separator: "\n"))
        }
    }
}
