// A test-only tap that logs every change the driver makes to the top image file, so that
// scripts/powercut can rebuild what the disk could hold after a power cut at any moment.
//
// A test installs it by opening the driver with a `WriteLog`; the server does so when
// QNBD_TEST_WRITE_LOG=/path/to/log is set (its TestTaps read the variable once at startup). The driver
// makes the recorder when it opens a writable image, before its first change to the file; without a
// `WriteLog` it holds no recorder and pays one nil check per action.
//
// Why issue and completion are separate records: durability is decided by concurrency. A write is
// only guaranteed durable by a sync that *started* after the write *completed*; a write that was
// issued but not yet covered may or may not be on disk. So the log keeps both edges of every write,
// punch and sync, in the order the loop saw them. Client FLUSH requests and FUA writes, and their
// completions, are logged in the same order, so the checker knows which host syncs they waited for.
//
// Format (little-endian), after an 8-byte magic "QNBDWLG1": records of 32 bytes
//   kind u8, 3 zero bytes, id u32, offset u64, length u64, value i64
// and a write-issue record is followed by its `length` data bytes. Kinds and fields:
//   1 open          offset = file size when opened
//   2 write issued  id = token, offset, length, value = 1 for a FUA (RWF_DSYNC) write; data follows
//   3 punch issued  id = token, offset, length
//   4 sync started  id = token
//   5 completed     id = token of a write, punch or sync; value = result (bytes, 0 or -errno)
//   6 flush asked   id = sequence number of a client flush (1, 2, ...)
//   7 flush done    id = that sequence number; value = 0 or errno
//   8 FUA asked     id = sequence number of a client write with FUA (1, 2, ...)
//   9 FUA done      id = that sequence number; value = 0 or errno
// Written with plain write(2) on the loop thread: slow, and only ever used by tests.

import BlockDevice
import QCow2
import SystemCalls
#if canImport(Glibc)
import Glibc
#endif

/// A request to log a writable image's changes to the file at `path` (made anew: truncated if it exists).
public struct WriteLog: Sendable, Equatable {
    /// The variable the server's test taps read it from, named by the log's error messages too.
    public static let environmentVariable = "QNBD_TEST_WRITE_LOG"
    public let path: String
    public init(path: String) { self.path = path }
}

final class WriteRecorder {
    private enum Kind: UInt8 {
        case open = 1, writeIssued, punchIssued, syncStarted, completed, flushAsked, flushDone, fuaAsked, fuaDone
    }

    /// Client requests whose completion promises durability.
    enum Durable { case flush, fuaWrite }

    private let fd: Int32
    /// Tokens of the writes, punches and syncs in flight (reads are not recorded).
    private var recorded: Set<UInt32> = []
    /// Client flushes and FUA writes in flight, by the engine tag, to their kind and sequence number.
    private var promises: [RequestTag: (Durable, UInt32)] = [:]
    private var flushCount: UInt32 = 0
    private var fuaCount: UInt32 = 0

    /// Starts the log `log` asks for; it records the image's size at open first.
    init(log: WriteLog, fileSize: UInt64) {
        let fd = Glibc.open(log.path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { preconditionFailure("\(WriteLog.environmentVariable): cannot open \(log.path)") }
        self.fd = fd
        append(Array("QNBDWLG1".utf8))
        record(.open, offset: fileSize)
    }

    deinit { Glibc.close(fd) }

    /// Called for every action before the driver runs it.
    func issuing(_ action: IOAction) {
        switch action {
        case .writeFile(let token, let offset, let buffer, let dsync):
            recorded.insert(token.raw)
            record(.writeIssued, id: token.raw, offset: offset, length: UInt64(buffer.count), value: dsync ? 1 : 0)
            append(buffer)
        case .punchFile(let token, let offset, let length):
            recorded.insert(token.raw)
            record(.punchIssued, id: token.raw, offset: offset, length: length)
        case .syncFile(let token):
            recorded.insert(token.raw)
            record(.syncStarted, id: token.raw)
        case .complete(let tag, let outcome):
            guard let (kind, sequence) = promises.removeValue(forKey: tag) else { return }
            var error: Int64 = 0
            if case .failed(let e) = outcome { error = Int64(e.errno) }
            record(kind == .flush ? .flushDone : .fuaDone, id: sequence, value: error)
        default:
            return
        }
    }

    /// Called when a file operation finishes, inline or from the pool, before the engine hears of it.
    func completed(token: UInt32, result: Int) {
        guard recorded.remove(token) != nil else { return }
        record(.completed, id: token, value: Int64(result))
    }

    /// Called when a client's flush or FUA write reaches the driver.
    func asked(_ kind: Durable, tag: RequestTag) {
        let sequence: UInt32
        switch kind {
        case .flush:
            flushCount += 1
            sequence = flushCount
        case .fuaWrite:
            fuaCount += 1
            sequence = fuaCount
        }
        promises[tag] = (kind, sequence)
        record(kind == .flush ? .flushAsked : .fuaAsked, id: sequence)
    }

    /// Ids of the blocking writes and syncs made outside the engine (open and close): never an
    /// engine token, which counts up from 0.
    private var blockingID: UInt32 = 0xffff_0000

    /// A blocking write made outside the engine (the bitmap directory at open, the bitmap store at
    /// close): issued and completed at once.
    func blockingWrite(_ bytes: UnsafeRawBufferPointer, at offset: UInt64, result: Int) {
        blockingID &+= 1
        record(.writeIssued, id: blockingID, offset: offset, length: UInt64(bytes.count))
        append(bytes)
        record(.completed, id: blockingID, value: Int64(result))
    }

    /// A blocking fdatasync outside the engine.
    func blockingSync(result: Int) {
        blockingID &+= 1
        record(.syncStarted, id: blockingID)
        record(.completed, id: blockingID, value: Int64(result))
    }

    private func record(_ kind: Kind, id: UInt32 = 0, offset: UInt64 = 0, length: UInt64 = 0, value: Int64 = 0) {
        var bytes = [UInt8](repeating: 0, count: 32)
        bytes[0] = kind.rawValue
        func put(_ v: UInt64, at: Int, width: Int) {
            for i in 0..<width { bytes[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
        }
        put(UInt64(id), at: 4, width: 4)
        put(offset, at: 8, width: 8)
        put(length, at: 16, width: 8)
        put(UInt64(bitPattern: value), at: 24, width: 8)
        append(bytes)
    }

    private func append(_ bytes: [UInt8]) {
        bytes.withUnsafeBytes { append($0) }
    }

    private func append(_ bytes: UnsafeRawBufferPointer) {
        let result = SystemCall.writeStream(fd, from: bytes)
        // A test that asked for a log must not silently get a partial one.
        precondition(result >= 0, "\(WriteLog.environmentVariable): write failed, errno \(-result)")
    }
}

/// A MetadataFile whose writes and syncs are logged to the recorder as they are made (the bitmap
/// store at close), so the powercut replay sees every change to the file.
final class RecordedFile: MetadataFile {
    private let file: MetadataFile
    private let recorder: WriteRecorder

    init(_ file: MetadataFile, recorder: WriteRecorder) {
        self.file = file
        self.recorder = recorder
    }

    func length() throws(QCow2Error) -> UInt64 { try file.length() }
    func read(at offset: UInt64, count: Int) throws(QCow2Error) -> [UInt8] { try file.read(at: offset, count: count) }

    func write(_ bytes: [UInt8], at offset: UInt64) throws(QCow2Error) {
        try file.write(bytes, at: offset)
        bytes.withUnsafeBytes { recorder.blockingWrite($0, at: offset, result: bytes.count) }
    }

    func sync() throws(QCow2Error) {
        try file.sync()
        recorder.blockingSync(result: 0)
    }
}
