// `qnbd info`: what an image is, in `qemu-img info`'s words and JSON keys: format, virtual and disk
// size, cluster size, qcow2 version and features, backing file (and with --backing-chain every image
// below it), snapshots and bitmaps. Raw files are described too.

import QCow2
#if canImport(Glibc)
import Glibc
#endif

/// qemu's ImageInfoSpecificQCow2.
public struct QCow2Details: Equatable, Sendable {
    public var compat: String
    public var compressionType: String
    public var refcountBits: Int
    /// v3 only (nil for compat 0.10, where qemu leaves them out).
    public var lazyRefcounts: Bool?
    public var corrupt: Bool?
    public var extendedL2: Bool?
    public var bitmaps: [BitmapEntry]
}

/// qemu's ImageInfo for one image.
public struct ImageInfo: Equatable, Sendable {
    public var filename: String
    public var format: ImageFormat
    public var virtualSize: UInt64
    public var actualSize: UInt64
    public var clusterSize: UInt64?
    public var dirty: Bool
    public var encrypted: Bool
    public var backingFilename: String?
    public var fullBackingFilename: String?
    public var backingFormat: String?
    public var snapshots: [Snapshot]
    public var qcow2: QCow2Details?

    /// Reads the image at `path` (`format` nil: probe by magic).
    public static func read(path: String, format: ImageFormat? = nil) throws(ToolError) -> ImageInfo {
        let storage = try FileStorage(path: path, mode: .readOnly)
        defer { storage.close() }
        let detected = probedFormat(storage)
        let chosen: ImageFormat
        if let format { chosen = format } else { chosen = try probeFormat(storage, name: path) }
        var info = ImageInfo(
            filename: path, format: chosen, virtualSize: 0, actualSize: try storage.allocatedBytes(),
            clusterSize: nil, dirty: false, encrypted: false, backingFilename: nil, fullBackingFilename: nil,
            backingFormat: nil, snapshots: [], qcow2: nil)
        guard chosen == .qcow2 else {
            info.virtualSize = (try storage.length() + 511) & ~511
            return info
        }
        guard detected == .qcow2 else { throw ToolError("'\(path)' is not a qcow2 image") }
        let image = try ImageMetadata.open(storage, name: path)
        let h = image.header
        info.virtualSize = h.size & ~511   // qemu counts whole sectors
        info.clusterSize = image.clusterSize
        info.dirty = h.version >= 3 && h.isDirty
        info.encrypted = h.cryptMethod != 0
        if let name = h.backingFileName {
            info.backingFilename = name
            info.fullBackingFilename = resolveBackingPath(name, relativeTo: path)
            info.backingFormat = h.backingFormat
        }
        info.snapshots = try tool { () throws(QCow2Error) in try image.snapshots().entries }
        let v3 = h.version >= 3
        info.qcow2 = QCow2Details(
            compat: v3 ? "1.1" : "0.10", compressionType: h.compressionType == 1 ? "zstd" : "zlib",
            refcountBits: image.geometry.refcountBits, lazyRefcounts: v3 ? h.lazyRefcounts : nil,
            corrupt: v3 ? h.isCorrupt : nil, extendedL2: v3 ? h.extendedL2 : nil, bitmaps: try tool { () throws(QCow2Error) in try image.bitmaps() })
        return info
    }

    /// The image and, with `chain`, every backing file below it (qemu-img info --backing-chain).
    public static func collect(path: String, chain: Bool) throws(ToolError) -> [ImageInfo] {
        var infos = [try read(path: path)]
        var seen: Set<String> = [path]
        while chain, let backing = infos.last!.fullBackingFilename {
            guard seen.insert(backing).inserted, infos.count < 256 else {
                throw ToolError("backing chain of '\(path)' loops back to '\(backing)'")
            }
            let format = infos.last!.backingFormat.flatMap(ImageFormat.init(rawValue:))
            do {
                infos.append(try read(path: backing, format: format))
            } catch {
                throw ToolError("could not open backing file '\(backing)': \(error.message)")
            }
        }
        return infos
    }

    // MARK: - Output

    public var json: JSONValue {
        var members: [(String, JSONValue)] = []
        if !snapshots.isEmpty { members.append(("snapshots", .array(snapshots.map(Self.snapshotJSON)))) }
        members.append(("virtual-size", .uint(virtualSize)))
        members.append(("filename", .string(filename)))
        if let clusterSize { members.append(("cluster-size", .uint(clusterSize))) }
        members.append(("format", .string(format.rawValue)))
        members.append(("actual-size", .uint(actualSize)))
        if encrypted { members.append(("encrypted", .bool(true))) }
        if let q = qcow2 {
            var data: [(String, JSONValue)] = [
                ("compat", .string(q.compat)), ("compression-type", .string(q.compressionType)),
            ]
            if let lazy = q.lazyRefcounts { data.append(("lazy-refcounts", .bool(lazy))) }
            if !q.bitmaps.isEmpty { data.append(("bitmaps", .array(q.bitmaps.map(Self.bitmapJSON)))) }
            data.append(("refcount-bits", .int(Int64(q.refcountBits))))
            if let corrupt = q.corrupt { data.append(("corrupt", .bool(corrupt))) }
            if let extended = q.extendedL2 { data.append(("extended-l2", .bool(extended))) }
            members.append(("format-specific", .object([("type", .string("qcow2")), ("data", .object(data))])))
        }
        if let backingFilename {
            if let fullBackingFilename { members.append(("full-backing-filename", .string(fullBackingFilename))) }
            members.append(("backing-filename", .string(backingFilename)))
            if let backingFormat { members.append(("backing-filename-format", .string(backingFormat))) }
        }
        members.append(("dirty-flag", .bool(dirty)))
        return .object(members)
    }

    static func snapshotJSON(_ s: Snapshot) -> JSONValue {
        var members: [(String, JSONValue)] = []
        if let icount = s.icount { members.append(("icount", .uint(icount))) }
        members += [
            ("vm-clock-nsec", .uint(s.vmClockNanoseconds % 1_000_000_000)), ("name", .string(s.name)),
            ("date-sec", .uint(UInt64(s.dateSeconds))), ("date-nsec", .uint(UInt64(s.dateNanoseconds))),
            ("vm-clock-sec", .uint(s.vmClockNanoseconds / 1_000_000_000)), ("id", .string(s.id)),
            ("vm-state-size", .uint(s.vmStateSize)),
        ]
        return .object(members)
    }

    static func bitmapFlags(_ flags: UInt32) -> [String] {
        var names: [String] = []
        if flags & BitmapEntry.inUse != 0 { names.append("in-use") }
        if flags & BitmapEntry.auto != 0 { names.append("auto") }
        return names
    }

    static func bitmapJSON(_ b: BitmapEntry) -> JSONValue {
        .object([
            ("flags", .array(bitmapFlags(b.flags).map { .string($0) })), ("name", .string(b.name)),
            ("granularity", .uint(UInt64(1) << UInt64(min(b.granularityBits, 63)))),
        ])
    }

    /// `qemu-img info` (human).
    public var human: String {
        var out = "image: \(filename)\nfile format: \(format.rawValue)\n"
        out += "virtual size: \(SizeFormatter.human(virtualSize)) (\(virtualSize) bytes)\n"
        out += "disk size: \(SizeFormatter.human(actualSize))\n"
        if encrypted { out += "encrypted: yes\n" }
        if let clusterSize { out += "cluster_size: \(clusterSize)\n" }
        if dirty { out += "cleanly shut down: no\n" }
        if let backingFilename {
            out += "backing file: \(backingFilename)"
            if let full = fullBackingFilename, full != backingFilename { out += " (actual path: \(full))" }
            out += "\n"
            if let backingFormat { out += "backing file format: \(backingFormat)\n" }
        }
        if !snapshots.isEmpty {
            out += "Snapshot list:\n"
            out += pad("ID", 10) + pad("TAG", 17) + padLeft("VM SIZE", 8) + padLeft("DATE", 20)
                + padLeft("VM CLOCK", 13) + padLeft("ICOUNT", 11) + "\n"
            for s in snapshots { out += Self.snapshotLine(s) + "\n" }
        }
        if let q = qcow2 {
            out += "Format specific information:\n"
            out += "    compat: \(q.compat)\n    compression type: \(q.compressionType)\n"
            if let lazy = q.lazyRefcounts { out += "    lazy refcounts: \(lazy)\n" }
            if !q.bitmaps.isEmpty {
                out += "    bitmaps:\n"
                for (i, b) in q.bitmaps.enumerated() {
                    out += "        [\(i)]:\n            flags:\n"
                    for (k, flag) in Self.bitmapFlags(b.flags).enumerated() { out += "                [\(k)]: \(flag)\n" }
                    out += "            name: \(b.name)\n"
                    out += "            granularity: \(UInt64(1) << UInt64(min(b.granularityBits, 63)))\n"
                }
            }
            out += "    refcount bits: \(q.refcountBits)\n"
            if let corrupt = q.corrupt { out += "    corrupt: \(corrupt)\n" }
            if let extended = q.extendedL2 { out += "    extended l2: \(extended)\n" }
        }
        return out
    }

    /// One row of qemu's snapshot list (bdrv_snapshot_dump); the date is local time, as there.
    static func snapshotLine(_ s: Snapshot) -> String {
        var time = time_t(s.dateSeconds)
        var parts = tm()
        localtime_r(&time, &parts)
        var buffer = [CChar](repeating: 0, count: 64)
        let n = strftime(&buffer, 64, "%Y-%m-%d %H:%M:%S", &parts)
        let date = String(decoding: buffer.prefix(n).map { UInt8(bitPattern: $0) }, as: UTF8.self)
        let seconds = s.vmClockNanoseconds / 1_000_000_000
        let clock = cFormat("%02d:%02d:%02d.%03d", Int32(truncatingIfNeeded: seconds / 3600),
                            Int32((seconds / 60) % 60), Int32(seconds % 60),
                            Int32((s.vmClockNanoseconds / 1_000_000) % 1000))
        let icount = s.icount.map { String($0) } ?? ""
        return pad(s.id, 9) + " " + pad(s.name, 16) + " " + padLeft(SizeFormatter.human(s.vmStateSize), 8)
            + padLeft(date, 20) + padLeft(clock, 13) + padLeft(icount, 11)
    }
}

/// printf's %-Ns.
func pad(_ s: String, _ width: Int) -> String {
    s.count >= width ? s : s + String(repeating: " ", count: width - s.count)
}

/// printf's %Ns.
func padLeft(_ s: String, _ width: Int) -> String {
    s.count >= width ? s : String(repeating: " ", count: width - s.count) + s
}
