// Where a backing file named in a header lives.

/// A relative backing file name is relative to the folder of the image that names it, not to the
/// current directory (qemu's path_combine).
public func resolveBackingPath(_ name: String, relativeTo image: String) -> String {
    if name.hasPrefix("/") { return name }
    guard let slash = image.lastIndex(of: "/") else { return name }
    return String(image[...slash]) + name
}
