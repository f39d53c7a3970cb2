// The server: one event loop, its listeners, the exports and every connection to them.
//
// Startup: bind the listeners (or adopt systemd's), drop privileges, then read authfiles and open every
// image, so both are only ever opened as the configured user, as a reload (SIGHUP) will open them; the
// config file is read as root at startup but as that user on reload. READY=1 goes to systemd once all
// of that is done.
//
// Exports live in an ExportTable (what new clients can choose). An export leaves the table on reload
// when removed or changed, but its image stays open while connections hold it (`openExports`); when
// the last one leaves, the image is closed (flushed and left clean) and a changed export reopens with
// its new settings. See Server+Reload.swift.
//
// Shutdown (SIGINT/SIGTERM) runs in stages on the loop: stop accepting; let each connection finish and
// answer what it was asked; close every open image; close the remaining handles so `run()` returns. A
// timer bounds the wait for clients that never drain their replies.
//
// Several loops (`loops` > 1, see WorkerLoop.swift): this loop stays the main loop. It accepts, counts
// and logs every connection, then keeps it or hands it to the worker loop with the fewest connections
// (ties go to the lowest loop, so a lone client stays here, next to the qcow2 engines). Exports are
// decided here as before; each worker gets views of them (`views`) and a new table whenever the table
// changes (`publishExports`). An export retires (ExportUsage) before it leaves the table, so no loop
// attaches to an image that is about to close; closing an export closes its views on every worker, then
// the image here. Shutdown drains every loop's connections, closes the images, stops the workers and
// joins their threads after this loop's run() returns.

import BlockDevice
import NBDProtocol
import TLS
import UVCore
#if canImport(Glibc)
import Glibc
#endif

public final class Server: ConnectionOwner {
    var configuration: ServerConfiguration
    let log: Logger
    let loop: EventLoop
    private let io: FileIO
    private let pool: BufferPool
    private let budget: MemoryBudget
    let exports: ExportTable
    let notify: SystemdNotify
    /// Every export whose image is open and not closing: the table's, and removed or replaced ones that
    /// connections still hold.
    var openExports: [Export] = []
    /// New settings for an export, waiting until no connection holds its current image.
    var pendingChanges: [String: ExportConfiguration] = [:]
    /// Export names in configuration order, the order LIST shows.
    var exportOrder: [String] = []
    /// Image closes in flight, by export.
    var closers: [ObjectIdentifier: ExportCloser] = [:]
    /// Exports closing so they can reopen with new settings; the settings wait in `pendingChanges`.
    var reopening: Set<String> = []
    private var listeners: [Listener] = []
    var connections: [Int: Connection] = [:]
    var nextConnectionID = 1
    /// When each connection was accepted (CLOCK_MONOTONIC ns), for its close line.
    var connectionStarts: [Int: UInt64] = [:]
    private var signals: [SignalWatcher] = []
    private var stopMailbox: Mailbox<Bool>?
    private var shutdownTimer: LoopTimer?
    private(set) var stopping = false
    private var imagesClosing = false
    private var exitStatus: Int32 = 0
    private var pidFileDescriptor: Int32 = -1
    /// Whether this process created the pid file (a failed start removes only its own).
    private var pidFileCreated = false
    /// Loaded once at startup (before privileges are dropped: key files are often root's only).
    var tlsCredentials: TLSCredentials?
    /// The other loops (none with one loop), in loop order: worker i is loop i + 1.
    var workers: [WorkerLoop] = []
    /// Fault rules and write log for the images (tests only), read from the environment once.
    private(set) var testTaps = TestTaps.none
    /// Reports from the workers (connections that ended, views closed).
    var workerReports: Mailbox<WorkerReport>?
    /// Requests the workers' proxies send to the engines this loop owns.
    var proxyRequests: Mailbox<ProxyRequest>?
    /// Connections served by a worker: connection id → loop index.
    var workerConnections: [Int: Int] = [:]
    /// Connections per loop (index 0: this one), to pick the loop for the next one.
    var loopLoad: [Int] = [0]
    /// Each open export's views on the workers (in `workers` order), by the export's identity.
    var views: [ObjectIdentifier: [Export]] = [:]
    /// Exports waiting for connections that attached just before they retired, to close and reopen.
    var reopenWhenIdle: Set<ObjectIdentifier> = []

    public init(configuration: ServerConfiguration) throws(ServerError) {
        self.configuration = configuration
        self.log = Logger(level: configuration.logLevel)
        notify = SystemdNotify.fromEnvironment()
        EventLoop.configureThreadPool(size: configuration.threadPoolSize)
        do {
            loop = try EventLoop()
        } catch {
            throw ServerError("cannot create the event loop: \(error)")
        }
        let aioNote: String?
        do {
            (io, aioNote) = try FileIO.preferred(loop: loop, backend: configuration.aio)
        } catch {
            throw ServerError("--aio io_uring: \(error)")
        }
        // Each loop gets an equal share of the budget (never less than two maximum payloads, so any
        // request fits), and its pool keeps a quarter of that share for reuse.
        let loopCount = configuration.effectiveLoops
        let share = max(configuration.memoryBudgetBytes / loopCount, 2 * Int(Export.maximumPayload))
        let loopBudget = loopCount == 1 ? configuration.memoryBudgetBytes : share
        pool = BufferPool(maximumCachedBytes: loopBudget / 4)
        budget = MemoryBudget(limit: loopBudget)
        exports = ExportTable([])
        exports.listAllowed = configuration.allowList
        do throws(ServerError) {
            testTaps = try TestTaps.fromEnvironment()
            try Self.checkImageConflicts(configuration.exports)
            tlsCredentials = try Self.loadTLS(configuration, log: log)
            try listen()
            try preparePidFile()
            try Privileges.drop(user: configuration.user, group: configuration.group, log: log)
            try makeWorkers(count: loopCount - 1, memoryBudgetBytes: loopBudget)
            // Authfiles are read as the user qnbd runs as, as a reload will read them.
            var accessLists: [AccessList] = []
            for export in configuration.exports { accessLists.append(try AccessList.load(export.authFile)) }
            var opened: [Export] = []
            for (export, access) in zip(configuration.exports, accessLists) {
                opened.append(try openExport(export, access: access))
            }
            exports.replaceAll(opened)
            openExports = opened
            exportOrder = configuration.exports.map(\.name)
            publishExports()
            try installSignalHandlers()
            do {
                stopMailbox = try Mailbox<Bool>(loop: loop) { [unowned self] _ in self.beginShutdown() }
            } catch {
                throw ServerError("cannot create the stop mailbox: \(error)")
            }
            try writePidFile()
            for worker in workers { try worker.start() }
        } catch {
            stopWorkersAfterFailure()
            for l in listeners { l.close() }
            listeners.removeAll()
            for s in signals { s.close() }
            signals.removeAll()
            stopMailbox?.close()
            stopMailbox = nil
            if pidFileDescriptor >= 0 { Glibc.close(pidFileDescriptor) }
            if pidFileCreated, let pidFile = configuration.pidFile { unlink(pidFile) }
            // Every handle made so far must finish closing, or the loop cannot close and leaks.
            io.close()
            try? loop.close()
            throw error
        }
        // Said once serving, so a refused image stays the one line a failed start prints.
        if let aioNote { log.info(aioNote) }
        for listener in listeners { log.info("listening on \(listener.localDescription)") }
        if !workers.isEmpty { log.info("\(workers.count + 1) event loops") }
        if let problem = notify.send("READY=1\nSTATUS=serving \(exports.exports.count) export(s)\nMAINPID=\(getpid())") {
            log.warning(problem)
        }
    }

    /// Stops the server from any thread, as SIGTERM does (for embedding and tests).
    public var stopHandle: @Sendable () -> Void {
        let mailbox = stopMailbox!
        return { mailbox.post(true) }
    }

    /// The bound TCP port of the first TCP listener (useful with port 0).
    public var tcpPort: Int? { listeners.lazy.compactMap(\.localPort).first }

    /// Runs the loop until shutdown completes; returns the process exit status.
    public func run() -> Int32 {
        loop.run()
        for worker in workers { worker.join() }
        io.close()
        do {
            try loop.close()
        } catch {
            log.debug("event loop closed with handles open: \(error)")
        }
        return exitStatus
    }

    // MARK: - Exports

    /// Opens one export's image (as whoever the process is by now).
    func openExport(_ configuration: ExportConfiguration, access: AccessList) throws(ServerError) -> Export {
        // Driver messages (repairs, I/O errors that turn the image read-only) name the export.
        let device = try ImageOpener.open(configuration, io: io, taps: testTaps,
                                          log: log.labelled("export \"\(configuration.name)\""))
        let export = Export(configuration: configuration, device: device)
        export.access = access
        if !workers.isEmpty { views[ObjectIdentifier(export)] = workers.map { makeView(of: export, on: $0) } }
        let origin = configuration.origin.isEmpty ? "" : " (\(configuration.origin))"
        log.info("serving \(device.summary)\(configuration.readOnly ? " read-only" : "") as export \"\(configuration.name)\"\(origin)")
        return export
    }

    /// One image behind two exports is refused unless both only read it: two writers (two drivers,
    /// two caches) would corrupt it. Files are compared by device and inode, not by path.
    static func checkImageConflicts(_ exports: [ExportConfiguration]) throws(ServerError) {
        var seen: [(dev: UInt64, ino: UInt64, export: ExportConfiguration)] = []
        for export in exports {
            var info = stat()
            guard stat(export.imagePath, &info) == 0 else { continue }
            let dev = UInt64(info.st_dev), ino = UInt64(info.st_ino)
            if let other = seen.first(where: { $0.dev == dev && $0.ino == ino }), !(other.export.readOnly && export.readOnly) {
                func named(_ e: ExportConfiguration) -> String { "\"\(e.name)\"" + (e.origin.isEmpty ? "" : " (\(e.origin))") }
                throw ServerError("exports \(named(other.export)) and \(named(export)) both open \(export.imagePath); "
                                  + "one image can back several exports only if all of them are readonly")
            }
            seen.append((dev, ino, export))
        }
    }

    /// Flushes and closes an export's image (and its views on the other loops: no connection holds any
    /// of them now); `then` runs once all are closed (not during shutdown).
    func closeExport(_ export: Export, then: (() -> Void)? = nil) {
        openExports.removeAll { $0 === export }
        let exportViews = views.removeValue(forKey: ObjectIdentifier(export)) ?? []
        let closer = ExportCloser(export: export, parts: 1 + exportViews.count) { [unowned self] closer, outcome in
            self.closers.removeValue(forKey: ObjectIdentifier(closer.export))
            if case .failed(let error) = outcome {
                self.log.error("export \"\(closer.export.name)\": closing the image failed: \(error)")
                self.exitStatus = 1
            } else {
                self.log.info("export \"\(closer.export.name)\": image closed")
            }
            if !self.stopping { then?() }
            self.finishStopIfDone()
        }
        closers[ObjectIdentifier(export)] = closer
        // One view per worker, in worker order; each worker closes its own (the qcow2 image below is
        // closed here, on its owner loop, while the proxies are idle).
        for (worker, view) in zip(workers, exportViews) {
            worker.inbox.post(.closeViews([view], token: ObjectIdentifier(export)))
        }
        export.device.close(tag: 0, handler: closer)
    }

    // MARK: - Listening

    private func listen() throws(ServerError) {
        if let activation = try SocketActivation.fromEnvironment() {
            for socket in activation.sockets {
                do throws(UVError) {
                    let listener = try Listener.adopt(loop: loop, fd: socket.fd, name: socket.name)
                    try start(listener)
                } catch {
                    closeListenersAfterFailure()
                    throw ServerError("cannot use socket fd \(socket.fd) from systemd: \(error)")
                }
            }
            log.debug("socket-activated: \(activation.sockets.count) socket(s); configured listen addresses are not bound")
            return
        }
        var addresses = configuration.listen
        if addresses.isEmpty { addresses = [.tcp(host: "::", port: 10809)] }
        for address in addresses {
            var listener: Listener?
            do {
                switch address {
                case .tcp(let host, let port):
                    listener = try tcpListener(host: host, port: port)
                case .unix(let path):
                    listener = try Listener.unix(loop: loop, path: path)
                }
                try start(listener!)
            } catch {
                // Give every handle back before failing, so nothing outlives the server that made it.
                listener?.close()
                closeListenersAfterFailure()
                throw ServerError("cannot listen on \(address): \(error)")
            }
        }
    }

    private func start(_ listener: Listener) throws(UVError) {
        do {
            try listener.start()
        } catch {
            listener.close()
            throw error
        }
        listener.delegate = self
        listeners.append(listener)
    }

    private func closeListenersAfterFailure() {
        for l in listeners { l.close() }
        listeners.removeAll()
        loop.runNoWait()
    }

    /// "::" means every address; hosts without IPv6 fall back to IPv4's wildcard.
    private func tcpListener(host: String, port: Int) throws(UVError) -> Listener {
        do {
            return try Listener.tcp(loop: loop, host: host, port: port)
        } catch where host == "::" && error != .addressInUse {
            return try Listener.tcp(loop: loop, host: "0.0.0.0", port: port)
        }
    }

    /// With a user to become, the pid file is created before the drop (its directory may be root's)
    /// and filled once serving.
    private func preparePidFile() throws(ServerError) {
        guard let path = configuration.pidFile, configuration.user != nil || configuration.group != nil else { return }
        pidFileDescriptor = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard pidFileDescriptor >= 0 else {
            throw ServerError("cannot write pid file \(path): \(String(cString: strerror(errno)))")
        }
        pidFileCreated = true
    }

    private func writePidFile() throws(ServerError) {
        guard let path = configuration.pidFile else { return }
        var text = "\(getpid())\n"
        if pidFileDescriptor >= 0 {
            text.withUTF8 { _ = Glibc.write(pidFileDescriptor, $0.baseAddress, $0.count) }
            Glibc.close(pidFileDescriptor)
            pidFileDescriptor = -1
            return
        }
        let tmp = path + ".tmp"
        guard let f = fopen(tmp, "w") else {
            throw ServerError("cannot write pid file \(path): \(String(cString: strerror(errno)))")
        }
        fputs(text, f)
        fclose(f)
        // Renamed into place so a watcher never reads a half-written file.
        guard rename(tmp, path) == 0 else {
            throw ServerError("cannot write pid file \(path): \(String(cString: strerror(errno)))")
        }
        pidFileCreated = true
    }

    private func installSignalHandlers() throws(ServerError) {
        for signal in [SIGINT, SIGTERM, SIGHUP] {
            do {
                let watcher = try SignalWatcher(loop: loop, signal: signal) { [unowned self] number in
                    if number == SIGHUP { return self.reload() }
                    self.log.info("signal \(number): shutting down")
                    self.beginShutdown()
                }
                watcher.unref()
                signals.append(watcher)
            } catch {
                throw ServerError("cannot watch signal \(signal): \(error)")
            }
        }
    }

    // MARK: - Shutdown

    public func beginShutdown() {
        guard !stopping else { return }
        stopping = true
        notify.send("STOPPING=1")
        for listener in listeners { listener.close() }
        listeners.removeAll()
        let timer = LoopTimer(loop: loop)
        timer.start(afterMilliseconds: 30_000) { [unowned self] in
            self.log.warning("clients did not finish within 30 s; closing their connections")
            for worker in self.workers { worker.inbox.post(.forceClose) }
            for (_, c) in self.connections { c.close() }
        }
        timer.unref()
        shutdownTimer = timer
        for worker in workers { worker.inbox.post(.shutdown) }
        for (_, c) in connections { c.beginShutdown() }
        finishShutdownIfIdle()
    }

    func finishShutdownIfIdle() {
        guard stopping, connections.isEmpty, workerConnections.isEmpty, !imagesClosing else { return }
        imagesClosing = true
        shutdownTimer?.close()
        shutdownTimer = nil
        for export in openExports { closeExport(export) }
        finishStopIfDone()
    }

    /// The last stage: every image is closed, so the remaining handles go and the loop can end.
    private func finishStopIfDone() {
        guard imagesClosing, closers.isEmpty, stopMailbox != nil else { return }
        for s in signals { s.close() }
        signals.removeAll()
        stopMailbox?.close()
        stopMailbox = nil
        for worker in workers { worker.inbox.post(.stop) }
        workerReports?.close()
        workerReports = nil
        proxyRequests?.close()
        proxyRequests = nil
        if let pidFile = configuration.pidFile { unlink(pidFile) }
        log.info("stopped")
    }

    func connectionDidFinish(_ connection: Connection) {
        guard connections.removeValue(forKey: connection.id) != nil else { return }
        loopLoad[0] -= 1
        let export = exports.detach(connection: connection.id)
        let started = connectionStarts.removeValue(forKey: connection.id) ?? 0
        log.info(ConnectionReport.closed(connection, export: export?.name, startedAt: started))
        log.debug("\(connectionCount) connection(s) left")
        if let export, export.connectionCount == 0 { exportBecameIdle(export) }
        finishShutdownIfIdle()
    }

    /// Connections on every loop.
    private var connectionCount: Int { connections.count + workerConnections.count }
}

extension Server {
    /// The credentials TLS needs, or nil when it is off. A missing or unreadable file stops startup
    /// with a message naming it; key files others can read only warn.
    static func loadTLS(_ configuration: ServerConfiguration, log: Logger) throws(ServerError) -> TLSCredentials? {
        let mode = configuration.effectiveTLSMode
        let needsTLS = configuration.exports.contains { $0.tlsRequired || $0.allowedPSKUsernames != nil }
        guard mode != .off else {
            if needsTLS { throw ServerError("an export requires TLS (tls = require or tls-psk-users) but TLS is off") }
            return nil
        }
        guard var settings = configuration.tls else {
            throw ServerError("TLS mode \(mode.rawValue) needs credentials: --tls-certificates DIR or --tls-psk FILE")
        }
        if let file = configuration.tlsAuthzFile {
            settings.allowedClientDNs = (settings.allowedClientDNs ?? []) + (try readDNList(file))
        }
        // An allowed-DN list only means something for verified certificates, so it turns verification on.
        if settings.allowedClientDNs != nil { settings.verifyPeer = true }
        if let problem = settings.problems().first { throw ServerError("TLS: \(problem)") }
        let credentials: TLSCredentials
        do {
            credentials = try TLSCredentials(settings)
        } catch {
            throw ServerError("TLS: \(error)")
        }
        for warning in credentials.warnings { log.warning("TLS: \(warning)") }
        return credentials
    }

    /// One DN a line; blank lines and lines starting with # are skipped.
    private static func readDNList(_ path: String) throws(ServerError) -> [String] {
        guard let file = fopen(path, "r") else {
            throw ServerError("TLS: cannot read the allowed-DN file \(path): \(String(cString: strerror(errno)))")
        }
        defer { fclose(file) }
        var names: [String] = []
        var line: UnsafeMutablePointer<CChar>?
        var capacity = 0
        defer { free(line) }
        while getline(&line, &capacity, file) >= 0, let line {
            let text = String(String(cString: line).trimmingSpaces.filter { $0 != "\n" && $0 != "\r" && $0 != "\t" })
            if !text.isEmpty && !text.hasPrefix("#") { names.append(text) }
        }
        return names
    }
}

extension Server: ListenerDelegate {
    public func listener(_ listener: Listener, didAccept stream: SocketStream) {
        guard !stopping else { return stream.close() }
        guard connectionCount < configuration.maximumConnections else {
            log.warning("refusing \(stream.peerDescription): \(configuration.maximumConnections) connections already (maxconnections)")
            return stream.close()
        }
        stream.setNoDelay(true)
        let id = nextConnectionID
        nextConnectionID += 1
        let target = loopForNextConnection()
        if target > 0 { return handOver(stream, id: id, to: target, listener: listener) }
        loopLoad[0] += 1
        let connection = Connection(id: id, stream: stream, server: self, exports: exports, pool: pool, log: log,
                                    limits: configuration.connectionLimits, budget: budget, loop: loop,
                                    tls: tlsCredentials, tlsPolicy: configuration.effectiveTLSMode)
        connections[id] = connection
        connectionStarts[id] = ConnectionReport.now
        logAccepted(id: id, peer: stream.peerDescription, on: listener)
        connection.start()
    }

    func logAccepted(id: Int, peer: String, on listener: Listener, loop index: Int = 0) {
        log.info("connection \(id) from \(peer) on \(listener.localDescription)" + (index > 0 ? " (loop \(index))" : ""))
        let refused = exports.exports.filter { !$0.access.allows(peerDescription: peer) }
        if !refused.isEmpty {
            log.warning("connection \(id) from \(peer): refused export(s) "
                        + refused.map { "\"\($0.name)\"" }.joined(separator: ", ") + " by their authfile")
        }
    }

    public func listener(_ listener: Listener, didFailToAcceptWith error: UVError) {
        log.warning("accept failed on \(listener.localDescription): \(error)")
    }
}

/// Receives the completion of one export's final flush and close: its image here and its views on the
/// other loops (`parts` in all); the first failure is the outcome.
final class ExportCloser: BlockIOHandler {
    let export: Export
    private var remaining: Int
    private var outcome = BlockOutcome.done
    private let done: (ExportCloser, BlockOutcome) -> Void

    init(export: Export, parts: Int = 1, done: @escaping (ExportCloser, BlockOutcome) -> Void) {
        self.export = export
        self.remaining = parts
        self.done = done
    }

    func blockIOCompleted(tag: UInt64, outcome: BlockOutcome) {
        if case .failed = outcome, case .done = self.outcome { self.outcome = outcome }
        remaining -= 1
        if remaining == 0 { done(self, self.outcome) }
    }
}
