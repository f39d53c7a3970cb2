// `qnbd check`: qcow2 consistency check and repair, with qemu-img check's findings and exit codes.

import ArgumentParser
import QCow2
import QCow2Tools

struct CheckCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "check",
        abstract: "Check a qcow2 image for corruption and leaked clusters (and repair them).",
        discussion: """
            Exit status, as qemu-img check's: 0 no errors, 1 the check could not complete, 2 corruption \
            found, 3 only leaked clusters found.
            --repair leaks lowers refcounts nothing uses; --repair all also raises refcounts that are too low \
            and fixes COPIED flags. Repairs write the image in place: stop anything that has it open first.
            Examples:
              qnbd check disk.qcow2
              qnbd check --repair leaks disk.qcow2
            """)

    @Argument(help: "The qcow2 image.")
    var file: String

    @Option(name: [.short, .long], help: "Repair: leaks or all.")
    var repair: String?

    @Flag(name: .long, help: "JSON output (same as --output json).")
    var json = false

    @Option(name: .long, help: "Output format: human or json.")
    var output: String = "human"

    @Flag(name: [.short, .long], help: "Print only errors.")
    var quiet = false

    func validate() throws {
        if let repair, RepairMode(rawValue: repair) == nil {
            throw ValidationError("--repair must be leaks or all, not \(repair)")
        }
        guard output == "human" || output == "json" else { throw ValidationError("--output must be human or json, not \(output)") }
    }

    func run() throws {
        let report = ImageChecker.check(path: file, repair: repair.flatMap(RepairMode.init(rawValue:)))
        for line in report.diagnostics.dropLast(report.failure == nil ? 0 : 1) { Console.err(line + "\n") }
        if !quiet {
            if json || output == "json" {
                if report.failure == nil { Console.out(report.json.pretty() + "\n") }
            } else {
                Console.out(report.human)
            }
        }
        if let failure = report.failure {
            Console.fail(failure)
        } else if report.exitCode == 1 {
            Console.fail("Check failed")   // qemu-img's last word when internal errors occurred
        }
        throw ExitCode(report.exitCode)
    }
}
