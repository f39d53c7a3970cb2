// libFuzzer harness for persistent dirty bitmaps (Sources/QCow2/Format/Bitmap*, Engine/LiveBitmap),
// compiled into one module with Sources/QCow2 by scripts/fuzz/run.
//
// Input: an image file followed by `scriptBytes` of script. The harness does what QCow2Driver does
// with a writable image that has a bitmaps extension (QCow2Driver+Bitmaps.swift): header, validate,
// refcounts and the engine's open (so only images the driver would serve go on); the directory and
// every table validated (BitmapValidation.load), each consistent bitmap's bits read into a LiveBitmap
// (the mode byte's bit 7 first calls one of the first 128 clusters free in the refcounts);
// the directory rewritten in place with in_use set; eight ranges marked the way writes, zeroes and
// trims mark them; then the store at a clean close (BitmapStore.store through an ImageMetadata) into
// an in-memory file.
//
// Besides crashes, the harness traps (fatalError "invariant: ...") when:
//   - BitmapReader's runs and LiveBitmap's runs of the loaded bits differ, or the loaded bits do not
//     survive LiveBitmap's byte round trip;
//   - the in-place in_use rewrite changes the directory's size;
//   - the marked bits are not the loaded bits plus every granule a marked range touches;
//   - a store write lands anywhere but cluster 0 (the header, unchanged but for its extensions and
//     autoclear bits), a refcount table entry, a refcount block, or a cluster that was free before the
//     store and holds no metadata (header, L1, L2, refcount table or blocks, snapshot table or L1s,
//     the bitmap directory, tables and data);
//   - cluster 0 is rewritten before every new structure and its refcounts are synced, or anything but
//     a refcount block is written after it;
//   - after a successful store, the image does not load (BitmapValidation), lists other bitmaps,
//     changed a disabled or inconsistent entry, or a stored bitmap reads back other bits than marked.

#if canImport(Glibc)
import Glibc
#endif

/// FUZZ_TRACE=1 (with --repro or -runs=1) says where each input stopped: a seed that never reaches
/// the store exercises little.
let tracing = getenv("FUZZ_TRACE") != nil
func trace(_ message: @autoclosure () -> String) {
    if tracing { print("qcow2-bitmaps: \(message())") }
}

/// Four bytes per mark, eight marks, then the mode byte.
let markCount = 8
let scriptBytes = markCount * 4 + 1
/// Granules compared between BitmapReader and LiveBitmap per run (both walk bit by bit at worst).
let comparedGranules: UInt64 = 1 << 15

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ size: Int) -> CInt {
    guard size > scriptBytes + 104 else { return 0 }
    let input = Array(UnsafeBufferPointer(start: data, count: size))
    fuzzBitmaps(image: Array(input.dropLast(scriptBytes)), script: Array(input.suffix(scriptBytes)))
    return 0
}

func fuzzBitmaps(image original: [UInt8], script: [UInt8]) {
    var image = original
    let fileSize = UInt64(image.count)
    let prefix = Array(image.prefix(104))
    let clusterBytes = Header.bytesNeeded(prefix: prefix)
    let first = clusterBytes > 0 ? Array(image.prefix(min(clusterBytes, image.count))) : prefix
    guard let header = try? Header.parse(first) else { return }
    do { try header.validate(fileSize: fileSize, writable: true) } catch { return }
    guard !header.isDirty, header.autoclearFeatures & FeatureBit.bitmaps != 0 else { return trace("no bitmaps or dirty") }
    let g = Geometry(header: header)
    let cluster = g.clusterSize
    guard g.clusterBits <= 16, UInt64(header.refcountTableClusters) * cluster <= 1 << 20, header.l1Size <= 1 << 16 else { return }
    // Mode bit 7: the first refcount block calls cluster `mode & 0x7f` free, a corruption byte-level
    // mutations rarely hit (the engine refuses it for its own metadata, not for the bitmaps').
    let mode = script[scriptBytes - 1]
    let firstBlock = fileBytes(image, at: header.refcountTableOffset, count: 8).be64(0) & RefcountTableEntry.offsetMask
    if mode & 0x80 != 0, firstBlock != 0, firstBlock % cluster == 0, firstBlock + cluster <= fileSize,
       UInt64(mode & 0x7f) < (cluster * 8) >> UInt64(g.refcountOrder) {
        var block = fileBytes(image, at: firstBlock, count: Int(cluster))
        block.withUnsafeMutableBytes { RefcountEntry.set($0, index: Int(mode & 0x7f), order: g.refcountOrder, value: 0) }
        image.replaceSubrange(Int(firstBlock)..<Int(firstBlock + cluster), with: block)
    }
    let opened = image
    let read: MetadataRead = { (offset, count) throws(QCow2Error) in fileBytes(opened, at: offset, count: count) }
    let loader = MetadataLoader(read: read)

    // The driver's writable open, up to the bitmaps: refcounts, snapshots, the engine.
    guard let l1 = try? loader.l1Table(header),
          let table = try? loader.refcountTable(header),
          let blocks = try? loader.refcountBlocks(table: table, geometry: g, fileSize: fileSize, maximumBytes: 1 << 20),
          let snapshots = try? SnapshotMetadata(header: header, fileSize: fileSize, read: read) else { return }
    let backingSize: UInt64? = header.backingFileName != nil ? header.size : nil
    guard (try? QCow2Engine(header: header, l1: l1, fileSize: fileSize, backingSize: backingSize,
                            cacheBytes: 4 * Int(cluster), refcountTable: table, refcountBlocks: blocks,
                            snapshots: snapshots)) != nil else { return trace("the engine refuses the image") }

    // OpenedBitmaps.load: a corrupt directory refuses the image, unknown flags make it read-only.
    guard let entries = try? BitmapValidation.load(header: header, fileSize: fileSize, read: read),
          !entries.isEmpty else { return trace("the bitmap directory is refused") }
    var live: [LiveBitmap] = []
    var loaded: [[UInt8]?] = []
    for entry in entries {
        if entry.isInUse {
            live.append(LiveBitmap(name: entry.name, granularityBits: entry.granularityBits, enabled: entry.isEnabled,
                                   inconsistent: true, virtualSize: header.size))
            loaded.append(nil)
            continue
        }
        guard let reader = try? BitmapReader(entry: entry, header: header, fileSize: fileSize, read: read),
              let bits = try? reader.allBits() else { return trace("bitmap '\(entry.name)' is refused") }
        let bitmap = LiveBitmap(name: entry.name, granularityBits: entry.granularityBits, enabled: entry.isEnabled,
                                inconsistent: false, virtualSize: header.size, bytes: bits)
        check(bitmap.bytes(byteCount: bits.count) == bits, "bitmap '\(entry.name)': loaded bits change in LiveBitmap")
        compareRuns(reader, bitmap, script: script)
        live.append(bitmap)
        loaded.append(bits)
    }

    // markInUse: the directory rewritten in place, in_use on every enabled bitmap.
    var file = image
    guard let directory = try? BitmapDirectory(header: header) else { fatalError("invariant: the directory loaded, then vanished") }
    let inUse = entries.flatMap { entry in
        var entry = entry
        if entry.isEnabled { entry.flags |= BitmapEntry.inUse }
        return entry.encoded()
    }
    check(UInt64(inUse.count) == directory.byteCount, "the in_use directory is \(inUse.count) bytes, was \(directory.byteCount)")
    file.replaceSubrange(Int(directory.offset)..<(Int(directory.offset) + inUse.count), with: inUse)

    // Writes, zeroes and trims mark every recording bitmap; the model marks granules one by one.
    let markers = live.filter(\.records).map(\.marker)
    let disk = header.size
    var ranges: [(offset: UInt64, length: UInt64)] = []
    for k in 0..<markCount where disk > 0 {
        let op = Array(script[(4 * k)..<(4 * k + 4)])
        var offset = (UInt64(op[0]) << 8 | UInt64(op[1])) * (disk / 65536 + 1) % disk
        if op[2] & 0x80 != 0 { offset = (offset + UInt64(op[2] & 0x7f) * 512) % disk }
        let unit: UInt64 = op[3] & 0x80 != 0 ? 512 : cluster
        var length = UInt64(op[3] & 0x3f) * unit + (op[3] & 0x40 != 0 ? 1 : unit)
        if op[2] & 0x40 != 0 { length = disk }   // a trim of everything, or a range past the end
        ranges.append((offset, length))
        for marker in markers { marker.mark(offset: offset, length: length) }
    }
    var expected: [[UInt8]?] = []
    for (bitmap, bits) in zip(live, loaded) {
        guard var bits, bitmap.records else { expected.append(loaded[expected.count]); continue }
        for (offset, length) in ranges {
            let end = min(offset + length, disk)
            guard offset < end else { continue }
            for granule in (offset >> UInt64(bitmap.granularityBits))...((end - 1) >> UInt64(bitmap.granularityBits)) {
                bits[Int(granule / 8)] |= 1 << UInt8(granule % 8)
            }
        }
        check(bitmap.bytes(byteCount: bits.count) == bits, "bitmap '\(bitmap.name)': marked bits differ from the marked ranges")
        expected.append(bits)
    }

    // The clean close: QCow2Driver.storeBitmaps over an in-memory file that checks every write.
    let memory = MemoryFile(file, contract: StoreContract(header: header, image: file, l1: l1, reftable: table,
                                                          snapshots: snapshots, entries: entries, read: read))
    var stored: [StoredBitmap] = []
    do throws(QCow2Error) {
        let metadata = try ImageMetadata(file: memory)
        for entry in try metadata.bitmaps() {
            guard let bitmap = live.first(where: { $0.name == entry.name }), bitmap.records else {
                stored.append(StoredBitmap(entry: entry, bits: nil, onDisk: []))
                continue
            }
            var clean = entry
            clean.flags &= ~BitmapEntry.inUse
            let bitCount = BitmapEntry.bitCount(virtualSize: disk, granularityBits: entry.granularityBits)
            stored.append(StoredBitmap(entry: clean, bits: bitmap.bytes(byteCount: Int((bitCount + 7) / 8)),
                                       onDisk: try BitmapStore.ownedClusters(entry, image: metadata)))
        }
        try BitmapStore.store(stored, removed: [], image: metadata)
    } catch {
        trace("the store refused: \(error)")
        return   // refused: the bitmaps stay in use, and every write so far obeyed the contract
    }
    memory.contract.finish()
    trace("stored \(stored.count) bitmaps (\(stored.filter { $0.bits != nil }.count) recording)")

    // Reload what was stored.
    let after = memory.bytes
    let readAfter: MetadataRead = { (offset, count) throws(QCow2Error) in fileBytes(after, at: offset, count: count) }
    guard let headerAfter = try? Header.parse(Array(after.prefix(Int(cluster)))) else { fatalError("invariant: the stored header does not parse") }
    let reloaded: [BitmapEntry]
    do throws(QCow2Error) {
        reloaded = try BitmapValidation.load(header: headerAfter, fileSize: UInt64(after.count), read: readAfter)
    } catch {
        fatalError("invariant: the stored bitmaps do not load: \(error)")
    }
    check(reloaded.map(\.name) == entries.map(\.name), "stored bitmaps \(reloaded.map(\.name)), had \(entries.map(\.name))")
    for (i, entry) in reloaded.enumerated() {
        if !live[i].records {
            check(entry == entries[i], "bitmap '\(entry.name)' was not recording but its entry changed")
        } else {
            check(entry.flags == entries[i].flags & ~BitmapEntry.inUse && entry.granularityBits == entries[i].granularityBits,
                  "bitmap '\(entry.name)': stored flags \(entry.flags) granularity \(entry.granularityBits)")
        }
        guard let want = expected[i] else { continue }
        guard let reader = try? BitmapReader(entry: entry, header: headerAfter, fileSize: UInt64(after.count), read: readAfter),
              let bits = try? reader.allBits() else { fatalError("invariant: bitmap '\(entry.name)' cannot be read back") }
        check(bits == want, "bitmap '\(entry.name)' reads back other bits than were marked")
    }
}

/// BitmapReader (the offline reader) and LiveBitmap (the served bits) agree on runs.
func compareRuns(_ reader: BitmapReader, _ bitmap: LiveBitmap, script: [UInt8]) {
    let g = UInt64(bitmap.granularityBits)
    let span = comparedGranules << g
    let disk = bitmap.virtualSize
    let starts: [UInt64] = [0, disk / 2, (UInt64(script[scriptBytes - 1]) << g) + UInt64(script[0])]
    for start in starts where start < disk {
        guard let offline = try? reader.runs(offset: start, length: span) else { fatalError("invariant: BitmapReader.runs failed on a loaded table") }
        let served = bitmap.runs(offset: start, length: span)
        check(offline == served, "runs from \(start): BitmapReader \(offline.prefix(4)) vs LiveBitmap \(served.prefix(4))")
        var end = start
        for run in served {
            check(run.offset == end && run.length > 0, "runs are not contiguous at \(run.offset)")
            end += run.length
        }
        check(end == min(disk, start + span), "runs end at \(end)")
    }
}

/// Where the store may write, decided from the image as it was before the store.
final class StoreContract {
    let header: Header
    let cluster: UInt64
    let reftableRange: Range<UInt64>
    /// Refcount blocks the table pointed at before the store (rewritten whole by commits).
    let refblocks: Set<UInt64>
    /// Clusters holding metadata before the store.
    var metadata = Set<UInt64>()
    /// Clusters with a refcount before the store (all below the end of the file).
    var used = Set<UInt64>()
    let endCluster: UInt64
    var writesSinceSync = false
    var synced = false
    var headerWritten = false
    var newStructures = false

    init(header: Header, image: [UInt8], l1: [UInt64], reftable: [UInt64], snapshots: SnapshotMetadata,
         entries: [BitmapEntry], read: @escaping MetadataRead) {
        self.header = header
        let g = Geometry(header: header)
        cluster = g.clusterSize
        endCluster = (UInt64(image.count) + cluster - 1) / cluster
        reftableRange = header.refcountTableOffset..<(header.refcountTableOffset + UInt64(header.refcountTableClusters) * cluster)
        refblocks = Set(reftable.map { $0 & RefcountTableEntry.offsetMask }.filter { $0 != 0 }.map { $0 / g.clusterSize })
        func add(_ offset: UInt64, _ count: UInt64) {
            guard count > 0 else { return }
            for c in (offset / cluster)...((offset + count - 1) / cluster) { metadata.insert(c) }
        }
        add(0, cluster)
        add(header.l1TableOffset, UInt64(header.l1Size) * 8)
        for entry in l1 where entry & L1Entry.offsetMask != 0 { add(entry & L1Entry.offsetMask, cluster) }
        add(reftableRange.lowerBound, UInt64(reftableRange.count))
        for c in refblocks { metadata.insert(c) }
        for extent in snapshots.extents { add(extent.offset, extent.byteCount) }
        if let directory = try? BitmapDirectory(header: header) { add(directory.offset, directory.byteCount) }
        for entry in entries {
            add(entry.tableOffset, UInt64(entry.tableSize) * 8)
            let kinds = try? BitmapValidation.table(of: entry, clusterSize: cluster, fileSize: UInt64(image.count),
                                                   regions: MetadataRegions(header: header), read: read)
            for case .data(let offset) in kinds ?? [] { add(offset, cluster) }
        }
        let order = g.refcountOrder
        for (index, block) in reftable.enumerated() where block & RefcountTableEntry.offsetMask != 0 {
            let bytes = (try? read(block & RefcountTableEntry.offsetMask, Int(cluster))) ?? []
            let perBlock = (UInt64(cluster) * 8) >> UInt64(order)
            bytes.withUnsafeBytes { raw in
                for slot in 0..<Int(perBlock) where RefcountEntry.get(raw, index: slot, order: order) != 0 {
                    used.insert(UInt64(index) * perBlock + UInt64(slot))
                }
            }
        }
    }

    func write(_ data: [UInt8], at offset: UInt64, old: [UInt8]) {
        let end = offset + UInt64(data.count)
        check(!data.isEmpty, "an empty write at \(offset)")
        if offset < cluster {
            check(offset == 0 && end <= cluster, "a write of \(data.count) bytes at \(offset) straddles the header cluster")
            check(synced && !writesSinceSync, "cluster 0 rewritten before the new structures were synced")
            guard let before = try? Header.parse(Array(old.prefix(Int(cluster)))),
                  let after = try? Header.parse(Array(data)) else { fatalError("invariant: the rewritten header does not parse") }
            var same = after
            same.extensions = before.extensions
            same.autoclearFeatures = before.autoclearFeatures
            check(same == before, "the header changed beyond its extensions and autoclear bits")
            check(after.autoclearFeatures & ~FeatureBit.bitmaps == before.autoclearFeatures & ~FeatureBit.bitmaps,
                  "autoclear bits other than bitmaps changed")
            headerWritten = true
        } else if reftableRange.contains(offset) {
            check(end <= reftableRange.upperBound && offset % 8 == 0 && data.count == 8,
                  "a write of \(data.count) bytes at \(offset) in the refcount table is not one entry")
        } else {
            check(offset % cluster == 0 && UInt64(data.count) % cluster == 0,
                  "a write of \(data.count) bytes at \(offset) is not whole clusters")
            let first = offset / cluster, last = (end - 1) / cluster
            if first == last && refblocks.contains(first) {
                // An existing refcount block, rewritten by a commit.
            } else {
                check(!headerWritten || data.count == Int(cluster), "a write of \(data.count) bytes after cluster 0 was rewritten")
                for c in first...last {
                    check(!metadata.contains(c), "a store write at \(offset) lands on metadata (cluster \(c))")
                    check(c >= endCluster || !used.contains(c), "a store write at \(offset) lands on cluster \(c), which was in use")
                }
                if !headerWritten { newStructures = true }
            }
        }
        writesSinceSync = true
    }

    func sync() {
        synced = true
        writesSinceSync = false
    }

    func finish() {
        check(!writesSinceSync, "the store ended with writes not synced")
        check(headerWritten, "the store succeeded without rewriting cluster 0")
    }
}

/// The image file in memory, every write checked against the contract.
final class MemoryFile: MetadataFile {
    var bytes: [UInt8]
    let contract: StoreContract

    init(_ bytes: [UInt8], contract: StoreContract) {
        self.bytes = bytes
        self.contract = contract
    }

    func length() throws(QCow2Error) -> UInt64 { UInt64(bytes.count) }

    func read(at offset: UInt64, count: Int) throws(QCow2Error) -> [UInt8] {
        fileBytes(bytes, at: offset, count: count)
    }

    func write(_ data: [UInt8], at offset: UInt64) throws(QCow2Error) {
        check(offset + UInt64(data.count) <= UInt64(bytes.count) + (64 << 20), "a write at \(offset) far past the end of the file")
        contract.write(data, at: offset, old: fileBytes(bytes, at: offset, count: data.count))
        let end = Int(offset) + data.count
        if end > bytes.count { bytes += [UInt8](repeating: 0, count: end - bytes.count) }
        bytes.replaceSubrange(Int(offset)..<end, with: data)
    }

    func sync() throws(QCow2Error) { contract.sync() }
}
