// The config file parser: nbd-server's dialect, every key, includedir, and exact FILE:LINE messages
// for every kind of mistake.

import Foundation
@testable import NBDServer
import Testing

@Suite struct ConfigFileTests {
    private func parse(_ text: String, file: String = "/etc/qnbd/test.conf") throws(ConfigError) -> ServerConfiguration {
        try ConfigFile.parse(text, file: file)
    }

    /// The message a text fails with, or nil if it loads.
    private func failure(_ text: String, file: String = "/etc/qnbd/test.conf") -> String? {
        do {
            _ = try parse(text, file: file)
            return nil
        } catch {
            return error.description
        }
    }

    @Test func nbdServerManPageExampleLoads() throws {
        let c = try parse("""
            [generic]
            \tuser = nbd
            \tgroup = nbd
            [export]
            \texportname = /export/blkdev
            \tauthfile = /etc/nbd-server/allow
            """)
        #expect(c.user == "nbd" && c.group == "nbd")
        #expect(c.exports.count == 1)
        #expect(c.exports[0].name == "export")
        #expect(c.exports[0].imagePath == "/export/blkdev")
        #expect(c.exports[0].authFile == "/etc/nbd-server/allow")
        #expect(c.exports[0].origin == "/etc/qnbd/test.conf:4")
        #expect(c.listen == [.tcp(host: "::", port: 10809)])
        #expect(c.allowList == false, "nbd-server answers LIST only with allowlist = true")
    }

    @Test func everyKeyHasItsMeaning() throws {
        let c = try parse("""
            # comment
              # indented comment
            [generic]
            port = 10810
            listenaddr = 127.0.0.1, ::1
            unixsock = /run/qnbd.sock
            duallisten = true
            user = nobody
            group = nogroup
            allowlist = true
            maxconnections = 7
            max_threads = 3
            handshake-timeout = 5
            send-timeout = 0

            [disk]
            exportname = /srv/disk.img
            readonly = true
            authfile = allow
            maxconnections = 2
            trim = false
            flush = true
            fua = false
            rotational = true
            listenaddr = 10.0.0.1
            format = qcow2
            description = a disk  with  spaces
            cache-size = 16M
            """)
        #expect(c.listen == [.unix(path: "/run/qnbd.sock"), .tcp(host: "127.0.0.1", port: 10810), .tcp(host: "::1", port: 10810)])
        #expect(c.user == "nobody" && c.group == "nogroup")
        #expect(c.allowList)
        #expect(c.maximumConnections == 7)
        #expect(c.threadPoolSize == 3)
        #expect(c.connectionLimits.handshakeTimeoutMilliseconds == 5000)
        #expect(c.connectionLimits.sendTimeoutMilliseconds == 0)
        let e = c.exports[0]
        #expect(e.name == "disk" && e.imagePath == "/srv/disk.img" && e.readOnly)
        #expect(e.authFile == "/etc/qnbd/allow", "relative paths are relative to the file's directory")
        #expect(e.maximumConnections == 2)
        #expect(e.trim == false && e.flush == true && e.fua == false && e.rotational == true)
        #expect(e.format == .qcow2)
        #expect(e.description == "a disk  with  spaces")
        #expect(e.cacheBytes == 16 << 20)
        #expect(c.configFile == "/etc/qnbd/test.conf")
    }

    @Test func unixSocketAloneReplacesTCP() throws {
        let c = try parse("[generic]\nunixsock = /run/q.sock\n[d]\nexportname = /d\n")
        #expect(c.listen == [.unix(path: "/run/q.sock")])
        #expect(c.exports[0].trim == nil && c.exports[0].flush == nil, "unset features keep what the driver can do")
    }

    @Test func unimplementedNbdServerKeysStopWithFileLineAndAdvice() {
        #expect(failure("[generic]\n[d]\nexportname = /d\ncopyonwrite = true\n")
                == "/etc/qnbd/test.conf:4: key \"copyonwrite\" (nbd-server: writes go to a diff file dropped at disconnect) is not implemented by qnbd; set it to false or remove the line")
        #expect(failure("[generic]\n[d]\nexportname = /d\nprerun = /bin/true %s\n")
                == "/etc/qnbd/test.conf:4: key \"prerun\" (nbd-server: a command run before serving a client) is not implemented by qnbd; remove the line")
        #expect(failure("[generic]\noldstyle = true\n[d]\nexportname = /d\n")?.hasPrefix("/etc/qnbd/test.conf:2: key \"oldstyle\"") == true)
        #expect(failure("[generic]\ncertfile = /etc/cert.pem\n[d]\nexportname = /d\n")?.contains("TLS") == true)
        // A boolean nbd-server key set to false asks for nothing.
        #expect(failure("[generic]\n[d]\nexportname = /d\ncopyonwrite = false\nsync = false\n") == nil)
    }

    @Test func typosAreCaughtWithTheClosestKey() {
        #expect(failure("[generic]\n[d]\nexportnme = /d\n")
                == "/etc/qnbd/test.conf:3: unknown key \"exportnme\" in export [d]; did you mean \"exportname\"?")
        #expect(failure("[generic]\nallowlst = true\n[d]\nexportname = /d\n")
                == "/etc/qnbd/test.conf:2: unknown key \"allowlst\" in [generic]; did you mean \"allowlist\"?")
        #expect(failure("[generic]\nfrobnicate = 1\n[d]\nexportname = /d\n")?.contains("the keys there are port, listenaddr") == true)
    }

    @Test func keysInTheWrongSectionSayWhere() {
        #expect(failure("[generic]\nreadonly = true\n[d]\nexportname = /d\n")
                == "/etc/qnbd/test.conf:2: key \"readonly\" belongs in an export section, not [generic]")
        #expect(failure("[generic]\n[d]\nexportname = /d\nuser = nbd\n")
                == "/etc/qnbd/test.conf:4: key \"user\" belongs in [generic], not in export [d]")
    }

    @Test func valuesOfTheWrongTypeNameTheKey() {
        #expect(failure("[generic]\n[d]\nexportname = /d\nreadonly = yes\n")
                == "/etc/qnbd/test.conf:4: key \"readonly\" must be true or false, not \"yes\"")
        #expect(failure("[generic]\nport = http\n[d]\nexportname = /d\n")
                == "/etc/qnbd/test.conf:2: key \"port\" must be a whole number from 0 to 65535, not \"http\"")
        #expect(failure("[generic]\n[d]\nexportname = /d\nformat = vmdk\n")?.hasPrefix("/etc/qnbd/test.conf:4: key \"format\" must be raw or qcow2") == true)
        #expect(failure("[generic]\n[d]\nexportname = /d\ncache-size = lots\n")?.hasPrefix("/etc/qnbd/test.conf:4: key \"cache-size\"") == true)
        #expect(failure("[generic]\nmaxconnections = 0\n[d]\nexportname = /d\n")?.hasPrefix("/etc/qnbd/test.conf:2: key \"maxconnections\"") == true)
    }

    @Test func structuralMistakes() {
        #expect(failure("[d]\nexportname = /d\n") == "/etc/qnbd/test.conf:1: the first section must be [generic] (it may be empty), as in nbd-server's config")
        #expect(failure("port = 1\n[generic]\n") == "/etc/qnbd/test.conf:1: key \"port\" comes before any section; start the file with [generic]")
        #expect(failure("[generic]\n[d]\nexportname = /d\n[d]\nexportname = /e\n") == "/etc/qnbd/test.conf:4: section [d] appears twice (first at line 2)")
        #expect(failure("[generic]\n[d]\nexportname = /d\nreadonly = true\nreadonly = false\n")
                == "/etc/qnbd/test.conf:5: key \"readonly\" is set twice in [d] (first at line 4); keep one")
        #expect(failure("[generic]\n[d]\nreadonly = true\n") == "/etc/qnbd/test.conf:2: export [d] has no exportname; add exportname = /path/to/image")
        #expect(failure("[generic]\n[d\n")?.hasPrefix("/etc/qnbd/test.conf:2: a section header") == true)
        #expect(failure("[generic]\n[d]\njust words\n")?.hasPrefix("/etc/qnbd/test.conf:3: expected \"key = value\"") == true)
        #expect(failure("[generic]\n") == "/etc/qnbd/test.conf: no exports; add a section such as [disk] with exportname = /path/to/image")
        #expect(failure("[generic]\n[d]\nexportname = /d # not a comment\n") == nil, "comments cannot follow values, as in nbd-server")
    }

    @Test func includedirAddsExportsInNameOrderWithTheirOwnFileNames() throws {
        let dir = NSTemporaryDirectory() + "qnbd-conf-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir + "/conf.d", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try "[zeta]\nexportname = z.img\n".write(toFile: dir + "/conf.d/20-z.conf", atomically: true, encoding: .utf8)
        try "# first\n[alpha]\nexportname = /a.img\nreadonly = true\n".write(toFile: dir + "/conf.d/10-a.conf", atomically: true, encoding: .utf8)
        try "[ignored]\nexportname = /x\n".write(toFile: dir + "/conf.d/notes.txt", atomically: true, encoding: .utf8)
        let main = dir + "/main.conf"
        let c = try ConfigFile.parse("[generic]\nincludedir = conf.d\n[main]\nexportname = /m.img\n", file: main)
        #expect(c.exports.map(\.name) == ["main", "alpha", "zeta"])
        #expect(c.exports[2].imagePath == dir + "/conf.d/z.img")
        #expect(c.exports[1].origin == dir + "/conf.d/10-a.conf:2")

        try "[alpha]\nexportname = /a.img\nbogus = 1\n".write(toFile: dir + "/conf.d/10-a.conf", atomically: true, encoding: .utf8)
        #expect(failure("[generic]\nincludedir = conf.d\n", file: main)?.hasPrefix(dir + "/conf.d/10-a.conf:3: unknown key \"bogus\"") == true)
        try "[generic]\nport = 1\n".write(toFile: dir + "/conf.d/10-a.conf", atomically: true, encoding: .utf8)
        #expect(failure("[generic]\nincludedir = conf.d\n", file: main) == dir + "/conf.d/10-a.conf:1: an included file cannot contain [generic]; move those keys to the main file")
        try "[zeta]\nexportname = /b\n".write(toFile: dir + "/conf.d/10-a.conf", atomically: true, encoding: .utf8)
        #expect(failure("[generic]\nincludedir = conf.d\n", file: main) == dir + "/conf.d/20-z.conf:1: export [zeta] is defined twice (first at \(dir)/conf.d/10-a.conf:1); rename one")
        #expect(failure("[generic]\nincludedir = missing.d\n[m]\nexportname = /m\n", file: main)?.hasPrefix(main + ":2: includedir \(dir)/missing.d cannot be read") == true)
    }

    @Test func loadNamesAMissingFile() {
        #expect(throws: ConfigError.self) { try ConfigFile.load("/nonexistent/qnbd.conf") }
    }

    /// The messages of the capped whole-file read, worded for a config file.
    @Test func unreadableOversizedAndBinaryFilesAreNamed() throws {
        let dir = NSTemporaryDirectory() + "qnbd-conf-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir + "/conf.d", withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        func loadFailure(_ path: String) -> String? {
            do {
                _ = try ConfigFile.load(path)
                return nil
            } catch {
                return error.description
            }
        }
        #expect(loadFailure(dir + "/none.conf") == dir + "/none.conf: cannot read the config file: No such file or directory (as uid \(getuid()))")
        #expect(loadFailure(dir) == dir + ": cannot read: Is a directory")

        let big = dir + "/big.conf"
        #expect(FileManager.default.createFile(atPath: big, contents: Data(repeating: 0x23, count: (16 << 20) + 1)))
        #expect(loadFailure(big) == big + ": larger than 16 MiB; is this a config file?")

        let binary = dir + "/binary.conf"
        #expect(FileManager.default.createFile(atPath: binary, contents: Data([0x5b, 0xff, 0x5d])))
        #expect(loadFailure(binary) == binary + ": is not UTF-8 text")

        // An included file that cannot be opened is blamed on the includedir line that named it.
        #expect(symlink(dir + "/nowhere", dir + "/conf.d/dangling.conf") == 0)
        #expect(failure("[generic]\nincludedir = conf.d\n", file: dir + "/main.conf")
                == dir + "/main.conf:2: cannot read \(dir)/conf.d/dangling.conf: No such file or directory")
    }

    @Test func authfileSemantics() throws {
        let list = try AccessList.parse("""
            127.0.0.1
            # comment
            10.1.0.0/16   # trailing comment
            ::1
            fd00::/8

            """, file: "allow")
        #expect(list.allows(peerDescription: "127.0.0.1:5000"))
        #expect(!list.allows(peerDescription: "127.0.0.2:5000"))
        #expect(list.allows(peerDescription: "10.1.200.3:1"))
        #expect(!list.allows(peerDescription: "10.2.0.1:1"))
        #expect(list.allows(peerDescription: "[::ffff:127.0.0.1]:5000"), "IPv4 clients of a dual-stack socket")
        #expect(list.allows(peerDescription: "[::1]:5000"))
        #expect(list.allows(peerDescription: "[fd12::5]:1"))
        #expect(!list.allows(peerDescription: "[fe80::1]:1"))
        #expect(list.allows(peerDescription: "unix"), "unix sockets are guarded by their file mode")
        #expect(try !AccessList.parse("", file: "allow").allows(peerDescription: "127.0.0.1:1"), "an empty file allows nobody")
        #expect(try AccessList.load("/nonexistent/allow").allows(peerDescription: "1.2.3.4:1"), "a missing file allows everyone")
        #expect(throws: ServerError.self) { try AccessList.parse("10.0.0.0/33\n", file: "allow") }
        do {
            _ = try AccessList.parse("127.0.0.1\nlocalhost\n", file: "allow")
        } catch {
            #expect(error.description.hasPrefix("allow:2: \"localhost\" is not an IP address"))
        }
    }
}
