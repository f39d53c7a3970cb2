// nbd-server's authfile: one IPv4 or IPv6 address or CIDR network per line, `#` starts a comment.
// A missing file allows everyone, an empty one nobody. Unix-socket clients are not network peers: the
// socket file's permissions decide who reaches them, so the list does not apply to them.

#if canImport(Glibc)
import Glibc
#endif

/// A client address as 16 bytes: IPv6, or IPv4 in its IPv4-mapped form so `127.0.0.1` in a file also
/// matches a client that reached a dual-stack `::` socket as `::ffff:127.0.0.1`.
struct PeerAddress: Equatable {
    var bytes: [UInt8]

    /// From an address text: "127.0.0.1", "::1", "[::1]".
    init?(_ text: String) {
        var bare = text
        if bare.hasPrefix("[") && bare.hasSuffix("]") { bare = String(bare.dropFirst().dropLast()) }
        var v4 = in_addr()
        if inet_pton(AF_INET, bare, &v4) == 1 {
            bytes = Array(repeating: 0, count: 10) + [0xff, 0xff] + withUnsafeBytes(of: v4) { Array($0) }
            return
        }
        var v6 = in6_addr()
        guard inet_pton(AF_INET6, bare, &v6) == 1 else { return nil }
        bytes = withUnsafeBytes(of: v6) { Array($0) }
    }

    /// From SocketStream.peerDescription ("127.0.0.1:5000", "[::1]:5000"); nil for unix peers.
    init?(peerDescription: String) {
        guard let colon = peerDescription.lastIndex(of: ":") else { return nil }
        self.init(String(peerDescription[..<colon]))
    }

    var isMappedIPv4: Bool { bytes[0..<10].allSatisfy { $0 == 0 } && bytes[10] == 0xff && bytes[11] == 0xff }
}

struct AccessList: Equatable {
    struct Network: Equatable {
        var address: PeerAddress
        /// Leading bits that must match, counted in the 16-byte form.
        var prefixBits: Int

        func contains(_ peer: PeerAddress) -> Bool {
            var bits = prefixBits
            var i = 0
            while bits >= 8 {
                if address.bytes[i] != peer.bytes[i] { return false }
                bits -= 8
                i += 1
            }
            guard bits > 0 else { return true }
            let mask = UInt8(0xff) << (8 - bits)
            return address.bytes[i] & mask == peer.bytes[i] & mask
        }
    }

    /// nil: everyone may connect (no file).
    var networks: [Network]?

    static let everyone = AccessList(networks: nil)

    func allows(peerDescription: String) -> Bool {
        guard let networks else { return true }
        guard let peer = PeerAddress(peerDescription: peerDescription) else {
            return peerDescription == "unix"
        }
        return networks.contains { $0.contains(peer) }
    }

    /// Reads an authfile; nil path means no list. Mistakes name the file and line.
    static func load(_ path: String?) throws(ServerError) -> AccessList {
        guard let path else { return .everyone }
        let text: String
        do {
            text = try ConfigFile.readText(path, referencedFrom: nil, what: "this authfile")
        } catch {
            if access(path, F_OK) != 0 && errno == ENOENT { return .everyone }
            throw ServerError(error.description)
        }
        return try parse(text, file: path)
    }

    static func parse(_ text: String, file: String) throws(ServerError) -> AccessList {
        var networks: [Network] = []
        var number = 0
        for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
            number += 1
            let line = (raw.firstIndex(of: "#").map { raw[..<$0] } ?? raw).trimmingSpaces
            if line.isEmpty { continue }
            let parts = line.split(separator: "/", maxSplits: 1).map(String.init)
            guard let address = PeerAddress(parts[0]) else {
                throw ServerError("\(file):\(number): \"\(line)\" is not an IP address or CIDR network (such as 192.168.1.0/24 or fd00::/8)")
            }
            let isV4 = !parts[0].contains(":")
            var bits = 128
            if parts.count == 2 {
                guard let n = Int(parts[1]), n >= 0, n <= (isV4 ? 32 : 128) else {
                    throw ServerError("\(file):\(number): \"\(parts[1])\" is not a prefix length for \(parts[0]) (0 to \(isV4 ? 32 : 128))")
                }
                bits = isV4 ? 96 + n : n
            }
            networks.append(Network(address: address, prefixBits: bits))
        }
        return AccessList(networks: networks)
    }
}
