// Becoming `user`/`group` (nbd-server's keys) once the sockets are bound and before any image opens,
// so a root-started service reads and writes images only as its own user.
//
// With only `user`, the user's primary group and supplementary groups are taken (initgroups), unlike
// nbd-server, which would keep root's group: a root group left behind would defeat the drop.

#if canImport(Glibc)
import Glibc
#endif

enum Privileges {
    static func drop(user: String?, group: String?, log: Logger) throws(ServerError) {
        guard user != nil || group != nil else { return }
        var gid: gid_t?
        if let group {
            guard let entry = getgrnam(group) else { throw ServerError("group \"\(group)\" does not exist; fix `group` in [generic]") }
            gid = entry.pointee.gr_gid
        }
        var uid: uid_t?
        if let user {
            guard let entry = getpwnam(user) else { throw ServerError("user \"\(user)\" does not exist; fix `user` in [generic]") }
            uid = entry.pointee.pw_uid
            if gid == nil { gid = entry.pointee.pw_gid }
        }
        if let gid {
            let groupsSet = user.map { initgroups($0, gid) } ?? withUnsafePointer(to: gid) { setgroups(1, $0) }
            guard groupsSet == 0, setgid(gid) == 0 else {
                throw ServerError("cannot change to group \(gid): \(String(cString: strerror(errno))) (run as root, or remove user/group)")
            }
        }
        if let uid {
            guard setuid(uid) == 0 else {
                throw ServerError("cannot change to user \(user!): \(String(cString: strerror(errno))) (run as root, or remove user/group)")
            }
            // A drop that could be undone is no drop.
            guard setuid(0) != 0 || uid == 0 else { throw ServerError("regained root after dropping to \(user!); refusing to run") }
        }
        log.info("running as uid \(getuid()) gid \(getgid())")
    }
}
