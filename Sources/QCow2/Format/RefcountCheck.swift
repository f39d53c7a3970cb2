// One run of the consistency check (QCow2Check) over one image: qemu's qcow2_check_refcounts step by
// step. References are counted per host cluster from every structure, compared with the stored
// refcounts, and with a repair mode the refcounts, COPIED flags and misaligned preallocated entries are
// fixed in place, each write synced before the next structure depends on it.

/// Raised when the check cannot go on (qemu's negative return from qcow2_check_refcounts).
struct CheckAborted: Error {
    var partial: CheckResult
    var reason: String
}

/// One run of the check over one image.
final class RefcountCheck {
    let file: MetadataFile
    let image: ImageMetadata
    let repair: RepairMode?
    let cs: UInt64
    let fileLength: UInt64
    var result = CheckResult()
    /// References counted per host cluster (qemu's in-memory refcount table), saturating at the
    /// refcount width's maximum like qemu's.
    var references: [UInt64]
    /// Clusters holding metadata, and what: to name the structures involved when a cluster is shared.
    var owners: [UInt64: [String]] = [:]
    /// The refcount structure itself is broken (qemu would rebuild it).
    var rebuild = false
    var rebuildReasons: [String] = []
    var snapshots: [Snapshot] = []
    var snapshotTableSize: UInt64 = 0

    init(file: MetadataFile, repair: RepairMode?) throws(QCow2Error) {
        self.file = file
        image = try ImageMetadata(file: file)
        self.repair = repair
        cs = image.clusterSize
        fileLength = image.fileLength
        references = [UInt64](repeating: 0, count: Int((fileLength + cs - 1) / cs))
        try openChecks()
    }

    /// qemu refuses to open such images, so the check does not start on them either.
    private func openChecks() throws(QCow2Error) {
        try image.header.validateOpenable()
        let table = try image.snapshots()
        snapshots = table.entries
        snapshotTableSize = table.byteCount
    }

    func run() throws(CheckAborted) -> CheckResult {
        do {
            return try runChecked()
        } catch let error as CheckAborted {
            throw error
        } catch {
            result.checkErrors += 1
            throw CheckAborted(partial: result, reason: (error as? QCow2Error)?.text ?? "\(error)")
        }
    }

    private func runChecked() throws -> CheckResult {
        let h = image.header
        result.totalClusters = ((h.size & ~511) + cs - 1) / cs
        try calculateReferences()
        let beforeCompare = result
        var highest: UInt64 = 0
        try compare(highest: &highest)
        if let repair {
            if rebuild && !canRepairInPlace(mode: repair) {
                result.messages.append("ERROR need to rebuild refcount structures")
                for reason in rebuildReasons.prefix(5) { result.messages.append("  (\(reason))") }
                if rebuildReasons.count > 5 { result.messages.append("  (and \(rebuildReasons.count - 5) more)") }
                if repair.fixesErrors {
                    result.messages.append("qnbd does not rebuild refcount structures; `qemu-img check -r all` can")
                }
                result.checkErrors += 1
                throw CheckAborted(partial: result, reason: "Input/output error")
            }
            if result.leaks > 0 || result.corruptions > 0 {
                let messages = result.messages
                result = beforeCompare
                result.messages = messages
                try compareAndRepair(mode: repair, highest: &highest)
            }
        }
        try checkCopiedFlags()
        result.imageEndOffset = (highest + 1) * cs
        if repair != nil && result.checkErrors == 0 && result.corruptions == 0 {
            try markCleanAndConsistent()
        }
        return result
    }

    // MARK: - Counting references

    private func corruption(_ message: String) {
        result.corruptions += 1
        result.messages.append(message)
    }

    /// qcow2_inc_refcounts_imrt: one more reference on every cluster of `offset ..< offset + size`.
    func addReferences(_ offset: UInt64, _ size: UInt64, owner: String? = nil) {
        guard size > 0 else { return }
        // A table may end inside the (partly written) last cluster, but not a whole cluster past EOF.
        let (end, overflow) = offset.addingReportingOverflow(size)
        if overflow || end >= fileLength + cs {
            corruption("ERROR: counting reference for region exceeding the end of the file by one cluster or more: "
                       + "offset 0x\(hex(offset, .bare)) size 0x\(hex(size, .bare))")
            return
        }
        let maximum = image.geometry.refcountMaximum
        for cluster in (offset / cs)...((end - 1) / cs) {
            let k = Int(cluster)
            if k >= references.count { references += [UInt64](repeating: 0, count: k + 1 - references.count) }
            if references[k] == maximum {
                corruption("ERROR: overflow cluster offset=0x\(hex(cluster * cs, .bare))")
                result.messages.append("Use qemu-img amend to increase the refcount entry width or qemu-img convert "
                                       + "to create a clean copy if the image cannot be opened for writing")
                continue
            }
            references[k] += 1
            if let owner { owners[cluster, default: []].append(owner) }
        }
    }

    /// calculate_refcounts.
    private func calculateReferences() throws {
        let h = image.header
        addReferences(0, cs, owner: "header")
        try checkL1(offset: h.l1TableOffset, size: h.l1Size, active: true, label: "active")
        for snapshot in snapshots {
            let label = "snapshot \(snapshot.id) (\(snapshot.name))"
            if snapshot.l1TableOffset % cs != 0 {
                corruption("ERROR snapshot \(snapshot.id) (\(snapshot.name)) l1_offset=\(hex(snapshot.l1TableOffset, .alternate)): "
                           + "L1 table is not cluster aligned; snapshot table entry corrupted")
                continue
            }
            if UInt64(snapshot.l1Size) > QCow2Limits.l1Bytes / 8 {
                corruption("ERROR snapshot \(snapshot.id) (\(snapshot.name)) l1_size=\(hex(UInt64(snapshot.l1Size), .alternate)): "
                           + "L1 table is too large; snapshot table entry corrupted")
                continue
            }
            try checkL1(offset: snapshot.l1TableOffset, size: snapshot.l1Size, active: false, label: label)
        }
        addReferences(h.snapshotsOffset, snapshotTableSize, owner: "snapshot table")
        addReferences(h.refcountTableOffset, UInt64(image.reftableEntries) * 8, owner: "refcount table")
        try countBitmaps()
        try checkRefblocks()
    }

    /// check_refcounts_l1: the table, its L2 tables and everything they map.
    private func checkL1(offset: UInt64, size: UInt32, active: Bool, label: String) throws {
        guard size > 0 else { return }
        addReferences(offset, UInt64(size) * 8, owner: "\(label) L1 table")
        let table = try image.readWords(at: offset, count: Int(size))
        for (i, entry) in table.enumerated() where entry != 0 {
            if entry & L1Entry.reserved != 0 {
                corruption("ERROR found L1 entry with reserved bits set: \(hex(entry, .bare))")
            }
            let l2 = entry & L1Entry.offsetMask
            addReferences(l2, cs, owner: "\(label) L2 table (L1 index \(i))")
            if l2 % cs != 0 {
                corruption("ERROR l2_offset=\(hex(l2, .bare)): Table is not cluster aligned; L1 entry corrupted")
            }
            try checkL2(offset: l2, fragmentation: active)
        }
    }

    /// check_refcounts_l2.
    private func checkL2(offset: UInt64, fragmentation: Bool) throws {
        let words = try image.l2Table(at: offset)
        let extended = image.geometry.extendedL2
        let step = extended ? 2 : 1
        var nextContiguous: UInt64 = 0
        for i in 0..<image.geometry.l2Entries {
            var entry = words[i * step]
            let bitmap = extended ? words[i * step + 1] : 0
            let type = image.clusterType(entry)
            if type != .compressed && entry & L2Entry.standardReserved != 0 {
                corruption("ERROR found l2 entry with reserved bits set: \(hex(entry, .bare))")
            }
            switch type {
            case .compressed:
                if entry & L2Entry.copied != 0 {
                    let offsetBits = UInt64(image.geometry.compressedOffsetBits)
                    corruption("ERROR: coffset=0x\(hex(entry & ((1 << offsetBits) - 1), .bare)): "
                               + "copied flag must never be set for compressed clusters")
                    entry &= ~L2Entry.copied
                }
                if bitmap != 0 {
                    corruption("ERROR compressed cluster \(i) with non-zero subcluster allocation bitmap, entry=0x\(hex(entry, .bare))")
                    continue
                }
                let range = L2Entry.compressedExtent(entry, geometry: image.geometry)
                addReferences(range.host, range.byteCount)
                if fragmentation {
                    result.allocatedClusters += 1
                    result.compressedClusters += 1
                    // Compressed clusters share sectors, so qemu counts every one as fragmented.
                    result.fragmentedClusters += 1
                }
            case .zeroAllocated, .normal:
                let host = entry & L2Entry.offsetMask
                if (bitmap >> 32) & bitmap != 0 {
                    corruption("ERROR offset=\(hex(host, .bare)): Allocated cluster has corrupted subcluster allocation bitmap")
                }
                if host % cs != 0 {
                    result.corruptions += 1
                    let containsData = extended ? bitmap & L2Entry.allAllocated != 0
                                                : entry & L2Entry.zeroFlag == 0
                    if !containsData {
                        let fixing = repair?.fixesErrors ?? false
                        result.messages.append("\(fixing ? "Repairing" : "ERROR") offset=\(hex(host, .bare)): "
                                               + "Preallocated cluster is not properly aligned; L2 entry corrupted.")
                        if fixing, try zeroL2Entry(table: offset, index: i, bitmap: bitmap) {
                            result.corruptions -= 1
                            result.corruptionsFixed += 1
                            continue
                        }
                    } else {
                        result.messages.append("ERROR offset=\(hex(host, .bare)): Data cluster is not properly aligned; "
                                               + "L2 entry corrupted.")
                    }
                }
                if fragmentation {
                    result.allocatedClusters += 1
                    if nextContiguous != 0 && host != nextContiguous { result.fragmentedClusters += 1 }
                    nextContiguous = host + cs
                }
                addReferences(host, cs)
            case .zeroPlain:
                break
            case .unallocated:
                if bitmap & L2Entry.allAllocated != 0 {
                    corruption("ERROR: Unallocated cluster has non-zero subcluster allocation map")
                }
            }
        }
    }

    /// fix_l2_entry_by_zero: a preallocated cluster with a misaligned offset becomes a zero cluster.
    private func zeroL2Entry(table: UInt64, index: Int, bitmap: UInt64) throws -> Bool {
        let extended = image.geometry.extendedL2
        let entryOffset = table + UInt64(index) * UInt64(image.geometry.l2EntryBytes)
        if let hit = metadataOverlap(table, cs, ignoringL2: true) {
            result.messages.append("ERROR: Overlap check failed (the L2 table overlaps the \(hit))")
            result.checkErrors += 1
            return false
        }
        var bytes = [UInt8](repeating: 0, count: image.geometry.l2EntryBytes)
        if extended {
            // Allocated subclusters become zero ones; the cluster itself becomes unallocated.
            let zeroBits = (bitmap | bitmap << 32) & 0xffff_ffff_0000_0000
            bytes.setBE64(zeroBits, at: 8)
        } else {
            bytes.setBE64(L2Entry.zeroFlag, at: 0)
        }
        try file.write(bytes, at: entryOffset)
        try file.sync()
        return true
    }

    /// qcow2_check_bitmaps_refcounts: the directory, each bitmap table and its data clusters.
    private func countBitmaps() throws {
        guard let directory = try image.bitmapDirectory() else { return }
        addReferences(directory.offset, directory.byteCount, owner: "bitmap directory")
        let bitmaps: [BitmapEntry]
        do {
            bitmaps = try BitmapValidation.load(header: image.header, fileSize: image.fileLength,
                                                read: image.loader.read, withinFile: false)
        } catch {
            result.corruptions += 1
            throw CheckAborted(partial: result, reason: error.text)
        }
        for bitmap in bitmaps {
            addReferences(bitmap.tableOffset, UInt64(bitmap.tableSize) * 8, owner: "bitmap table (\(bitmap.name))")
            let table = try image.readWords(at: bitmap.tableOffset, count: Int(bitmap.tableSize))
            for entry in table {
                let offset = entry & BitmapTableEntry.offsetMask
                if entry & BitmapTableEntry.reserved != 0 || (offset != 0 && (entry & 1 != 0 || offset % cs != 0)) {
                    // qemu fails the open (a consistent bitmap's table is loaded then) or the check (an
                    // in-use one's): exit 1 either way, no counts.
                    result.corruptions += 1
                    throw CheckAborted(partial: result, reason: QCow2Error("bitmap '\(bitmap.name)'",
                        "table entry \(hex(entry)) is invalid").text)
                }
                if offset != 0 { addReferences(offset, cs) }
            }
        }
    }

    /// check_refblocks: each refcount block is aligned, inside the file and referenced exactly once.
    private func checkRefblocks() throws {
        let table = try image.reftable()
        for (i, raw) in table.enumerated() {
            let offset = raw & RefcountTableEntry.offsetMask
            let cluster = offset / cs
            if raw & RefcountTableEntry.reserved != 0 {
                corruption("ERROR refcount table entry \(i) has reserved bits set")
                needRebuild("refcount table entry \(i) has reserved bits set")
                continue
            }
            if offset % cs != 0 {
                corruption("ERROR refcount block \(i) is not cluster aligned; refcount table entry corrupted")
                needRebuild("refcount block \(i) is not cluster aligned")
                continue
            }
            if cluster >= UInt64(references.count) {
                corruption("ERROR refcount block \(i) is outside image")
                needRebuild("refcount block \(i) is outside the image")
                continue
            }
            if offset != 0 {
                addReferences(offset, cs, owner: "refcount block \(i)")
                if references[Int(cluster)] != 1 {
                    corruption("ERROR refcount block \(i) refcount=\(references[Int(cluster)])")
                    needRebuild("refcount block \(i) is referenced \(references[Int(cluster)]) times")
                }
            }
        }
    }

    private func needRebuild(_ reason: String) {
        rebuild = true
        rebuildReasons.append(reason)
    }

    // MARK: - Comparing with the stored refcounts

    /// compare_refcounts without repair: reports every mismatch. Walks one refcount block at a time
    /// (a multi-terabyte image has tens of millions of clusters).
    private func compare(highest: inout UInt64) throws {
        highest = 0
        let table = try image.reftable()
        let bits = UInt64(image.geometry.refblockBits)
        let order = image.geometry.refcountOrder
        var first = 0
        while first < references.count {
            let index = Int(UInt64(first) >> bits)
            let end = min(references.count, (index + 1) << Int(bits))
            let offset = index < table.count ? table[index] & RefcountTableEntry.offsetMask : 0
            if offset % cs != 0 {
                // qemu cannot load a misaligned refcount block: every lookup in its range fails.
                for i in first..<end {
                    result.messages.append("Can't get refcount for cluster \(i): Input/output error")
                    result.checkErrors += 1
                }
                first = end
                continue
            }
            let block = offset == 0 ? [UInt8](repeating: 0, count: Int(cs)) : try image.refblock(at: offset)
            block.withUnsafeBytes { buffer in
                for i in first..<end {
                    let stored = RefcountEntry.get(buffer, index: i - (index << Int(bits)), order: order)
                    let counted = references[i]
                    if stored > 0 || counted > 0 { highest = UInt64(i) }
                    guard stored != counted else { continue }
                    if stored == 0 { needRebuild("cluster \(i) is in use but has refcount 0") }
                    let kind = stored < counted ? "ERROR" : "Leaked"
                    result.messages.append("\(kind) cluster \(i) refcount=\(stored) reference=\(counted)")
                    if stored < counted { result.corruptions += 1 } else { result.leaks += 1 }
                    noteSharedMetadata(UInt64(i), counted: counted)
                }
            }
            first = end
        }
    }

    /// Names the structures sharing a metadata cluster (an overlap), so the operator sees what collides.
    private func noteSharedMetadata(_ cluster: UInt64, counted: UInt64) {
        guard counted > 1, let names = owners[cluster] else { return }
        var parts = names
        if counted > UInt64(names.count) { parts.append("\(counted - UInt64(names.count)) data reference(s)") }
        result.messages.append("  cluster \(cluster) is used by: " + parts.joined(separator: ", "))
    }

    /// Whether every reason to rebuild is a zero refcount that can be raised in place: the refcount block
    /// exists, or is missing but can be placed at the end of the file inside the range it describes.
    private func canRepairInPlace(mode: RepairMode) -> Bool {
        guard mode.fixesErrors else { return false }
        return rebuildReasons.allSatisfy { $0.hasSuffix("has refcount 0") } && missingRefblocksPlaceable() != nil
    }

    /// The refcount table indexes with references but no refcount block, when each can be placed
    /// safely; nil when one cannot (it would need a bigger refcount table, or the end of the file lies
    /// outside its range).
    private func missingRefblocksPlaceable() -> [Int]? {
        guard let table = try? image.reftable() else { return nil }
        let bits = UInt64(image.geometry.refblockBits)
        var missing: [Int] = []
        for (i, count) in references.enumerated() where count > 0 {
            let index = Int(UInt64(i) >> bits)
            if index >= table.count { return nil }
            if table[index] == 0 && missing.last != index { missing.append(index) }
        }
        guard missing.count <= 1 else { return nil }
        if let index = missing.first {
            let endCluster = max(UInt64(references.count), (fileLength + cs - 1) / cs)
            guard Int(endCluster >> bits) == index else { return nil }
        }
        return missing
    }

    /// compare_refcounts with repair: sets each fixable refcount to the counted references.
    private func compareAndRepair(mode: RepairMode, highest: inout UInt64) throws {
        let order = image.geometry.refcountOrder
        let bits = UInt64(image.geometry.refblockBits)
        var table = try image.reftable()
        // A missing refcount block (only ever at the end of the file, see missingRefblocksPlaceable)
        // is created in place first: written and synced before the refcount table points at it.
        var newBlocks: [Int: (offset: UInt64, bytes: [UInt8])] = [:]
        if mode.fixesErrors, let missing = missingRefblocksPlaceable(), let index = missing.first {
            let cluster = max(UInt64(references.count), (fileLength + cs - 1) / cs)
            var bytes = [UInt8](repeating: 0, count: Int(cs))
            let first = UInt64(index) << bits
            bytes.withUnsafeMutableBytes { buffer in
                RefcountEntry.set(buffer, index: Int(cluster - first), order: order, value: 1)
            }
            newBlocks[index] = (cluster * cs, bytes)
        }
        highest = 0
        var first = 0
        while first < references.count {
            // One refcount block at a time: its stored values, corrected in memory, written back if changed.
            let index = Int(UInt64(first) >> bits)
            let end = min(references.count, (index + 1) << Int(bits))
            let offset = index < table.count ? table[index] & RefcountTableEntry.offsetMask : 0
            var block = offset != 0 ? try image.refblock(at: offset) : newBlocks[index]?.bytes
            var changed = false
            for i in first..<end {
                let slot = i - (index << Int(bits))
                let counted = references[i]
                let stored = block?.withUnsafeBytes { RefcountEntry.get($0, index: slot, order: order) } ?? 0
                if stored > 0 || counted > 0 { highest = UInt64(i) }
                guard stored != counted else { continue }
                let fixable = block != nil && (stored > counted ? mode.fixesLeaks : mode.fixesErrors)
                let kind = fixable ? "Repairing" : stored < counted ? "ERROR" : "Leaked"
                result.messages.append("\(kind) cluster \(i) refcount=\(stored) reference=\(counted)")
                if fixable {
                    block!.withUnsafeMutableBytes { RefcountEntry.set($0, index: slot, order: order, value: counted) }
                    changed = true
                    if stored > counted { result.leaksFixed += 1 } else { result.corruptionsFixed += 1 }
                } else if stored < counted {
                    result.corruptions += 1
                } else {
                    result.leaks += 1
                }
            }
            if offset != 0 {
                if changed, let block { try file.write(block, at: offset) }
            } else if let block {
                newBlocks[index]!.bytes = block
            }
            first = end
        }
        try file.sync()
        // New refcount blocks: the block is durable before the table entry that makes it visible.
        for (index, block) in newBlocks.sorted(by: { $0.key < $1.key }) {
            try file.write(block.bytes, at: block.offset)
            try file.sync()
            var entry = [UInt8](repeating: 0, count: 8)
            entry.setBE64(block.offset, at: 0)
            try file.write(entry, at: image.header.refcountTableOffset + UInt64(index) * 8)
            try file.sync()
            table[index] = block.offset
            highest = max(highest, block.offset / cs)
        }
        image.forgetRefcounts()
    }

    // MARK: - COPIED flags

    /// check_oflag_copied: COPIED must be set exactly where the refcount is 1 (active image only).
    private func checkCopiedFlags() throws {
        let fixErrors = repair?.fixesErrors ?? false
        // With -r leaks only, qemu fixes the flags only once the refcounts are known to be right.
        let fix = fixErrors || (repair != nil && result.checkErrors == 0 && result.corruptions == 0 && result.leaks == 0)
        let h = image.header
        var l1 = try image.l1Table()
        let extended = image.geometry.extendedL2
        let step = extended ? 2 : 1
        for i in 0..<l1.count {
            let l1Entry = l1[i]
            let l2 = l1Entry & L1Entry.offsetMask
            guard l2 != 0 else { continue }
            if let refcount = try image.refcount(ofCluster: l2 / cs),
               (refcount == 1) != (l1Entry & L2Entry.copied != 0) {
                result.corruptions += 1
                result.messages.append("\(fix ? "Repairing" : "ERROR") OFLAG_COPIED L2 cluster: l1_index=\(i) "
                                       + "l1_entry=\(hex(l1Entry, .bare)) refcount=\(refcount)")
                if fix {
                    l1[i] = refcount == 1 ? l1Entry | L2Entry.copied : l1Entry & ~L2Entry.copied
                    var bytes = [UInt8](repeating: 0, count: 8)
                    bytes.setBE64(l1[i], at: 0)
                    try file.write(bytes, at: h.l1TableOffset + UInt64(i) * 8)
                    try file.sync()
                    result.corruptions -= 1
                    result.corruptionsFixed += 1
                }
            }
            var words = try image.l2Table(at: l2)
            var changes = 0
            for j in 0..<image.geometry.l2Entries {
                let entry = words[j * step]
                let type = image.clusterType(entry)
                guard type == .normal || type == .zeroAllocated else { continue }
                guard let refcount = try image.refcount(ofCluster: (entry & L2Entry.offsetMask) / cs) else { continue }
                if (refcount == 1) != (entry & L2Entry.copied != 0) {
                    result.corruptions += 1
                    result.messages.append("\(fix ? "Repairing" : "ERROR") OFLAG_COPIED data cluster: "
                                           + "l2_entry=\(hex(entry, .bare)) refcount=\(refcount)")
                    if fix {
                        words[j * step] = refcount == 1 ? entry | L2Entry.copied : entry & ~L2Entry.copied
                        changes += 1
                    }
                }
            }
            if changes > 0 {
                if let hit = metadataOverlap(l2, cs, ignoringL2: true) {
                    result.messages.append("ERROR: Could not write L2 table; metadata overlap check failed "
                                           + "(it overlaps the \(hit))")
                    result.checkErrors += 1
                    throw CheckAborted(partial: result, reason: "Input/output error")
                }
                var bytes = [UInt8](repeating: 0, count: Int(cs))
                for (k, word) in words.enumerated() { bytes.setBE64(word, at: k * 8) }
                try file.write(bytes, at: l2)
                try file.sync()
                result.corruptions -= changes
                result.corruptionsFixed += changes
            }
        }
    }

    /// The metadata structure `offset ..< offset + size` overlaps, if any (qemu's overlap check before a
    /// repair writes a table). L2 tables are not compared with each other.
    private func metadataOverlap(_ offset: UInt64, _ size: UInt64, ignoringL2: Bool) -> String? {
        let h = image.header
        let range = offset..<(offset + size)
        func hits(_ start: UInt64, _ length: UInt64) -> Bool {
            length > 0 && range.overlaps(start..<(start + length))
        }
        if offset < cs { return "qcow2 header" }
        if hits(h.l1TableOffset, UInt64(h.l1Size) * 8) { return "active L1 table" }
        if hits(h.refcountTableOffset, UInt64(image.reftableEntries) * 8) { return "refcount table" }
        if hits(h.snapshotsOffset, snapshotTableSize) { return "snapshot table" }
        for snapshot in snapshots where hits(snapshot.l1TableOffset, UInt64(snapshot.l1Size) * 8) {
            return "inactive L1 table"
        }
        if let table = try? image.reftable() {
            for raw in table where raw & RefcountTableEntry.offsetMask != 0 {
                if hits(raw & RefcountTableEntry.offsetMask, cs) { return "refcount block" }
            }
        }
        return nil
    }

    // MARK: - Header bits

    /// qcow2_mark_clean + qcow2_mark_consistent: after a repair that left no corruption, the dirty and
    /// corrupt bits no longer apply.
    private func markCleanAndConsistent() throws {
        let h = image.header
        guard h.version >= 3 else { return }
        let cleared = h.incompatibleFeatures & ~(FeatureBit.dirty | FeatureBit.corrupt)
        guard cleared != h.incompatibleFeatures else { return }
        try file.sync()   // the repaired metadata is durable before the header says it is sound
        var bytes = [UInt8](repeating: 0, count: 8)
        bytes.setBE64(cleared, at: 0)
        try file.write(bytes, at: Header.incompatibleFeaturesOffset)
        try file.sync()
    }
}

