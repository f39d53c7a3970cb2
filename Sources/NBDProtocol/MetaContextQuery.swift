// Which meta contexts a LIST_META_CONTEXT or SET_META_CONTEXT query names.
//
// proto.md leaves query syntax to each namespace, except that `base:` MUST list every base context and
// MUST select none, and that an unknown namespace is ignored. qemu's docs/interop/nbd.rst defines the
// `qemu:` namespace's: `qemu:` lists every qemu context and `qemu:dirty-bitmap:` every exposed bitmap;
// anything else is an exact name. An empty leaf is a wildcard for LIST only: proto.md says it SHOULD
// NOT select anything, so SET matches exact names alone.

public enum MetaContextQuery {
    /// The queries that list a whole namespace (or the bitmap part of `qemu:`) during LIST.
    public static let listWildcards: Set<String> = ["base:", "qemu:", MetaContextName.dirtyBitmapPrefix]

    /// Whether LIST_META_CONTEXT's `query` lists `context`.
    public static func listMatches(_ query: String, _ context: String) -> Bool {
        query == context || (listWildcards.contains(query) && context.hasPrefix(query))
    }

    /// Whether SET_META_CONTEXT's `query` selects `context`.
    public static func setMatches(_ query: String, _ context: String) -> Bool {
        query == context
    }
}
