// The test taps, read from the environment here and nowhere else: QNBD_TEST_FAULTS (fault rules, see
// UVCore's FaultInjector) and QNBD_TEST_WRITE_LOG (a log of every change to a writable qcow2 image,
// see QCow2Driver's WriteRecorder). The server reads them once at startup and ImageOpener installs them
// in the drivers it opens, so the drivers themselves never look at the environment and tests can
// install the same wrappers directly.

import BlockDevice
import QCow2Driver
import UVCore
#if canImport(Glibc)
import Glibc
#endif

struct TestTaps {
    /// The parsed rules, never asked itself: each opened image gets a fresh copy, since the rules
    /// count one driver's operations ("the 1st read fails").
    private let faultRules: FaultInjector?
    /// The log every writable qcow2 image opened is recorded to.
    let writeLog: WriteLog?

    /// No taps: what a server started outside the tests has.
    static var none: TestTaps { TestTaps(faultRules: nil, writeLog: nil) }

    /// The taps the environment asks for. Bad fault rules stop startup, naming the variable.
    static func fromEnvironment() throws(ServerError) -> TestTaps {
        var faultRules: FaultInjector?
        if let raw = getenv(FaultInjector.environmentVariable), raw.pointee != 0 {
            do {
                faultRules = try FaultInjector(rules: String(cString: raw))
            } catch {
                throw ServerError(BlockError(errno: EINVAL, message: error.description).description)
            }
        }
        let writeLog = getenv(WriteLog.environmentVariable).map { WriteLog(path: String(cString: $0)) }
        return TestTaps(faultRules: faultRules, writeLog: writeLog)
    }

    /// A new injector for one opened image, or nil without fault rules.
    func makeFaultInjector() -> FaultInjector? { faultRules?.fresh() }

    /// Whether the images are opened with fault rules.
    var injectsFaults: Bool { faultRules != nil }
}
