// What the handshake needs to know about an export: pure data, built by the server from a driver.

/// One export as clients see it during negotiation.
public struct ExportDescriptor: Sendable, Equatable {
    public var name: String
    public var description: String
    public var size: UInt64
    public var flags: TransmissionFlags
    public var minimumBlockSize: UInt32
    public var preferredBlockSize: UInt32
    public var maximumBlockSize: UInt32
    /// Meta contexts this export can answer BLOCK_STATUS for, in the order LIST reports them.
    public var metaContexts: [String]
    /// Set when this client may not use the export (the server's access policy): LIST leaves it out,
    /// INFO and GO answer NBD_REP_ERR_POLICY with this text, EXPORT_NAME closes.
    public var refusal: String?

    public init(name: String, description: String, size: UInt64, flags: TransmissionFlags,
                minimumBlockSize: UInt32 = 1, preferredBlockSize: UInt32 = 4096,
                maximumBlockSize: UInt32 = 32 << 20, metaContexts: [String] = [MetaContextName.baseAllocation]) {
        self.name = name
        self.description = description
        self.size = size
        self.flags = flags.union(.hasFlags)
        self.minimumBlockSize = minimumBlockSize
        self.preferredBlockSize = preferredBlockSize
        self.maximumBlockSize = maximumBlockSize
        self.metaContexts = metaContexts
    }

    /// The context id SET_META_CONTEXT gives a meta context: its position in `metaContexts`, plus one so
    /// that no id is 0, the id LIST_META_CONTEXT answers carry.
    public func metaContextID(of name: String) -> UInt32? {
        metaContexts.firstIndex(of: name).map { UInt32($0 + 1) }
    }
}

/// What a finished handshake agreed on; the transmission phase runs by it.
public struct NegotiatedSession: Sendable, Equatable {
    public var export: ExportDescriptor
    public var structuredReplies: Bool
    public var extendedHeaders: Bool
    /// Selected meta contexts, by id, in the order they were selected.
    public var metaContexts: [(id: UInt32, name: String)]
    /// Whether the client asked for NBD_INFO_BLOCK_SIZE, so it promises to respect the advertised sizes.
    public var clientHonoursBlockSize: Bool

    public static func == (a: NegotiatedSession, b: NegotiatedSession) -> Bool {
        a.export == b.export && a.structuredReplies == b.structuredReplies && a.extendedHeaders == b.extendedHeaders
            && a.metaContexts.map(\.id) == b.metaContexts.map(\.id) && a.metaContexts.map(\.name) == b.metaContexts.map(\.name)
            && a.clientHonoursBlockSize == b.clientHonoursBlockSize
    }
}
