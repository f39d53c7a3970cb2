// ArrayQueue: the engine's outbox, quarantine and pinned-generation queues, against an Array model.

import Testing
@testable import QCow2

@Suite struct ArrayQueueTests {
    @Test func behavesLikeAnArrayUsedAsAQueue() {
        var queue = ArrayQueue<Int>()
        var model: [Int] = []
        var g = SeededRandom(seed: 21)
        var next = 0
        // Long runs without emptying cross the compaction threshold many times.
        for _ in 0..<20_000 {
            switch Int.random(in: 0..<10, using: &g) {
            case 0..<5:
                queue.append(next)
                model.append(next)
                next += 1
            case 5..<7:
                #expect(queue.popFirst() == (model.isEmpty ? nil : model.removeFirst()))
            case 7:
                queue.compact()
            case 8:
                let limit = Int.random(in: 0..<(next + 1), using: &g)
                queue.removeFirst(while: { $0 < limit })
                while let first = model.first, first < limit { model.removeFirst() }
            default:
                if !model.isEmpty {
                    let distance = Int.random(in: 0..<model.count, using: &g)
                    let value = model[model.count - 1 - distance]
                    // Values are unique (each appended once, then moved up by a million at most a few
                    // times), so the search finds exactly this place.
                    #expect(queue.distanceFromNewest(where: { $0 == value }) == distance)
                    #expect(queue.distanceFromNewest(where: { $0 < 0 }) == nil)
                    queue.modify(fromNewest: distance) { $0 += 1_000_000 }
                    model[model.count - 1 - distance] += 1_000_000
                }
            }
            #expect(queue.count == model.count)
            #expect(queue.isEmpty == model.isEmpty)
            #expect(queue.first == model.first)
            #expect(queue.last == model.last)
        }
        #expect(queue.removeAll() == model)
        #expect(queue.isEmpty && queue.popFirst() == nil)
    }

    @Test func elementsAppendedWhileDrainingComeOutLater() {
        var queue = ArrayQueue<String>(reservingCapacity: 4)
        queue.append("a")
        queue.append("b")
        #expect(queue.popFirst() == "a")
        queue.append("c")
        #expect(queue.popFirst() == "b")
        #expect(queue.popFirst() == "c")
        #expect(queue.popFirst() == nil)
    }
}
