// `qnbd map`: what every guest byte maps to, walking the backing chain, in `qemu-img map`'s terms.
// Each layer answers like qemu's block-status for its format (qcow2_co_block_status, file-posix's
// SEEK_DATA/SEEK_HOLE for raw), the generic rules are applied on top (unallocated reads as zero
// without a backing file or past its end), and adjacent equal extents are merged as qemu-img merges
// them, so the JSON output compares equal to qemu-img's.

import QCow2

/// One extent of `qemu-img map --output=json`.
public struct MapEntry: Equatable, Sendable {
    public var start: UInt64
    public var length: UInt64
    /// How deep in the chain the answer came from (0 = the image itself).
    public var depth: Int
    /// Allocated in the layer at `depth` (qemu's "present").
    public var present: Bool
    public var zero: Bool
    public var data: Bool
    /// Host offset in `filename`, when the layer knows it (not for compressed clusters).
    public var offset: UInt64?
    public var filename: String?

    public init(start: UInt64, length: UInt64, depth: Int, present: Bool, zero: Bool, data: Bool,
                offset: UInt64? = nil, filename: String? = nil) {
        self.start = start
        self.length = length
        self.depth = depth
        self.present = present
        self.zero = zero
        self.data = data
        self.offset = offset
        self.filename = filename
    }

    /// qemu-img's entry_mergeable().
    func canAbsorb(_ next: MapEntry) -> Bool {
        guard length > 0, zero == next.zero, data == next.data, depth == next.depth, present == next.present,
              filename == next.filename, (offset == nil) == (next.offset == nil) else { return false }
        if let offset, offset + length != next.offset { return false }
        return true
    }

    /// One line of qemu-img's JSON map (without the separator).
    public var jsonLine: String {
        var s = "{ \"start\": \(start), \"length\": \(length), \"depth\": \(depth), \"present\": \(present),"
            + " \"zero\": \(zero), \"data\": \(data)"
        if let offset { s += ", \"offset\": \(offset)" }
        return s + "}"
    }
}

/// What one layer says about a run of bytes (qemu's BDRV_BLOCK_* bits).
struct LayerStatus {
    var data = false
    var zero = false
    /// Set from the layer's own answer (DATA or ZERO) before the generic rules add ZERO.
    var allocated = false
    var host: UInt64?
    var length: UInt64
}

/// One image of a backing chain, opened for reading.
final class ChainLayer {
    /// The name qemu shows for it: the path given for the top image, the combined path for backings.
    let name: String
    let format: ImageFormat
    let storage: FileStorage
    let qcow2: ImageMetadata?
    /// The disk size the block layer sees (whole 512-byte sectors).
    let length: UInt64
    /// The active L1 table (at most 32 MiB), read once.
    private let l1: [UInt64]
    private var l2Cache: [UInt64: [UInt64]] = [:]
    private lazy var metadataPreallocated: Bool = detectMetadataPreallocation()

    init(name: String, format: ImageFormat?) throws(ToolError) {
        self.name = name
        storage = try FileStorage(path: name, mode: .readOnly)
        let detected = probedFormat(storage)
        let chosen: ImageFormat
        if let format { chosen = format } else { chosen = try probeFormat(storage, name: name) }
        self.format = chosen
        if chosen == .qcow2 {
            guard detected == .qcow2 else { throw ToolError("'\(name)' is not a qcow2 image") }
            let image = try ImageMetadata.open(storage, name: name)
            qcow2 = image
            // qcow2's total_sectors is the header size rounded down to sectors.
            length = image.header.size & ~511
            l1 = try tool { () throws(QCow2Error) in try image.l1Table() }
        } else {
            qcow2 = nil
            l1 = []
            length = (try storage.length() + 511) & ~511
        }
    }

    /// The backing file this layer names, with its format (from the header extension, else probed).
    func backing() -> (path: String, format: ImageFormat?)? {
        guard let image = qcow2, let name = image.header.backingFileName else { return nil }
        let format = image.header.backingFormat.flatMap(ImageFormat.init(rawValue:))
        return (resolveBackingPath(name, relativeTo: self.name), format)
    }

    /// Block status of `offset ..< offset + bytes` (bytes > 0, offset < length).
    func status(offset: UInt64, bytes requested: UInt64) throws(ToolError) -> LayerStatus {
        let bytes = min(requested, length - offset)
        guard let image = qcow2 else { return fileStatus(offset: offset, bytes: bytes) }
        var status = try qcow2Status(image, offset: offset, bytes: bytes)
        // qemu asks the file about data clusters of a metadata-preallocated image: its holes read as zero.
        if status.data && !status.zero, let host = status.host, metadataPreallocated {
            let fileLength = image.fileLength
            if host >= fileLength {
                status.zero = true
            } else {
                let file = fileStatus(offset: host, bytes: min(status.length, fileLength - host))
                let reachesEOF = host + file.length == fileLength
                if reachesEOF && file.zero {
                    status.zero = true   // qemu: a hole up to EOF goes on past it, and that reads as zero
                } else {
                    status.length = file.length
                    if file.zero { status.zero = true }
                }
            }
        }
        return status
    }

    /// file-posix's answer from SEEK_DATA/SEEK_HOLE: data or hole, with the offset mapped 1:1.
    private func fileStatus(offset: UInt64, bytes: UInt64) -> LayerStatus {
        guard let run = storage.allocationRun(at: offset) else {
            return LayerStatus(data: true, zero: false, allocated: true, host: offset, length: bytes)
        }
        let length = run.end > offset ? min(bytes, run.end - offset) : bytes
        return LayerStatus(data: run.data, zero: !run.data, allocated: true, host: offset, length: length)
    }

    /// qcow2_co_block_status over one run of equal subclusters (never past the L2 table).
    private func qcow2Status(_ image: ImageMetadata, offset: UInt64, bytes: UInt64) throws(ToolError) -> LayerStatus {
        let g = image.geometry
        let l1Index = g.l1Index(offset)
        let tableEnd = (offset / g.l2Coverage + 1) * g.l2Coverage
        let limit = min(offset + bytes, tableEnd)
        let l2Offset = l1Index < l1.count ? l1[l1Index] & L1Entry.offsetMask : 0
        if l2Offset == 0 {
            return LayerStatus(length: limit - offset)
        }
        guard l2Offset % g.clusterSize == 0 else {
            throw ToolError("Could not read file metadata: L2 table offset \(hex(l2Offset, .alternate)) unaligned (L1 index \(l1Index))")
        }
        let table = try l2Table(image, at: l2Offset)
        let step = g.extendedL2 ? 2 : 1
        func describe(_ position: UInt64) throws(ToolError) -> (SubclusterType, UInt64?) {
            let index = g.l2Index(position)
            let entry = table[index * step]
            let bitmap = g.extendedL2 ? table[index * step + 1] : 0
            let sub = Int(g.offsetInCluster(position) / g.subclusterSize)
            let type = image.subclusterType(entry, bitmap: bitmap, index: sub)
            switch type {
            case .invalid:
                throw ToolError("Could not read file metadata: invalid cluster entry \(hex(entry, .alternate)) at guest offset \(position)")
            case .normal, .zeroAllocated, .unallocatedAllocated:
                let host = entry & L2Entry.offsetMask
                guard host % g.clusterSize == 0 else {
                    throw ToolError("Could not read file metadata: cluster allocation offset \(hex(host, .alternate)) unaligned")
                }
                return (type, host + g.offsetInCluster(position))
            default:
                return (type, nil)
            }
        }
        let (type, host) = try describe(offset)
        // Extend over following subclusters of the same type (contiguous on the host where it matters).
        var end = min((offset / g.subclusterSize + 1) * g.subclusterSize, limit)
        while end < limit && type != .compressed {
            let (nextType, nextHost) = try describe(end)
            guard nextType == type else { break }
            if let host {
                guard nextHost == host + (end - offset) else { break }
            }
            end = min(end + g.subclusterSize, limit)
        }
        if type == .compressed { end = min((offset / g.clusterSize + 1) * g.clusterSize, limit) }
        var status = LayerStatus(host: host, length: end - offset)
        switch type {
        case .zeroPlain, .zeroAllocated: status.zero = true
        case .unallocatedPlain, .unallocatedAllocated: break
        case .normal, .compressed, .invalid: status.data = true
        }
        status.allocated = status.data || status.zero
        return status
    }

    private func l2Table(_ image: ImageMetadata, at offset: UInt64) throws(ToolError) -> [UInt64] {
        if let table = l2Cache[offset] { return table }
        if l2Cache.count > 256 { l2Cache.removeAll(keepingCapacity: true) }
        let table = try tool { () throws(QCow2Error) in try image.l2Table(at: offset) }
        l2Cache[offset] = table
        return table
    }

    /// qcow2_detect_metadata_preallocation: far more clusters carry a refcount than the file has blocks.
    private func detectMetadataPreallocation() -> Bool {
        guard let image = qcow2, let allocated = try? storage.allocatedBytes() else { return false }
        let cs = image.clusterSize
        let realClusters = allocated / cs
        let threshold = max(realClusters * 10 / 9, realClusters + 2)
        let endCluster = (image.fileLength + cs - 1) / cs
        var count: UInt64 = 0
        var cluster: UInt64 = 0
        while cluster < endCluster && count < threshold {
            if let refcount = try? image.refcount(ofCluster: cluster), refcount != 0 { count += 1 }
            cluster += 1
        }
        return count >= threshold
    }
}

/// An image and its backing files, top first.
public final class ImageChain {
    let layers: [ChainLayer]

    /// Opens `path` and, following backing file names, everything below it.
    public init(path: String, format: ImageFormat? = nil) throws(ToolError) {
        var layers = [try ChainLayer(name: path, format: format)]
        var seen: Set<String> = [path]
        while let backing = layers.last!.backing() {
            guard layers.count < 256 else { throw ToolError("backing chain of '\(path)' is deeper than 256 images") }
            guard seen.insert(backing.path).inserted else {
                throw ToolError("backing chain of '\(path)' loops back to '\(backing.path)'")
            }
            do {
                layers.append(try ChainLayer(name: backing.path, format: backing.format))
            } catch {
                throw ToolError("could not open backing file '\(backing.path)': \(error.message)")
            }
        }
        self.layers = layers
    }

    public var virtualSize: UInt64 { layers[0].length }

    /// qemu-img map's get_block_status(): the first layer that has the bytes, and how many it has.
    func entry(at offset: UInt64, bytes: UInt64) throws(ToolError) -> MapEntry {
        var length = bytes
        var depth = 0
        while true {
            let layer = layers[depth]
            var status = try layer.status(offset: offset, bytes: length)
            length = status.length
            if !status.allocated {
                // The generic block layer: unallocated reads as zero without a backing file or past its end.
                if depth + 1 == layers.count || offset >= layers[depth + 1].length { status.zero = true }
            }
            if status.data || status.zero || depth + 1 == layers.count {
                return MapEntry(start: offset, length: length, depth: depth, present: status.allocated,
                                zero: status.zero, data: status.data, offset: status.host,
                                filename: status.host == nil ? nil : layer.name)
            }
            depth += 1
        }
    }

    /// The merged extents of the whole disk.
    public func map() throws(ToolError) -> [MapEntry] {
        let size = virtualSize
        var entries: [MapEntry] = []
        var current = MapEntry(start: 0, length: 0, depth: 0, present: false, zero: false, data: false)
        var offset: UInt64 = 0
        while offset < size {
            let next = try entry(at: offset, bytes: min(size - offset, 1 << 30))
            if current.canAbsorb(next) {
                current.length += next.length
            } else {
                if current.length > 0 { entries.append(current) }
                current = next
            }
            offset += next.length
        }
        entries.append(current)   // qemu prints the (empty) entry of a zero-sized disk too
        return entries
    }
}

public enum MapFormatter {
    /// `qemu-img map --output=json`.
    public static func json(_ entries: [MapEntry]) -> String {
        "[" + entries.map(\.jsonLine).joined(separator: ",\n") + "]\n"
    }

    /// `qemu-img map` (human): the data extents with their host offsets. Throws where qemu-img stops:
    /// data without a host offset (compressed clusters) cannot be shown this way.
    public static func human(_ entries: [MapEntry], emit: (String) -> Void) throws(ToolError) {
        emit("Offset          Length          Mapped to       File\n")
        for e in entries where e.data {
            guard let offset = e.offset else {
                throw ToolError("File contains external, encrypted or compressed clusters.")
            }
            if e.zero { continue }
            emit(cFormat("%#-16llx%#-16llx%#-16llx", e.start, e.length, offset) + (e.filename ?? "") + "\n")
        }
    }
}
