// The service pieces that need no server: NOTIFY_SOCKET datagrams (path and abstract), the export
// flags nbd-server's trim/flush/fua/rotational keys shape, per-peer handshakes from the export table
// (authfile refusals and maxconnections), and the same-image check.

import Foundation
import NBDProtocol
@testable import NBDServer
import Testing
#if canImport(Glibc)
import Glibc
#endif

@Suite struct ServiceTests {
    /// A datagram socket bound at `address` ("@name" for abstract), and what it received.
    private func receiveNotification(at address: String, sending state: String) throws -> String {
        let fd = socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0)
        #expect(fd >= 0)
        defer { close(fd) }
        var sa = sockaddr_un()
        sa.sun_family = sa_family_t(AF_UNIX)
        var bytes = Array(address.utf8)
        if bytes[0] == UInt8(ascii: "@") { bytes[0] = 0 }
        withUnsafeMutableBytes(of: &sa.sun_path) { $0.copyBytes(from: bytes) }
        let length = socklen_t(MemoryLayout<sockaddr_un>.offset(of: \.sun_path)! + bytes.count)
        let bound = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) } }
        #expect(bound == 0)
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))

        setenv("NOTIFY_SOCKET", address, 1)
        let notify = SystemdNotify.fromEnvironment()
        #expect(getenv("NOTIFY_SOCKET") == nil, "no child may inherit it")
        #expect(notify.isActive)
        #expect(notify.send(state) == nil)
        var buffer = [UInt8](repeating: 0, count: 512)
        let n = buffer.withUnsafeMutableBytes { recv(fd, $0.baseAddress, $0.count, 0) }
        #expect(n > 0)
        return String(decoding: buffer.prefix(max(n, 0)), as: UTF8.self)
    }

    @Test func notifyReachesPathAndAbstractSockets() throws {
        let path = NSTemporaryDirectory() + "qnbd-notify-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { unlink(path) }
        #expect(try receiveNotification(at: path, sending: "READY=1\nMAINPID=7") == "READY=1\nMAINPID=7")
        #expect(try receiveNotification(at: "@qnbd-test-\(getpid())-\(UInt32.random(in: 0...UInt32.max))", sending: "STOPPING=1") == "STOPPING=1")
        unsetenv("NOTIFY_SOCKET")
        let quiet = SystemdNotify.fromEnvironment()
        #expect(!quiet.isActive)
        #expect(quiet.send("READY=1") == nil, "without NOTIFY_SOCKET sending is a no-op")
    }

    @Test func featureKeysShapeTheAdvertisedFlags() {
        var c = ExportConfiguration(name: "d", imagePath: "/d")
        let all = Export(configuration: c, device: MemoryDevice()).descriptor.flags
        #expect(all.isSuperset(of: [.sendTrim, .sendFlush, .sendFUA]))
        #expect(!all.contains(.rotational))
        c.trim = false
        c.fua = false
        c.rotational = true
        let some = Export(configuration: c, device: MemoryDevice()).descriptor.flags
        #expect(!some.contains(.sendTrim) && !some.contains(.sendFUA))
        #expect(some.contains(.sendFlush) && some.contains(.rotational))
        c.flush = false
        c.fua = nil
        let none = Export(configuration: c, device: MemoryDevice()).descriptor.flags
        #expect(!none.contains(.sendFlush) && !none.contains(.sendFUA), "no FUA without FLUSH")
    }

    @Test func handshakePerPeerCarriesRefusals() throws {
        var limited = ExportConfiguration(name: "limited", imagePath: "/l")
        limited.maximumConnections = 1
        let guarded = Export(configuration: ExportConfiguration(name: "guarded", imagePath: "/g"), device: MemoryDevice())
        guarded.access = try AccessList.parse("192.0.2.0/24\n", file: "allow")
        let table = ExportTable([Export(configuration: limited, device: MemoryDevice()), guarded])

        var stranger = table.handshake(forPeer: "203.0.113.9:4000")
        _ = stranger.receive([0, 0, 0, 3])
        let listed = listNames(&stranger)
        #expect(listed == ["limited"], "LIST leaves out what this peer may not use")

        var friend = table.handshake(forPeer: "192.0.2.7:4000")
        _ = friend.receive([0, 0, 0, 3])
        #expect(listNames(&friend) == ["limited", "guarded"])

        let limitedDescriptor = table.export(named: "limited")!.descriptor
        #expect(table.attach(limitedDescriptor, connection: 1) != nil)
        #expect(table.attach(limitedDescriptor, connection: 2) == nil, "maxconnections")
        var late = table.handshake(forPeer: "192.0.2.7:4001")
        _ = late.receive([0, 0, 0, 3])
        #expect(listNames(&late) == ["guarded"])
        #expect(table.detach(connection: 1)?.name == "limited")
        #expect(table.attach(limitedDescriptor, connection: 3) != nil)
        var resized = limitedDescriptor
        resized.size *= 2
        #expect(table.attach(resized, connection: 4) == nil, "told another size than the export has now")
        var writable = guarded.descriptor
        writable.flags.insert(.readOnly)
        #expect(table.attach(writable, connection: 5) == nil, "told another access mode")

        table.listAllowed = false
        var closed = table.handshake(forPeer: "192.0.2.7:4002")
        _ = closed.receive([0, 0, 0, 3])
        guard case .proceed(let reply) = closed.receive(optionHeader(3, 0)) else {
            Issue.record("LIST closed the connection")
            return
        }
        let type = reply[12..<16].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        #expect(type == 0x8000_0002, "allowlist = false: NBD_REP_ERR_POLICY")
    }

    private func optionHeader(_ option: UInt32, _ length: UInt32) -> [UInt8] {
        var bytes: [UInt8] = [0x49, 0x48, 0x41, 0x56, 0x45, 0x4F, 0x50, 0x54]
        for shift in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: option >> UInt32(shift))) }
        for shift in stride(from: 24, through: 0, by: -8) { bytes.append(UInt8(truncatingIfNeeded: length >> UInt32(shift))) }
        return bytes
    }

    /// Sends LIST and decodes the SERVER replies' names.
    private func listNames(_ handshake: inout Handshake) -> [String] {
        guard case .proceed(let reply) = handshake.receive(optionHeader(3, 0)) else { return [] }
        var names: [String] = []
        var i = 0
        while i + 20 <= reply.count {
            let type = reply[i + 12..<i + 16].reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
            let length = Int(reply[i + 16..<i + 20].reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
            if type == 2 {
                let nameLength = Int(reply[i + 20..<i + 24].reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
                names.append(String(decoding: reply[i + 24..<i + 24 + nameLength], as: UTF8.self))
            }
            i += 20 + length
        }
        return names
    }

    @Test func sameImageTwiceIsRefusedUnlessBothReadOnly() throws {
        let path = NSTemporaryDirectory() + "qnbd-same-\(getpid())-\(UInt32.random(in: 0...UInt32.max)).img"
        #expect(FileManager.default.createFile(atPath: path, contents: Data(count: 512)))
        defer { unlink(path) }
        var a = ExportConfiguration(name: "a", imagePath: path)
        var b = ExportConfiguration(name: "b", imagePath: path)
        #expect(throws: ServerError.self) { try Server.checkImageConflicts([a, b]) }
        a.readOnly = true
        #expect(throws: ServerError.self) { try Server.checkImageConflicts([a, b]) }
        b.readOnly = true
        try Server.checkImageConflicts([a, b])
    }
}
