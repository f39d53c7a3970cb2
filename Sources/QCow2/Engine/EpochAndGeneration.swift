// The two clocks of a writable image. Both are counters that only grow, and both used to be bare
// UInt64s passed side by side (a deferred free carries one of each), where swapping them compiles and
// breaks the crash rules silently. As types they cannot be mixed up, and no integer becomes one by
// accident: there is no literal conformance, only the starting values and `next`.

/// A flush boundary (Q6). Metadata changed now is dirty at the current epoch; a flush captures every
/// change at or before the epoch it starts in and moves new changes to the next one.
struct Epoch: Hashable, Comparable, Sendable, CustomStringConvertible {
    let value: UInt64

    init(_ value: UInt64) { self.value = value }

    /// The epoch of an image just opened.
    static let first = Epoch(1)
    /// Later than any epoch a flush will capture: "whatever is dirty at all".
    static let latest = Epoch(.max)

    var next: Epoch { Epoch(value + 1) }

    static func < (a: Epoch, b: Epoch) -> Bool { a.value < b.value }
    var description: String { "epoch \(value)" }
}

/// The age of requests and frees (H8). A request pins the current generation while its I/O is out;
/// every free takes the next one. A cluster freed at generation G may be reused or punched once no
/// request pinned before G is still in flight.
struct Generation: Hashable, Comparable, Sendable, CustomStringConvertible {
    let value: UInt64

    init(_ value: UInt64) { self.value = value }

    /// Where an image just opened starts; requests that start before the first free pin it.
    static let initial = Generation(0)

    var next: Generation { Generation(value + 1) }

    static func < (a: Generation, b: Generation) -> Bool { a.value < b.value }
    var description: String { "generation \(value)" }
}
