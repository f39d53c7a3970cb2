// Errno values and names for the pure module.

/// Errno values used without importing Glibc into the pure module (Linux numbering, as NBD's).
let EIO_: Int32 = 5
let EROFS_: Int32 = 30
let ENOSPC_: Int32 = 28
let EDQUOT_: Int32 = 122

/// "EIO (errno 5)": the symbol operators search for, and the number for the rest.
func errnoName(_ e: Int32) -> String {
    let names: [Int32: String] = [1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 27: "EFBIG", 28: "ENOSPC",
                                  30: "EROFS", 61: "ENODATA", 117: "EUCLEAN", 122: "EDQUOT"]
    return names[e].map { "\($0) (errno \(e))" } ?? "errno \(e)"
}
