// Rewriting cluster 0 after an offline command changed the header extensions (`qnbd bitmap` adds,
// changes or drops the bitmaps extension): the fixed part is kept byte for byte except the autoclear
// bits and the backing name's offset, and the extensions and backing name are laid out again after it,
// as qemu's header update does. One write of the whole cluster.

extension Header {
    /// `cluster0` (the file's first cluster) with this header's extensions, autoclear bits and backing
    /// file name. Refuses when they no longer fit in the cluster.
    public func rewritingExtensions(of cluster0: [UInt8]) throws(QCow2Error) -> [UInt8] {
        guard version == 3 else { throw .unsupported("header", "version 2 images cannot hold header extensions qnbd writes") }
        var out = cluster0
        let start = Int(headerLength)
        out.replaceSubrange(start..<out.count, with: [UInt8](repeating: 0, count: out.count - start))
        out.setBE64(autoclearFeatures, at: Int(Self.autoclearFeaturesOffset))
        var position = start
        for e in extensions {
            let padded = (e.data.count + 7) / 8 * 8
            guard position + 8 + padded + 8 <= out.count else {
                throw QCow2Error("header", "extensions no longer fit in the first cluster")
            }
            out.setBE32(e.type, at: position)
            out.setBE32(UInt32(e.data.count), at: position + 4)
            out.replaceSubrange((position + 8)..<(position + 8 + e.data.count), with: e.data)
            position += 8 + padded
        }
        position += 8   // end of extensions (type 0, length 0)
        if let name = backingFileName {
            let bytes = Array(name.utf8)
            guard position + bytes.count <= out.count else {
                throw QCow2Error("header", "the backing file name no longer fits in the first cluster")
            }
            out.replaceSubrange(position..<(position + bytes.count), with: bytes)
            out.setBE64(UInt64(position), at: 8)
            out.setBE32(UInt32(bytes.count), at: 16)
        }
        return out
    }
}
