// LIST_META_CONTEXT and SET_META_CONTEXT on an export that serves persistent bitmaps: qemu's
// docs/interop/nbd.rst (`qemu:` lists every qemu context, `qemu:dirty-bitmap:` every exposed bitmap)
// and proto.md (no queries lists everything; a bare namespace selects nothing; unknown namespaces and
// names are ignored).

import Testing
@testable import NBDProtocol

private let b0 = "qemu:dirty-bitmap:b0"
private let backup = "qemu:dirty-bitmap:backup:daily"

@Suite("Handshake: qemu:dirty-bitmap contexts")
struct DirtyBitmapContextTests {
    /// base, depth, then two bitmaps, one whose name has a colon in it.
    static let disk = ExportDescriptor(name: "disk", description: "", size: 1 << 30, flags: Fixture.rwFlags,
                                       metaContexts: [Fixture.base, Fixture.depth, b0, backup])
    /// A raw-like export: base:allocation and one bitmap, no allocation depth.
    static let flat = ExportDescriptor(name: "flat", description: "", size: 1 << 20, flags: [.readOnly],
                                       metaContexts: [Fixture.base, "qemu:dirty-bitmap:only"])

    static func client() -> Client {
        var c = Client([disk, flat])
        _ = c.send(.structuredReply)
        return c
    }

    static func listed(_ c: inout Client, _ export: String = "disk", _ queries: [String]) -> [String]? {
        guard let replies = parseReplies(c.send(.listMetaContext, metaPayload(export, queries)).proceedReply ?? []),
              replies.last?.type == NBDOptionReply.ack.rawValue else { return nil }
        return replies.dropLast().map { r in
            #expect(r.type == NBDOptionReply.metaContext.rawValue)
            #expect(readBE(r.payload[0..<4]) == 0, "LIST ids are reserved and zero")
            return String(decoding: r.payload.dropFirst(4), as: UTF8.self)
        }
    }

    @Test("LIST answers qemu-nbd's queries", arguments: [
        ([], [Fixture.base, Fixture.depth, b0, backup]),
        (["qemu:"], [Fixture.depth, b0, backup]),
        (["qemu:dirty-bitmap:"], [b0, backup]),
        (["base:"], [Fixture.base]),
        ([b0], [b0]),
        ([backup], [backup]),
        (["qemu:dirty-bitmap:backup:"], []),          // only the bare prefix is a wildcard
        (["qemu:dirty-bitmap:b"], []),                // no prefix matching of leaf names
        (["qemu:dirty-bitmap:nope"], []),
        (["qemu:dirty-bitmap"], []),
        (["qemu:allocation-depth:"], []),
        (["QEMU:"], []),
        (["x-foo:", "nbdkit:"], []),
        (["qemu:dirty-bitmap:", "qemu:"], [Fixture.depth, b0, backup]),
        ([b0, "qemu:dirty-bitmap:"], [b0, backup]),
        (["base:", "qemu:dirty-bitmap:"], [Fixture.base, b0, backup]),
    ])
    func list(queries: [String], expected: [String]) {
        var c = Self.client()
        #expect(Self.listed(&c, "disk", queries) == expected)
    }

    @Test func listOnAnExportWithoutAllocationDepth() {
        var c = Self.client()
        #expect(Self.listed(&c, "flat", ["qemu:"]) == ["qemu:dirty-bitmap:only"])
        #expect(Self.listed(&c, "flat", []) == [Fixture.base, "qemu:dirty-bitmap:only"])
        #expect(Self.listed(&c, "flat", [b0]) == [])
    }

    @Test func setSelectsBitmapsByExactNameWithStableIds() {
        var c = Self.client()
        let action = c.send(.setMetaContext, metaPayload("disk", [backup, "qemu:dirty-bitmap:", "qemu:", Fixture.base,
                                                                  "qemu:dirty-bitmap:b", b0, backup]))
        let expected = metaContextReply(.setMetaContext, id: 4, backup) + metaContextReply(.setMetaContext, id: 1, Fixture.base)
            + metaContextReply(.setMetaContext, id: 3, b0) + rep(.setMetaContext, .ack)
        #expect(action == .proceed(reply: expected))
        guard case .startTransmission(_, let s) = c.send(.go, infoPayload("disk")) else {
            Issue.record("GO failed")
            return
        }
        #expect(s.metaContexts.map(\.name) == [backup, Fixture.base, b0])
        #expect(s.metaContexts.map(\.id) == [4, 1, 3])
    }

    @Test func setWithOnlyWildcardsSelectsNothing() {
        var c = Self.client()
        #expect(c.send(.setMetaContext, metaPayload("disk", ["qemu:", "qemu:dirty-bitmap:", "base:"]))
                    == .proceed(reply: rep(.setMetaContext, .ack)))
    }

    @Test func aBitmapOfAnotherExportIsNotSelected() {
        var c = Self.client()
        #expect(c.send(.setMetaContext, metaPayload("flat", [b0, "qemu:dirty-bitmap:only"]))
                    == .proceed(reply: metaContextReply(.setMetaContext, id: 2, "qemu:dirty-bitmap:only") + rep(.setMetaContext, .ack)))
    }

    @Test func contextNamesAndBitmapNames() {
        #expect(MetaContextName.dirtyBitmap("a:b") == "qemu:dirty-bitmap:a:b")
        #expect(MetaContextName.bitmapName(of: "qemu:dirty-bitmap:a:b") == "a:b")
        #expect(MetaContextName.bitmapName(of: "qemu:dirty-bitmap:") == "")
        #expect(MetaContextName.bitmapName(of: Fixture.depth) == nil)
        #expect(MetaContextName.bitmapName(of: "base:allocation") == nil)
    }
}
