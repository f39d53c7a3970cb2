// `qnbd check`: the qcow2 consistency check (QCow2Check, in the format layer) as a command, with
// qemu-img check's output: the human summary, the JSON ImageCheck object and the exit codes.

import QCow2

/// The outcome of `qnbd check`: the check itself, and after a repair the re-check of the result.
public struct CheckReport: Sendable {
    public var filename: String
    public var format: ImageFormat
    /// The (repairing) check.
    public var first: CheckResult
    /// The re-check after something was repaired (nil when nothing was).
    public var recheck: CheckResult?
    /// Set when the check could not complete; the report then has no summary.
    public var failure: String?
    /// The exit code for a failure: 1, or qemu-img's 63 for a format that has no check.
    public var failureExitCode: Int32 = 1

    /// The result the summary and exit code describe: the re-check when there was one.
    public var final: CheckResult {
        var outcome = CheckOutcome()
        outcome.first = first
        outcome.recheck = recheck
        return outcome.final
    }

    /// qemu-img check's exit codes: 0 clean, 1 check not completed, 2 corruption, 3 leaks only.
    public var exitCode: Int32 {
        if failure != nil { return failureExitCode }
        let r = final
        if r.checkErrors > 0 { return 1 }
        if r.corruptions > 0 { return 2 }
        if r.leaks > 0 { return 3 }
        return 0
    }

    /// Lines for stderr: each finding, then (after a repair) those of the re-check.
    public var diagnostics: [String] {
        var lines = first.messages + (recheck?.messages ?? [])
        if let failure { lines.append(failure) }
        return lines
    }

    /// stdout in qemu-img's human format.
    public var human: String {
        var out = ""
        if recheck != nil {
            out += "The following inconsistencies were found and repaired:\n\n"
            out += "    \(first.leaksFixed) leaked clusters\n    \(first.corruptionsFixed) corruptions\n\n"
            out += "Double checking the fixed image now...\n"
        }
        guard failure == nil else { return out }
        let r = final
        if r.corruptions == 0 && r.leaks == 0 && r.checkErrors == 0 {
            out += "No errors were found on the image.\n"
        } else {
            if r.corruptions > 0 {
                out += "\n\(r.corruptions) errors were found on the image.\n"
                out += "Data may be corrupted, or further writes to the image may corrupt it.\n"
            }
            if r.leaks > 0 {
                out += "\n\(r.leaks) leaked clusters were found on the image.\n"
                out += "This means waste of disk space, but no harm to data.\n"
            }
            if r.checkErrors > 0 {
                out += "\n\(r.checkErrors) internal errors have occurred during the check.\n"
            }
        }
        if r.totalClusters != 0 && r.allocatedClusters != 0 {
            let allocated = Double(r.allocatedClusters)
            out += "\(r.allocatedClusters)/\(r.totalClusters) = "
                + cFormat("%0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
                          allocated * 100 / Double(r.totalClusters), Double(r.fragmentedClusters) * 100 / allocated,
                          Double(r.compressedClusters) * 100 / allocated)
        }
        if r.imageEndOffset != 0 { out += "Image end offset: \(r.imageEndOffset)\n" }
        return out
    }

    /// qemu-img's ImageCheck object; optional members appear only when non-zero, as there.
    public var json: JSONValue {
        let r = final
        var members: [(String, JSONValue)] = [
            ("filename", .string(filename)), ("format", .string(format.rawValue)),
            ("check-errors", .int(Int64(r.checkErrors))),
        ]
        func add(_ key: String, _ value: UInt64) { if value != 0 { members.append((key, .uint(value))) } }
        add("image-end-offset", r.imageEndOffset)
        add("corruptions", UInt64(r.corruptions))
        add("leaks", UInt64(r.leaks))
        add("corruptions-fixed", UInt64(r.corruptionsFixed))
        add("leaks-fixed", UInt64(r.leaksFixed))
        add("total-clusters", r.totalClusters)
        add("allocated-clusters", r.allocatedClusters)
        add("fragmented-clusters", r.fragmentedClusters)
        add("compressed-clusters", r.compressedClusters)
        return .object(members)
    }
}

public enum ImageChecker {
    /// Checks (and with `repair`, repairs) the image at `path`.
    public static func check(path: String, repair: RepairMode?) -> CheckReport {
        let storage: FileStorage
        do {
            storage = try FileStorage(path: path, mode: repair == nil ? .readOnly : .readWrite)
        } catch {
            return CheckReport(filename: path, format: .raw, first: CheckResult(), failure: error.message)
        }
        defer { storage.close() }
        return check(storage: storage, name: path, repair: repair)
    }

    /// Checks an image in any storage (unit tests use memory).
    public static func check(storage: ImageStorage, name: String, repair: RepairMode?) -> CheckReport {
        let format: ImageFormat
        do {
            format = try probeFormat(storage, name: name)
        } catch {
            return CheckReport(filename: name, format: .raw, first: CheckResult(), failure: error.message)
        }
        guard format == .qcow2 else {
            return CheckReport(filename: name, format: format, first: CheckResult(),
                               failure: "this image format (raw) does not support checks", failureExitCode: 63)
        }
        // qemu-img check opens the backing chain with the image and gives up (exit 1) when it cannot;
        // so does serving, so the check does not call such an image clean either.
        if storage is FileStorage, let image = try? ImageMetadata.open(storage, name: name, validate: false),
           let backing = image.header.backingFileName {
            let path = resolveBackingPath(backing, relativeTo: name)
            do {
                try FileStorage(path: path, mode: .readOnly).close()
            } catch {
                return CheckReport(filename: name, format: .qcow2, first: CheckResult(),
                                   failure: "could not open '\(name)': could not open backing file: \(error.message)")
            }
        }
        let outcome = QCow2Check.run(file: StorageFile(storage), name: name, repair: repair)
        var report = CheckReport(filename: name, format: .qcow2, first: outcome.first)
        report.recheck = outcome.recheck
        report.failure = outcome.failure
        return report
    }
}

