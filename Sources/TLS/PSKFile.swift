// PSKFile: psktool's key file, `username:hexkey` per line. Parsed here rather than by
// gnutls_psk_set_server_credentials_file so that a bad line stops startup with its line number and
// so that an allowed-username list can be applied.

/// One pre-shared key.
public struct PSKEntry: Sendable, Equatable {
    public let username: String
    public let key: [UInt8]

    public init(username: String, key: [UInt8]) {
        self.username = username
        self.key = key
    }
}

/// Parses psktool's format. Blank lines and lines starting with `#` are skipped; a username is
/// everything before the last colon (psktool refuses colons in names, so there is at most one).
public func parsePSKFile(_ text: String, name: String) throws(TLSSetupError) -> [PSKEntry] {
    var entries: [PSKEntry] = []
    var seen = Set<String>()
    // isNewline: Swift reads "\r\n" as one Character, which a split on "\n" would not see.
    for (index, line) in text.split(omittingEmptySubsequences: false, whereSeparator: \.isNewline).enumerated() {
        if line.isEmpty || line.hasPrefix("#") { continue }
        let where_ = "\(name):\(index + 1)"
        guard let colon = line.lastIndex(of: ":") else {
            throw .badFile(path: where_, reason: "expected username:hexkey")
        }
        let username = String(line[..<colon])
        let hex = line[line.index(after: colon)...]
        guard !username.isEmpty else { throw .badFile(path: where_, reason: "empty username") }
        guard let key = decodeHex(hex), !key.isEmpty else {
            throw .badFile(path: where_, reason: "the key is not an even number of hex digits")
        }
        guard seen.insert(username).inserted else {
            throw .badFile(path: where_, reason: "username \(username) appears twice")
        }
        entries.append(PSKEntry(username: username, key: key))
    }
    if entries.isEmpty { throw .badFile(path: name, reason: "no keys") }
    return entries
}

private func decodeHex(_ text: Substring) -> [UInt8]? {
    let digits = Array(text.utf8)
    guard digits.count % 2 == 0 else { return nil }
    var bytes: [UInt8] = []
    bytes.reserveCapacity(digits.count / 2)
    var i = 0
    while i < digits.count {
        guard let high = hexValue(digits[i]), let low = hexValue(digits[i + 1]) else { return nil }
        bytes.append(high << 4 | low)
        i += 2
    }
    return bytes
}

private func hexValue(_ digit: UInt8) -> UInt8? {
    switch digit {
    case UInt8(ascii: "0")...UInt8(ascii: "9"): digit - UInt8(ascii: "0")
    case UInt8(ascii: "a")...UInt8(ascii: "f"): digit - UInt8(ascii: "a") + 10
    case UInt8(ascii: "A")...UInt8(ascii: "F"): digit - UInt8(ascii: "A") + 10
    default: nil
    }
}
