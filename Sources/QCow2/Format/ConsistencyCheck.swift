// The qcow2 consistency check and repair, classified and counted the way `qemu-img check` does it
// (block/qcow2-refcount.c, qcow2_check_refcounts), so that `qnbd check`, the repair of a dirty image
// before serving, and qemu agree on every image: every reference the image makes (header, L1 and L2
// tables of the active image and of every snapshot, data and compressed clusters, the snapshot table,
// the refcount table and blocks, bitmaps) is counted per host cluster and compared with the stored
// refcount. Stored < counted is corruption (the cluster could be handed out again while in use);
// stored > counted is a leak (wasted space, no harm). Entries are classified by L2Entry.clusterType,
// the same decoding serving uses.
//
// Repair raises or lowers refcounts in place. What would need a rebuilt refcount structure (a refcount
// block that is misplaced, shared or unreadable) is refused: writing a new structure safely is
// `qemu-img check -r all`'s job. All I/O goes through a MetadataFile.

public enum RepairMode: String, Sendable, CaseIterable {
    case leaks
    case all

    /// Both modes lower refcounts that are too high; only `all` raises those that are too low.
    public var fixesLeaks: Bool { true }
    public var fixesErrors: Bool { self == .all }
}

/// qemu's BdrvCheckResult, plus the messages the check printed.
public struct CheckResult: Equatable, Sendable {
    public var corruptions = 0
    public var leaks = 0
    public var checkErrors = 0
    public var corruptionsFixed = 0
    public var leaksFixed = 0
    public var imageEndOffset: UInt64 = 0
    public var totalClusters: UInt64 = 0
    public var allocatedClusters: UInt64 = 0
    public var fragmentedClusters: UInt64 = 0
    public var compressedClusters: UInt64 = 0
    /// One line per finding, as qemu prints them to stderr ("ERROR cluster 5 refcount=0 reference=1").
    public var messages: [String] = []

    public init() {}
}

/// What one `check` (and, after a repair, its re-check) found.
public struct CheckOutcome: Sendable {
    /// The (repairing) check.
    public var first = CheckResult()
    /// The re-check after something was repaired (nil when nothing was).
    public var recheck: CheckResult?
    /// Set when the check could not complete.
    public var failure: String?

    public init() {}

    /// The result a summary describes: the re-check when there was one, with the repair's counts.
    public var final: CheckResult {
        guard var r = recheck else { return first }
        r.corruptionsFixed = first.corruptionsFixed
        r.leaksFixed = first.leaksFixed
        return r
    }
}

public enum QCow2Check {
    /// Checks (and with `repair`, repairs) the qcow2 image in `file`; `name` words the refusal of an
    /// image qemu would not open.
    public static func run(file: MetadataFile, name: String, repair: RepairMode?) -> CheckOutcome {
        var outcome = CheckOutcome()
        do {
            outcome.first = try RefcountCheck(file: file, repair: repair).run()
            if repair != nil, outcome.first.corruptionsFixed > 0 || outcome.first.leaksFixed > 0 {
                outcome.recheck = try RefcountCheck(file: file, repair: nil).run()
            }
        } catch let error as CheckAborted {
            outcome.first = error.partial
            outcome.failure = "check failed: \(error.reason)"
        } catch let error as QCow2Error {
            outcome.failure = "could not open '\(name)': \(error.text)"
        } catch {
            outcome.failure = "\(error)"
        }
        return outcome
    }
}
