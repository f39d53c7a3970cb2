// An export ties a name, its settings and access list to the one driver instance every connection
// to it shares.

import BlockDevice
import NBDProtocol

public final class Export {
    public let device: BlockDevice
    public let descriptor: ExportDescriptor
    public let configuration: ExportConfiguration
    /// Who may connect; replaced on reload without reopening the image.
    var access = AccessList.everyone
    /// Connections in transmission on this export, on every loop (shared with its views on other loops).
    let usage: ExportUsage
    var connectionCount: Int { usage.count }

    public convenience init(name: String, description: String, device: BlockDevice) {
        var configuration = ExportConfiguration(name: name, imagePath: "")
        configuration.description = description
        self.init(configuration: configuration, device: device)
    }

    public convenience init(configuration: ExportConfiguration, device: BlockDevice) {
        self.init(configuration: configuration, device: device, usage: ExportUsage())
    }

    /// `usage`: shared with the same export's Export on the other loops.
    init(configuration: ExportConfiguration, device: BlockDevice, usage: ExportUsage) {
        self.usage = usage
        self.device = device
        self.configuration = configuration
        let caps = device.capabilities
        var flags: TransmissionFlags = [.hasFlags]
        if !caps.writable { flags.insert(.readOnly) }
        if caps.canFlush && configuration.flush != false { flags.insert(.sendFlush) }
        // FUA is harmless on a read-only export and clients (qemu) expect it wherever FLUSH is offered.
        if caps.canFlush && configuration.flush != false && configuration.fua != false { flags.insert(.sendFUA) }
        if caps.rotational || configuration.rotational == true { flags.insert(.rotational) }
        if configuration.rotational == false { flags.remove(.rotational) }
        if caps.writable && caps.canTrim && configuration.trim != false { flags.insert(.sendTrim) }
        if caps.writable && caps.canZero {
            flags.insert(.sendWriteZeroes)
            if caps.canFastZero { flags.insert(.sendFastZero) }
        }
        if caps.canMultiConn { flags.insert(.canMultiConn) }
        if caps.canCache { flags.insert(.sendCache) }
        var contexts = [MetaContextName.baseAllocation]
        if caps.knowsAllocationDepth { contexts.append(MetaContextName.allocationDepth) }
        // The bitmaps asked for, in the order given (ImageOpener refused any the device cannot serve).
        let served = Set((device as? DirtyBitmapDevice)?.dirtyBitmaps.filter { !$0.inconsistent }.map(\.name) ?? [])
        for name in configuration.bitmaps where served.contains(name) {
            contexts.append(MetaContextName.dirtyBitmap(name))
        }
        self.descriptor = ExportDescriptor(
            name: configuration.name, description: configuration.description, size: device.size, flags: flags,
            minimumBlockSize: caps.minimumBlockSize, preferredBlockSize: max(caps.preferredBlockSize, 512),
            maximumBlockSize: Self.maximumPayload, metaContexts: contexts)
    }

    public var name: String { descriptor.name }

    /// Largest READ or WRITE we serve: 32 MiB, what every client stays within.
    public static let maximumPayload: UInt32 = 32 << 20

    /// Why a client at `peer` may not use this export now, or nil.
    func refusal(forPeer peer: String) -> String? {
        if !access.allows(peerDescription: peer) { return "access to export \"\(name)\" is denied for this address" }
        if let limit = configuration.maximumConnections, connectionCount >= limit {
            return "export \"\(name)\" has \(limit) connections already (maxconnections)"
        }
        return nil
    }
}

/// The exports a server offers. Connections read it when they start negotiating and resolve the
/// export a client chose by name, so the set can change (a reload) without touching live connections:
/// a connection holds its Export, and the table counts who holds which.
public final class ExportTable {
    public private(set) var exports: [Export]
    /// nbd-server's `allowlist`: whether LIST answers.
    var listAllowed = true
    /// Which export each connection in transmission holds (by connection id), even a removed one.
    private var holders: [Int: Export] = [:]

    public init(_ exports: [Export]) {
        self.exports = exports
    }

    /// What the handshake shows: every export, in configuration order.
    public var descriptors: [ExportDescriptor] { exports.map(\.descriptor) }

    public func export(named name: String) -> Export? {
        exports.first { $0.descriptor.name == name }
    }

    /// A handshake for one client: exports it may not use carry their refusal.
    func handshake(forPeer peer: String, tls: TLSPolicy = .off) -> Handshake {
        let list = exports.map { export -> ExportDescriptor in
            var descriptor = export.descriptor
            descriptor.refusal = export.refusal(forPeer: peer)
            return descriptor
        }
        var rules: [String: ExportTLSRule] = [:]
        for export in exports {
            let c = export.configuration
            if c.tlsRequired || c.allowedPSKUsernames != nil {
                rules[export.name] = ExportTLSRule(tlsRequired: c.tlsRequired, allowedPSKUsernames: c.allowedPSKUsernames)
            }
        }
        return Handshake(exports: list, listAllowed: listAllowed, tls: tls, tlsRules: rules)
    }

    /// Binds connection `id` to the export it negotiated; nil if the export is gone or full by now, or
    /// was reopened by a reload with a different size, access mode or block sizes than the client was
    /// told (its requests were validated against what it was told).
    func attach(_ negotiated: ExportDescriptor, connection id: Int) -> Export? {
        guard let export = export(named: negotiated.name) else { return nil }
        let current = export.descriptor
        guard current.size == negotiated.size,
              current.flags.contains(.readOnly) == negotiated.flags.contains(.readOnly),
              current.flags.contains(.sendTrim) || !negotiated.flags.contains(.sendTrim),
              current.flags.contains(.sendWriteZeroes) || !negotiated.flags.contains(.sendWriteZeroes),
              current.minimumBlockSize == negotiated.minimumBlockSize,
              current.maximumBlockSize == negotiated.maximumBlockSize,
              current.metaContexts == negotiated.metaContexts else { return nil }
        guard export.usage.tryAttach(limit: export.configuration.maximumConnections) else { return nil }
        holders[id] = export
        return export
    }

    /// The export connection `id` held, now released.
    func detach(connection id: Int) -> Export? {
        guard let export = holders.removeValue(forKey: id) else { return nil }
        export.usage.detach()
        return export
    }

    func holder(of connection: Int) -> Export? { holders[connection] }

    func replaceAll(_ exports: [Export]) { self.exports = exports }
}
