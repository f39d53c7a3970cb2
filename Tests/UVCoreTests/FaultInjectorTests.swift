// The QNBD_TEST_FAULTS rules: which operations they pick, and the rules they refuse.

import Glibc
import Testing
@testable import UVCore

@Suite struct FaultInjectorTests {
    @Test func nthPicksOneOperationOfItsKind() throws {
        let f = try FaultInjector(rules: "write,errno=EIO,nth=2")
        #expect(f.fault(.read, offset: 0, length: 10) == nil)
        #expect(f.fault(.write, offset: 0, length: 10) == nil)
        #expect(f.fault(.sync) == nil)
        #expect(f.fault(.write, offset: 0, length: 10) == EIO)
        #expect(f.fault(.write, offset: 0, length: 10) == nil)
    }

    @Test func fromPicksEveryOperationFromTheNth() throws {
        let f = try FaultInjector(rules: "sync,errno=5,from=2")
        #expect((0..<4).map { _ in f.fault(.sync) } == [nil, EIO, EIO, EIO])
    }

    @Test func aRangeSelectsOperationsTouchingItAndOrdinalsCountOnlyThose() throws {
        let f = try FaultInjector(rules: "write, errno=ENOSPC, offset=0x10000+0x10000, nth=2; punch,errno=EDQUOT,offset=100-200")
        #expect(f.fault(.write, offset: 0, length: 0x10000) == nil)         // ends where the range starts
        #expect(f.fault(.write, offset: 0xffff, length: 2) == nil)           // first one touching it
        #expect(f.fault(.write, offset: 0x20000, length: 512) == nil)        // past it
        #expect(f.fault(.write, offset: 0x1fe00, length: 512) == ENOSPC)     // second one touching it
        #expect(f.fault(.punch, offset: 199, length: 1) == EDQUOT)
        #expect(f.fault(.punch, offset: 200, length: 100) == nil)
    }

    @Test func whileRulesApplyOnlyWhileTheFileExists() throws {
        let path = "/tmp/qnbd-fault-test-\(getpid())"
        unlink(path)
        defer { unlink(path) }
        let f = try FaultInjector(rules: "read,errno=EIO,nth=1,while=\(path)")
        #expect(f.fault(.read, offset: 0, length: 1) == nil)
        #expect(f.fault(.read, offset: 0, length: 1) == nil)
        close(open(path, O_CREAT | O_WRONLY, 0o600))
        #expect(f.fault(.read, offset: 0, length: 1) == EIO)   // the first read once armed
        #expect(f.fault(.read, offset: 0, length: 1) == nil)
    }

    @Test(arguments: ["write", "write,nth=1", "fsync,errno=EIO", "write,errno=EWHAT", "write,errno=EIO,nth=0",
                      "write,errno=EIO,offset=10", "write,errno=EIO,offset=20-10", "sync,errno=EIO,offset=0+1",
                      "write,errno=EIO,colour=red", "write,errno"])
    func malformedRulesAreRefused(rule: String) {
        #expect(throws: FaultInjector.RuleError.self) { try FaultInjector(rules: rule) }
    }
}
