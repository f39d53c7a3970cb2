// What every qcow2 harness needs besides its own script (compiled into each by scripts/fuzz/run):
// a trap for a broken contract, and the input read as an image file.

func check(_ condition: Bool, _ message: @autoclosure () -> String) {
    if !condition { fatalError("invariant: \(message())") }
}

/// Bytes of `file` at `offset`, zeros past its end (as a reader of the real file sees them).
func fileBytes(_ file: [UInt8], at offset: UInt64, count: Int) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: count)
    if offset < UInt64(file.count) {
        let n = min(count, file.count - Int(offset))
        out.replaceSubrange(0..<n, with: file[Int(offset)..<Int(offset) + n])
    }
    return out
}
