// `qnbd map --bitmap NAME`: a persistent bitmap's dirty and clean runs, read offline through
// BitmapReader, the same runs `qemu:dirty-bitmap:NAME` reports over NBD (what an incremental backup
// copies). JSON: one object per run, {"start", "length", "dirty"}.

import QCow2

public enum BitmapMap {
    /// The runs of bitmap `name` of the image at `path`, over the whole disk.
    public static func runs(path: String, name: String) throws(ToolError) -> [BitmapRun] {
        let storage = try FileStorage(path: path, mode: .readOnly)
        defer { storage.close() }
        guard try probeFormat(storage, name: path) == .qcow2 else { throw ToolError("'\(path)' is not a qcow2 image; only qcow2 images hold bitmaps") }
        let image = try ImageMetadata.open(storage, name: path)
        return try tool { () throws(QCow2Error) in
            guard let entry = try image.bitmaps().first(where: { $0.name == name }) else {
                throw .unsupported("bitmaps", "no bitmap named '\(name)'")
            }
            return try image.bitmapReader(entry).runs(offset: 0, length: image.header.size)
        }
    }

    public static func json(_ runs: [BitmapRun]) -> String {
        "[" + runs.map { "{ \"start\": \($0.offset), \"length\": \($0.length), \"dirty\": \($0.dirty) }" }
            .joined(separator: ",\n") + "]\n"
    }

    /// nbdinfo --map's layout: offset, length, 1 (dirty) or 0, and the word.
    public static func human(_ runs: [BitmapRun]) -> String {
        runs.map { "\(padLeft(String($0.offset), 10))  \(padLeft(String($0.length), 10))    \($0.dirty ? 1 : 0)  \($0.dirty ? "dirty" : "clean")\n" }
            .joined()
    }
}
