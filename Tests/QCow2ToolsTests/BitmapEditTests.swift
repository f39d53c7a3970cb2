// `qnbd bitmap`'s writer under crashes: replaying its writes up to every point (each write, in order)
// onto the image before it must always give an image with no corruption (leaks allowed) whose bitmaps
// are either all the old ones or all the new ones, bit for bit.

import Testing
@testable import QCow2
@testable import QCow2Tools

/// Storage that records every write and sync on top of a MemoryStorage.
final class RecordingStorage: ImageStorage {
    let inner: MemoryStorage
    private(set) var log: [(offset: UInt64, bytes: [UInt8])?] = []   // nil: a sync

    init(_ bytes: [UInt8]) { inner = MemoryStorage(bytes: bytes) }
    func length() -> UInt64 { inner.length() }
    func allocatedBytes() -> UInt64 { inner.allocatedBytes() }
    func read(at offset: UInt64, count: Int) -> [UInt8] { inner.read(at: offset, count: count) }
    func write(_ bytes: [UInt8], at offset: UInt64) {
        log.append((offset, bytes))
        inner.write(bytes, at: offset)
    }
    func truncate(to length: UInt64) { inner.truncate(to: length) }
    func sync() { log.append(nil) }
    func allocationRun(at offset: UInt64) -> (data: Bool, end: UInt64)? { nil }
}

@Suite("qnbd bitmap: crash ordering")
struct BitmapEditTests {
    func bitmaps(_ bytes: [UInt8]) throws -> [String: [UInt8]] {
        let image = try ImageMetadata(file: StorageFile(MemoryStorage(bytes: bytes)))
        var out: [String: [UInt8]] = [:]
        for entry in try image.bitmaps() { out[entry.name] = try image.bitmapReader(entry).allBits() }
        return out
    }

    @Test("every prefix of the writes leaves the old bitmaps or the new ones, and no corruption",
          arguments: [UInt64(512), 4096])
    func crashAnywhere(clusterSize: UInt64) throws {
        let made = try MemoryImage(clusterSize: clusterSize, size: 4 << 20)
        // Before: bitmap "a" with a pattern of bits.
        let first = try ImageMetadata.open(made.storage, name: "m")
        var bits = BitmapEditor.zeroBits(BitmapEntry(name: "a", granularityBits: 9), image: first)
        for i in stride(from: 0, to: bits.count, by: 97) { bits[i] = 0x5a }
        try BitmapEditor.store([EditedBitmap(entry: BitmapEntry(name: "a", flags: BitmapEntry.auto, granularityBits: 9),
                                             bits: bits, onDisk: [])], removed: [], image: first)
        let before = made.storage.bytes
        let old = try bitmaps(before)
        #expect(old["a"] == bits)

        // The change: clear "a", add "b", merge "a"... as one run of operations on "a".
        let recording = RecordingStorage(before)
        let image = try ImageMetadata.open(recording, name: "r")
        try BitmapEditor.run(image: image, path: "r", name: "a", operations: [.clear, .disable], granularity: nil)
        let new = try bitmaps(recording.inner.bytes)
        #expect(new["a"] == [UInt8](repeating: 0, count: bits.count))
        #expect(recording.log.contains { $0 == nil })

        let replay = MemoryStorage(bytes: before)
        var states = Set<String>()
        for (i, step) in recording.log.enumerated() {
            guard let step else { continue }
            replay.write(step.bytes, at: step.offset)
            let report = ImageChecker.check(storage: replay, name: "crash\(i)", repair: nil)
            #expect(report.first.corruptions == 0, "after write \(i): \(report.first)")
            let seen = try bitmaps(replay.bytes)
            #expect(seen == old || seen == new, "after write \(i): bitmaps are neither old nor new")
            states.insert(seen == old ? "old" : "new")
        }
        #expect(states == ["old", "new"])
        let end = ImageChecker.check(storage: replay, name: "end", repair: nil)
        #expect(end.first.leaks == 0 && end.first.corruptions == 0)
    }
}
