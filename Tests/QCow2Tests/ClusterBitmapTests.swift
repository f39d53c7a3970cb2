// ClusterBitmap: the metadata-cluster set the write paths ask on every write.

import Testing
@testable import QCow2

@Suite struct ClusterBitmapTests {
    @Test func insertsRemovesAndAnswersLikeASet() {
        var bitmap = ClusterBitmap()
        var model: Set<UInt64> = []
        var g = SeededRandom(seed: 9)
        let far = ClusterBitmap.denseLimit
        let candidates: [UInt64] = (0..<300).map { UInt64($0) } + [63, 64, 65, 4095, 4096, far - 1, far, far + 1, 1 << 55]
        for _ in 0..<2000 {
            let c = candidates.randomElement(using: &g)!
            if Bool.random(using: &g) {
                bitmap.insert(c)
                model.insert(c)
            } else {
                bitmap.remove(c)
                model.remove(c)
            }
        }
        for c in candidates + [100_000, far + 2] { #expect(bitmap.contains(c) == model.contains(c), "cluster \(c)") }
        #expect(Array(bitmap) == model.sorted())
        bitmap.formUnion(500..<510)
        #expect(bitmap.contains(509) && !bitmap.contains(510))
    }
}
