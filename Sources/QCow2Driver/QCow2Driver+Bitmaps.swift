// The image's persistent dirty bitmaps in the driver: loaded and checked at open, marked in_use before
// a writable image serves anyone, answered from memory for `qemu:dirty-bitmap:NAME`, and stored at a
// clean close. The bits live in the engine (LiveBitmap), which marks them on every write, zero and trim.
//
// Lifecycle on disk (writable open):
//   open   - the directory is validated (BitmapValidation) and every consistent bitmap's bits read;
//            enabled consistent bitmaps get in_use set in place (one directory write, fdatasync) before
//            the first guest write can reach the file, and autoclear bit 0 stays set. Disabled and
//            already-in_use bitmaps are never written.
//   close  - after the engine's last flush, with nothing in flight and nothing dirty, the recording
//            bitmaps are stored with in_use cleared (BitmapStore's order: data, tables, directory,
//            sync, refcounts, cluster 0, sync, then the old clusters freed). A crash before cluster 0
//            is rewritten leaves the old directory with in_use set: the bitmap reads as inconsistent.

import BlockDevice
import QCow2
#if canImport(Glibc)
import Glibc
#endif

/// The bitmaps found at open.
struct OpenedBitmaps {
    var entries: [BitmapEntry] = []
    var live: [LiveBitmap] = []
    /// Why the image's bitmaps cannot be used (unknown flags, types or extra data): a writer that does
    /// not understand them must not change the image, so it is served read-only (qemu does the same).
    var unusable: String?

    /// Reads and checks the directory and the bits of every consistent bitmap. A corrupt directory or
    /// table throws (qemu refuses such images too).
    static func load(header: Header, fileSize: UInt64, read: @escaping MetadataRead) throws(QCow2Error) -> OpenedBitmaps {
        var opened = OpenedBitmaps()
        do {
            opened.entries = try BitmapValidation.load(header: header, fileSize: fileSize, read: read)
        } catch where !error.corrupt {
            opened.unusable = error.description
            return opened
        }
        for entry in opened.entries {
            let enabled = entry.isEnabled
            if entry.isInUse {
                opened.live.append(LiveBitmap(name: entry.name, granularityBits: entry.granularityBits, enabled: enabled,
                                              inconsistent: true, virtualSize: header.size))
                continue
            }
            let bits = try BitmapReader(entry: entry, header: header, fileSize: fileSize, read: read).allBits()
            opened.live.append(LiveBitmap(name: entry.name, granularityBits: entry.granularityBits, enabled: enabled,
                                          inconsistent: false, virtualSize: header.size, bytes: bits))
        }
        return opened
    }

    /// Sets in_use on every enabled consistent bitmap by rewriting the directory in place (same layout,
    /// only flags change) and syncing, so that a crash while serving leaves them inconsistent.
    func markInUse(fd: Int32, header: Header, path: String, recorder: WriteRecorder?) throws(BlockError) {
        guard entries.contains(where: { $0.isEnabled && !$0.isInUse }) else { return }
        let directory: BitmapDirectory
        do {
            guard let d = try BitmapDirectory(header: header) else { return }
            directory = d
        } catch {
            throw BlockError(errno: EINVAL, message: "\(path): \(error)")
        }
        let bytes = entries.flatMap { entry in
            var entry = entry
            if entry.isEnabled { entry.flags |= BitmapEntry.inUse }
            return entry.encoded()
        }
        precondition(UInt64(bytes.count) == directory.byteCount, "a re-encoded bitmap directory changed size")
        let written = bytes.withUnsafeBytes { raw in
            let n = pwrite(fd, raw.baseAddress!, raw.count, off_t(directory.offset))
            recorder?.blockingWrite(raw, at: directory.offset, result: n)
            return n
        }
        guard written == bytes.count, fdatasync(fd) == 0 else {
            throw BlockError(errno: errno, message: "\(path): cannot mark the persistent bitmaps in use")
        }
        recorder?.blockingSync(result: 0)
    }
}

extension QCow2Driver: DirtyBitmapDevice {
    public func dirtyBitmapStatus(name: String, offset: UInt64, length: UInt64, tag: UInt64, handler: BlockIOHandler) {
        guard let index = engine.bitmaps.firstIndex(where: { $0.name == name }), !engine.bitmaps[index].inconsistent,
              offset < size, length > 0 else {
            return handler.blockIOCompleted(tag: tag, outcome: .failed(.invalid))
        }
        let runs = engine.bitmaps[index].runs(offset: offset, length: length, maximumRuns: Self.maximumBitmapRuns)
        let extents = runs.map { Extent(length: $0.length, flags: ExtentFlags(rawValue: $0.dirty ? 1 : 0), depth: 0) }
        handler.blockIOCompleted(tag: tag, outcome: .extents(extents))
    }

    /// Runs per status reply: enough for any client, few enough that a fragmented bitmap's answer stays small.
    static let maximumBitmapRuns = 8192

    /// Stores the recording bitmaps after the last flush (see the file comment for the order). Runs with
    /// blocking I/O on the loop: the device is closing and serves nobody. A failure leaves them in_use.
    func storeBitmaps() {
        guard engine.bitmaps.contains(where: { $0.records }) else { return }
        let reason: String
        do throws(QCow2Error) {
            let file: MetadataFile = try BlockingImageFile(path: path, writable: true)
            let image = try ImageMetadata(file: recorder.map { RecordedFile(file, recorder: $0) } ?? file)
            var stored: [StoredBitmap] = []
            for entry in try image.bitmaps() {
                guard let live = engine.bitmaps.first(where: { $0.name == entry.name }), live.records else {
                    stored.append(StoredBitmap(entry: entry, bits: nil, onDisk: []))
                    continue
                }
                var clean = entry
                clean.flags &= ~BitmapEntry.inUse
                let bitCount = BitmapEntry.bitCount(virtualSize: size, granularityBits: entry.granularityBits)
                stored.append(StoredBitmap(entry: clean, bits: live.bytes(byteCount: Int((bitCount + 7) / 8)),
                                           onDisk: try BitmapStore.ownedClusters(entry, image: image)))
            }
            try BitmapStore.store(stored, removed: [], image: image)
            return
        } catch {
            reason = error.description
        }
        onFailure?("\(path): the persistent bitmaps were not stored (\(reason)); they stay in use (inconsistent)")
    }
}
