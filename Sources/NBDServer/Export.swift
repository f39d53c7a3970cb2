// An export ties a name and description to the one driver instance every connection shares.

import BlockDevice
import NBDProtocol

public final class Export {
    public let device: BlockDevice
    public let descriptor: ExportDescriptor

    public init(name: String, description: String, device: BlockDevice) {
        self.device = device
        let caps = device.capabilities
        var flags: TransmissionFlags = [.hasFlags]
        if !caps.writable { flags.insert(.readOnly) }
        if caps.canFlush { flags.insert(.sendFlush) }
        // FUA is harmless on a read-only export and clients (qemu) expect it wherever FLUSH is offered.
        if caps.canFlush { flags.insert(.sendFUA) }
        if caps.rotational { flags.insert(.rotational) }
        if caps.writable && caps.canTrim { flags.insert(.sendTrim) }
        if caps.writable && caps.canZero {
            flags.insert(.sendWriteZeroes)
            if caps.canFastZero { flags.insert(.sendFastZero) }
        }
        if caps.canMultiConn { flags.insert(.canMultiConn) }
        if caps.canCache { flags.insert(.sendCache) }
        var contexts = [MetaContextName.baseAllocation]
        if caps.knowsAllocationDepth { contexts.append(MetaContextName.allocationDepth) }
        self.descriptor = ExportDescriptor(
            name: name, description: description, size: device.size, flags: flags,
            minimumBlockSize: caps.minimumBlockSize, preferredBlockSize: max(caps.preferredBlockSize, 512),
            maximumBlockSize: Self.maximumPayload, metaContexts: contexts)
    }

    /// Largest READ or WRITE we serve: 32 MiB, what every client stays within.
    public static let maximumPayload: UInt32 = 32 << 20
}

/// The exports a server offers. Connections read it when they start negotiating and resolve the
/// export a client chose by name, so the set can change (a reload) without touching live connections.
public final class ExportTable {
    public private(set) var exports: [Export]

    public init(_ exports: [Export]) {
        self.exports = exports
    }

    /// What the handshake shows: every export, in configuration order.
    public var descriptors: [ExportDescriptor] { exports.map(\.descriptor) }

    public func export(named name: String) -> Export? {
        exports.first { $0.descriptor.name == name }
    }
}
