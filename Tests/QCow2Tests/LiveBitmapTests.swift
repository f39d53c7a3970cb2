// LiveBitmap against a plain one-bool-per-granule model: marks across word boundaries, runs clipped
// to the range and the disk, and the stored byte layout (bit k in bit k % 8 of byte k / 8).

import QCow2
import Testing

@Suite struct LiveBitmapTests {
    @Test func marksAndRunsMatchAModel() {
        var g: UInt64 = 12345
        func next(_ n: UInt64) -> UInt64 {
            g = g &* 6364136223846793005 &+ 1442695040888963407
            return (g >> 33) % n
        }
        for granularityBits: UInt8 in [9, 16, 20] {
            let size: UInt64 = (300 << 20) + 4097
            let granule = UInt64(1) << UInt64(granularityBits)
            let granules = Int((size + granule - 1) / granule)
            let bitmap = LiveBitmap(name: "x", granularityBits: granularityBits, enabled: true, inconsistent: false, virtualSize: size)
            var model = [Bool](repeating: false, count: granules)
            for _ in 0..<200 {
                let offset = next(size)
                let length = 1 + next(next(4) == 0 ? 64 << 20 : 70000)
                bitmap.mark(offset: offset, length: length)
                let end = min(offset + length, size)
                for k in Int(offset / granule)...Int((end - 1) / granule) { model[k] = true }
            }
            bitmap.mark(offset: size - 1, length: 100)   // clipped to the disk
            model[granules - 1] = true
            let bits: [Bool] = (0..<granules).map { k in bitmap.isDirty(granule: UInt64(k)) }
            #expect(bits == model)
            for _ in 0..<20 {
                let offset = next(size)
                let length = 1 + next(size)
                let runs = bitmap.runs(offset: offset, length: length)
                var position = offset
                for (i, run) in runs.enumerated() {
                    #expect(run.offset == position)
                    #expect(run.length > 0)
                    if i > 0 { #expect(run.dirty != runs[i - 1].dirty, "neighbouring runs differ") }
                    let span = Int(run.offset / granule)...Int((run.offset + run.length - 1) / granule)
                    #expect(model[span].allSatisfy { $0 == run.dirty })
                    position += run.length
                }
                #expect(position == min(offset + length, size))
            }
            #expect(bitmap.runs(offset: 0, length: size, maximumRuns: 3).count <= 3)
            // Stored bytes, and loading them back.
            let bytes = bitmap.bytes(byteCount: (granules + 7) / 8)
            let stored: [Bool] = (0..<granules).map { k in (bytes[k / 8] >> UInt8(k % 8)) & 1 == 1 }
            #expect(stored == model)
            let loaded = LiveBitmap(name: "x", granularityBits: granularityBits, enabled: true, inconsistent: false,
                                    virtualSize: size, bytes: bytes)
            #expect(loaded.words == bitmap.words)
        }
    }

    @Test func inconsistentBitmapHasNoBitsAndNoRuns() {
        let bitmap = LiveBitmap(name: "x", granularityBits: 16, enabled: true, inconsistent: true, virtualSize: 1 << 30)
        #expect(bitmap.words.isEmpty)
        #expect(!bitmap.records)
        #expect(bitmap.runs(offset: 0, length: 1 << 30).isEmpty)
    }
}
