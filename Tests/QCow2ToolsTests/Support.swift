// An in-memory qcow2 image for checker tests: made by the real `create` code path, then given data
// clusters (and damage) by hand, so each test states exactly which bytes are wrong.

import Testing
@testable import QCow2
@testable import QCow2Tools

struct MemoryImage {
    let storage = MemoryStorage()
    let options: CreateOptions
    let layout: CreateLayout

    var cs: UInt64 { layout.clusterSize }

    /// A fresh image (default: 4 KiB clusters, 16-bit refcounts, 1 MiB disk: one L2 table maps it all).
    init(clusterSize: UInt64 = 4096, size: UInt64 = 1 << 20, refcountBits: Int = 16, extendedL2: Bool = false,
         preallocation: Preallocation = .off) throws {
        var o = CreateOptions()
        o.clusterSize = clusterSize
        o.size = size
        o.refcountBits = refcountBits
        o.extendedL2 = extendedL2
        o.preallocation = preallocation
        try o.validate()
        options = o
        layout = try CreateLayout.compute(virtualSize: size, clusterBits: clusterSize.trailingZeroBitCount,
                                          refcountOrder: refcountBits.trailingZeroBitCount, extendedL2: extendedL2,
                                          preallocation: preallocation)
        try ImageCreator.writeQCow2(options: o, layout: layout, to: storage)
    }

    func u64(_ offset: UInt64) -> UInt64 { storage.read(at: offset, count: 8).be64(0) }

    func setU64(_ offset: UInt64, _ value: UInt64) {
        var bytes = [UInt8](repeating: 0, count: 8)
        bytes.setBE64(value, at: 0)
        storage.write(bytes, at: offset)
    }

    /// A new cluster at the end of the file (zeroed), returned by offset.
    func appendCluster() -> UInt64 {
        let end = (storage.length() + cs - 1) / cs * cs
        storage.write([UInt8](repeating: 0, count: Int(cs)), at: end)
        return end
    }

    func refcount(_ cluster: UInt64) -> UInt64 {
        guard let (block, slot) = refcountSlot(cluster) else { return 0 }
        return storage.read(at: block, count: Int(cs)).withUnsafeBytes {
            RefcountEntry.get($0, index: slot, order: options.refcountBits.trailingZeroBitCount)
        }
    }

    /// Clusters without a refcount block keep no refcount (as if their refcount block were lost).
    func setRefcount(_ cluster: UInt64, _ value: UInt64) {
        guard let (block, slot) = refcountSlot(cluster) else { return }
        var bytes = storage.read(at: block, count: Int(cs))
        bytes.withUnsafeMutableBytes {
            RefcountEntry.set($0, index: slot, order: options.refcountBits.trailingZeroBitCount, value: value)
        }
        storage.write(bytes, at: block)
    }

    private func refcountSlot(_ cluster: UInt64) -> (UInt64, Int)? {
        let perBlock = (cs * 8) >> UInt64(options.refcountBits.trailingZeroBitCount)
        let block = u64(layout.reftableOffset + (cluster / perBlock) * 8)
        return block == 0 ? nil : (block, Int(cluster % perBlock))
    }

    /// Where the L2 entry for `guest` lives, creating (and refcounting) the L2 table if needed.
    func l2EntryOffset(_ guest: UInt64) -> UInt64 {
        let entryBytes: UInt64 = options.extendedL2 ? 16 : 8
        let perTable = cs / entryBytes
        let l1Index = guest / (cs * perTable)
        var l2 = u64(layout.l1Offset + l1Index * 8) & L1Entry.offsetMask
        if l2 == 0 {
            l2 = appendCluster()
            setRefcount(l2 / cs, 1)
            setU64(layout.l1Offset + l1Index * 8, l2 | L2Entry.copied)
        }
        return l2 + (guest / cs % perTable) * entryBytes
    }

    /// Gives guest cluster `guest` a fresh data cluster, as a writer would; returns the host offset.
    @discardableResult
    func allocate(_ guest: UInt64) -> UInt64 {
        let entry = l2EntryOffset(guest)
        let host = appendCluster()
        setRefcount(host / cs, 1)
        setU64(entry, host | L2Entry.copied)
        return host
    }

    func check(repair: RepairMode? = nil) -> CheckReport {
        ImageChecker.check(storage: storage, name: "mem.qcow2", repair: repair)
    }
}

/// The findings of a report, without the explanatory notes (lines starting with spaces).
func findings(_ report: CheckReport) -> [String] {
    report.diagnostics.filter { !$0.hasPrefix(" ") }
}
