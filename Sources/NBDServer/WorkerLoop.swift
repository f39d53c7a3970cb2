// WorkerLoop: one more event loop, on its own thread, serving the connections the main loop hands it.
//
// With `--loops N` the server runs the main loop (listeners, signals, reload, the export table it
// decides from, the qcow2 engines, and connections like any loop) and N-1 worker loops. A worker owns
// everything its connections touch on the request path: its EventLoop, FileIO (so a file backend is
// per loop), BufferPool, its share of the memory budget, and its own ExportTable of views: for a raw
// export a RawDriver of its own over the same file, for a qcow2 export a ProxyDevice to the engine on
// the main loop. The views of one export share its ExportUsage, so maxconnections counts every loop.
//
// The main loop talks to a worker only through its inbox (WorkerMessage, in order), and the worker
// answers through the main loop's mailbox (WorkerReport). Nothing else is shared but thread-safe
// objects (Logger, TLS credentials, ExportUsage, the mailboxes). A handed-over connection runs its
// handshake and transmission entirely here.
//
// Ending: `.shutdown` drains the worker's connections (each reports when it finished); `.closeViews`
// closes this loop's devices of an export the main loop is closing; `.stop` closes the mailboxes, the
// loop runs dry and the thread returns (the main loop joins it).

import BlockDevice
import NBDProtocol
import TLS
import UVCore
#if canImport(Glibc)
import Glibc
#endif

/// Who a connection tells that it finished: the server for the main loop's connections, a WorkerLoop
/// for its own.
protocol ConnectionOwner: AnyObject {
    func connectionDidFinish(_ connection: Connection)
}

/// One export as a worker loop offers it: its view and the access list to apply (read only there).
struct ExportViewEntry: @unchecked Sendable {
    let view: Export
    let access: AccessList
}

/// What the main loop asks of a worker loop. Carries loop-confined objects handed over whole (the views
/// were made on the main loop and are used only by the worker from then on): @unchecked Sendable.
enum WorkerMessage: @unchecked Sendable {
    /// Serve this connection; `startedAt` for its close line, `limits` as configured right now.
    case adopt(HandedOverSocket, id: Int, startedAt: UInt64, limits: ConnectionLimits)
    /// The exports new clients may choose, in LIST order.
    case exports([ExportViewEntry], listAllowed: Bool)
    /// Server shutdown: let every connection finish what it was asked, then close.
    case shutdown
    /// The shutdown deadline passed: close every connection now.
    case forceClose
    /// Close these views' devices (no connection holds them any more) and report `.viewsClosed(token)`.
    case closeViews([Export], token: ObjectIdentifier)
    /// Close the mailboxes so the loop runs dry and the thread ends.
    case stop
}

/// What a worker loop tells the main loop.
enum WorkerReport: @unchecked Sendable {
    /// A connection handed to `loop` ended; `usage` is the export it held, `line` its close log line.
    case connectionFinished(id: Int, loop: Int, usage: ExportUsage?, line: String?)
    /// The views of the export `token` names are closed on one worker loop.
    case viewsClosed(token: ObjectIdentifier, failure: BlockError?)
}

final class WorkerLoop: ConnectionOwner {
    let index: Int
    let loop: EventLoop
    /// This loop's file I/O backend; its raw views use it.
    let io: FileIO
    private let pool: BufferPool
    private let budget: MemoryBudget
    private let exports = ExportTable([])
    private let log: Logger
    private let tls: TLSCredentials?
    private let tlsPolicy: TLSPolicy
    private let report: Mailbox<WorkerReport>
    /// This loop's connections and when each was accepted.
    private var connections: [Int: (connection: Connection, startedAt: UInt64)] = [:]
    private var stopping = false
    /// Messages from the main loop; set once in init.
    private(set) var inbox: Mailbox<WorkerMessage>!
    /// Completions of requests this loop's proxies sent to an engine's owner.
    private(set) var proxyCompletions: Mailbox<ProxyCompletion>!
    private var thread: LoopThread?

    /// Made on the main thread before the worker's thread starts.
    init(index: Int, memoryBudgetBytes: Int, aio: FileIOBackend?, log: Logger, tls: TLSCredentials?, tlsPolicy: TLSPolicy,
         report: Mailbox<WorkerReport>) throws(ServerError) {
        self.index = index
        do {
            loop = try EventLoop()
        } catch {
            throw ServerError("cannot create event loop \(index): \(error)")
        }
        // The same backend as the main loop's (its ring already proved the kernel allows one), on a ring
        // of this loop's own.
        do {
            io = try FileIO.preferred(loop: loop, backend: aio).io
        } catch {
            try? loop.close()
            throw ServerError("--aio io_uring on event loop \(index): \(error)")
        }
        pool = BufferPool(maximumCachedBytes: memoryBudgetBytes / 4)
        budget = MemoryBudget(limit: memoryBudgetBytes)
        self.log = log
        self.tls = tls
        self.tlsPolicy = tlsPolicy
        self.report = report
        do {
            inbox = try Mailbox(loop: loop) { [unowned self] batch in
                for message in batch { self.handle(message) }
            }
            proxyCompletions = try Mailbox(loop: loop) { ProxyDevice.complete($0) }
        } catch {
            abandon()
            throw ServerError("cannot create the mailboxes of event loop \(index): \(error)")
        }
    }

    /// Runs the loop on its own thread.
    func start() throws(ServerError) {
        let body = UncheckedLoop(worker: self)
        do {
            thread = try LoopThread(name: "qnbd-loop-\(index)") { body.run() }
        } catch {
            throw ServerError("cannot start the thread of event loop \(index): \(error)")
        }
    }

    var isRunning: Bool { thread != nil }

    /// Waits for the thread, after `.stop`.
    func join() {
        thread?.join()
    }

    /// A worker whose thread never started: closes its handles on this thread.
    func abandon() {
        inbox?.close()
        proxyCompletions?.close()
        io.close()
        loop.runNoWait()
        try? loop.close()
    }

    fileprivate func runOnThread() {
        loop.run()
        io.close()
        do {
            try loop.close()
        } catch {
            log.debug("event loop \(index) closed with handles open: \(error)")
        }
    }

    private func handle(_ message: WorkerMessage) {
        switch message {
        case .adopt(let socket, let id, let startedAt, let limits):
            adopt(socket, id: id, startedAt: startedAt, limits: limits)
        case .exports(let entries, let listAllowed):
            exports.listAllowed = listAllowed
            for entry in entries { entry.view.access = entry.access }
            exports.replaceAll(entries.map(\.view))
        case .shutdown:
            stopping = true
            for (_, entry) in connections { entry.connection.beginShutdown() }
        case .forceClose:
            for (_, entry) in connections { entry.connection.close() }
        case .closeViews(let views, let token):
            closeViews(views, token: token)
        case .stop:
            inbox.close()
            proxyCompletions.close()
        }
    }

    private func adopt(_ socket: HandedOverSocket, id: Int, startedAt: UInt64, limits: ConnectionLimits) {
        let stream: SocketStream
        do {
            stream = try SocketStream(adopting: socket, loop: loop)
        } catch {
            log.warning("connection \(id) from \(socket.peerDescription): loop \(index) cannot take it: \(error)")
            return report.post(.connectionFinished(id: id, loop: index, usage: nil, line: nil))
        }
        let connection = Connection(id: id, stream: stream, server: self, exports: exports, pool: pool, log: log,
                                    limits: limits, budget: budget, loop: loop, tls: tls, tlsPolicy: tlsPolicy)
        connections[id] = (connection, startedAt)
        if stopping {
            // Handed over just before the shutdown message: drain it like the others.
            connection.start()
            return connection.beginShutdown()
        }
        connection.start()
    }

    func connectionDidFinish(_ connection: Connection) {
        guard let entry = connections.removeValue(forKey: connection.id) else { return }
        let export = exports.detach(connection: connection.id)
        let line = ConnectionReport.closed(connection, export: export?.name, startedAt: entry.startedAt)
        report.post(.connectionFinished(id: connection.id, loop: index, usage: export?.usage, line: line))
    }

    private func closeViews(_ views: [Export], token: ObjectIdentifier) {
        guard !views.isEmpty else { return report.post(.viewsClosed(token: token, failure: nil)) }
        let closer = ViewCloser(count: views.count) { [report] failure in
            report.post(.viewsClosed(token: token, failure: failure))
        }
        for view in views { view.device.close(tag: 0, handler: closer) }
    }
}

/// Carries a worker to its thread. The worker is made on the main thread and, once its thread starts,
/// used only there (the main thread only posts to its mailboxes and joins it).
private struct UncheckedLoop: @unchecked Sendable {
    let worker: WorkerLoop
    func run() { worker.runOnThread() }
}

/// Counts the closes of one export's views on a worker loop.
private final class ViewCloser: BlockIOHandler {
    private var remaining: Int
    private var failure: BlockError?
    private let done: (BlockError?) -> Void

    init(count: Int, done: @escaping (BlockError?) -> Void) {
        remaining = count
        self.done = done
    }

    func blockIOCompleted(tag: UInt64, outcome: BlockOutcome) {
        if case .failed(let error) = outcome, failure == nil { failure = error }
        remaining -= 1
        if remaining == 0 { done(failure) }
    }
}
