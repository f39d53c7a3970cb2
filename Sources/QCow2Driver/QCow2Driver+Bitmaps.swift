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
//            sync, refcounts, cluster 0, sync, then the old clusters freed), as one job on the thread
//            pool so that the loop keeps serving the other exports meanwhile. A crash before cluster 0
//            is rewritten leaves the old directory with in_use set: the bitmap reads as inconsistent.

import BlockDevice
import QCow2
import UVCore
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
        // dirtyBitmaps is the engine's list as opened, in the same order.
        guard let index = dirtyBitmaps.servableIndex(named: name), offset < size, length > 0 else {
            return handler.blockIOCompleted(tag: tag, outcome: .failed(.invalid))
        }
        let runs = engine.bitmaps[index].runs(offset: offset, length: length, maximumRuns: Self.maximumBitmapRuns)
        let extents = runs.map { Extent(length: $0.length, flags: ExtentFlags(rawValue: $0.dirty ? 1 : 0), depth: 0) }
        handler.blockIOCompleted(tag: tag, outcome: .extents(extents))
    }

    /// Runs per status reply: enough for any client, few enough that a fragmented bitmap's answer stays small.
    static let maximumBitmapRuns = 8192

    /// Stores the recording bitmaps after the last flush (see the file comment for the order), then calls
    /// `done`. The store's blocking reads and writes run as one job in `io`'s ordered lane on the thread
    /// pool, so a closing image never stalls the loop's other exports; the device is closing and serves
    /// nobody, so nothing else touches the file meanwhile. A failure leaves the bitmaps in_use.
    func storeBitmaps(on io: FileIO, then done: @escaping () -> Void) {
        let recording = engine.bitmaps.filter(\.records)
        guard !recording.isEmpty else { return done() }
        let job = BitmapStoreJob(path: path, size: size, recorder: recorder, bitmaps: recording.map { live in
            let bitCount = BitmapEntry.bitCount(virtualSize: size, granularityBits: live.granularityBits)
            return (live.name, live.bytes(byteCount: Int((bitCount + 7) / 8)))
        }) { [weak self] failure in
            if let failure, let self {
                self.onFailure?("\(self.path): the persistent bitmaps were not stored (\(failure)); they stay in use (inconsistent)")
            }
            done()
        }
        io.run(context: 0, completion: job, ordered: true) { job.run() }
    }
}

/// One close's bitmap store, carried to a pool thread. Its inputs are copies taken on the loop (names and
/// bits); `failure` is written by the job and read by the completion, which libuv orders after it; the
/// recorder (tests only) is used by nobody else while the closing image is quiet. Hence @unchecked Sendable.
private final class BitmapStoreJob: FileIOCompletion, @unchecked Sendable {
    private let path: String
    private let size: UInt64
    private let recorder: WriteRecorder?
    private let bitmaps: [(name: String, bits: [UInt8])]
    private let finished: (String?) -> Void
    private var failure: String?

    init(path: String, size: UInt64, recorder: WriteRecorder?, bitmaps: [(name: String, bits: [UInt8])],
         finished: @escaping (String?) -> Void) {
        self.path = path
        self.size = size
        self.recorder = recorder
        self.bitmaps = bitmaps
        self.finished = finished
    }

    /// Pool thread: the whole store, with blocking I/O on a file of its own.
    func run() -> Int {
        do throws(QCow2Error) {
            let file: MetadataFile = try BlockingImageFile(path: path, writable: true)
            let image = try ImageMetadata(file: recorder.map { RecordedFile(file, recorder: $0) } ?? file)
            var stored: [StoredBitmap] = []
            for entry in try image.bitmaps() {
                guard let bits = bitmaps.first(where: { $0.name == entry.name })?.bits else {
                    stored.append(StoredBitmap(entry: entry, bits: nil, onDisk: []))
                    continue
                }
                var clean = entry
                clean.flags &= ~BitmapEntry.inUse
                stored.append(StoredBitmap(entry: clean, bits: bits, onDisk: try BitmapStore.ownedClusters(entry, image: image)))
            }
            try BitmapStore.store(stored, removed: [], image: image)
        } catch {
            failure = error.description
        }
        return 0
    }

    func fileIOCompleted(context: UInt64, result: Int) {
        finished(failure)
    }
}
