// The server: one event loop, its listeners, the shared export and every connection to it.
//
// Shutdown (SIGINT/SIGTERM) runs in stages on the loop: stop accepting; let each connection finish and
// answer what it was asked; flush the image; close the remaining handles so `run()` returns. A timer
// bounds the wait for clients that never drain their replies.

import BlockDevice
import NBDProtocol
import UVCore
#if canImport(Glibc)
import Glibc
#endif

public final class Server {
    private let configuration: ServerConfiguration
    private let log: Logger
    private let loop: EventLoop
    private let io: FileIO
    private let pool: BufferPool
    private let budget: MemoryBudget
    private let exports: ExportTable
    private var listeners: [Listener] = []
    private var connections: [Int: Connection] = [:]
    private var nextConnectionID = 1
    private var signals: [SignalWatcher] = []
    private var stopMailbox: Mailbox<Bool>?
    private var shutdownTimer: LoopTimer?
    private var stopping = false
    private var exitStatus: Int32 = 0
    /// Exports whose final flush has not completed yet.
    private var imagesClosing = 0

    public init(configuration: ServerConfiguration) throws(ServerError) {
        self.configuration = configuration
        self.log = Logger(level: configuration.logLevel)
        EventLoop.configureThreadPool(size: configuration.threadPoolSize)
        do {
            loop = try EventLoop()
        } catch {
            throw ServerError("cannot create the event loop: \(error)")
        }
        io = FileIO(loop: loop)
        // The pool keeps freed buffers for reuse; a quarter of the budget is enough to avoid churn.
        pool = BufferPool(maximumCachedBytes: configuration.memoryBudgetBytes / 4)
        budget = MemoryBudget(limit: configuration.memoryBudgetBytes)
        let device = try ImageOpener.open(configuration, io: io, log: log)
        let export = Export(name: configuration.exportName, description: configuration.description, device: device)
        exports = ExportTable([export])
        log.info("serving \(device.summary)\(configuration.readOnly ? " read-only" : "") as export \"\(configuration.exportName)\"")
        try listen()
        try installSignalHandlers()
        do {
            stopMailbox = try Mailbox<Bool>(loop: loop) { [unowned self] _ in self.beginShutdown() }
        } catch {
            throw ServerError("cannot create the stop mailbox: \(error)")
        }
        if let pidFile = configuration.pidFile { try writePidFile(pidFile) }
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
        do {
            try loop.close()
        } catch {
            log.debug("event loop closed with handles open: \(error)")
        }
        return exitStatus
    }

    // MARK: - Listening

    private func listen() throws(ServerError) {
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
                try listener!.start()
                listener!.delegate = self
                listeners.append(listener!)
                log.info("listening on \(listener!.localDescription)")
            } catch {
                // Give every handle back before failing, so nothing outlives the server that made it.
                listener?.close()
                for l in listeners { l.close() }
                listeners.removeAll()
                loop.runNoWait()
                throw ServerError("cannot listen on \(address): \(error)")
            }
        }
    }

    /// "::" means every address; hosts without IPv6 fall back to IPv4's wildcard.
    private func tcpListener(host: String, port: Int) throws(UVError) -> Listener {
        do {
            return try Listener.tcp(loop: loop, host: host, port: port)
        } catch where host == "::" && error != .addressInUse {
            return try Listener.tcp(loop: loop, host: "0.0.0.0", port: port)
        }
    }

    private func writePidFile(_ path: String) throws(ServerError) {
        let text = "\(getpid())\n"
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
    }

    private func installSignalHandlers() throws(ServerError) {
        for signal in [SIGINT, SIGTERM] {
            do {
                let watcher = try SignalWatcher(loop: loop, signal: signal) { [unowned self] number in
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
        for listener in listeners { listener.close() }
        listeners.removeAll()
        let timer = LoopTimer(loop: loop)
        timer.start(afterMilliseconds: 30_000) { [unowned self] in
            self.log.warning("clients did not finish within 30 s; closing their connections")
            for (_, c) in self.connections { c.close() }
        }
        timer.unref()
        shutdownTimer = timer
        for (_, c) in connections { c.beginShutdown() }
        finishShutdownIfIdle()
    }

    private func finishShutdownIfIdle() {
        guard stopping, connections.isEmpty, shutdownTimer != nil else { return }
        shutdownTimer?.close()
        shutdownTimer = nil
        imagesClosing = exports.exports.count
        for export in exports.exports { export.device.close(tag: 0, handler: self) }
    }

    func connectionDidFinish(_ connection: Connection) {
        guard connections.removeValue(forKey: connection.id) != nil else { return }
        log.debug("connection \(connection.id) finished (\(connections.count) left)")
        finishShutdownIfIdle()
    }
}

extension Server: ListenerDelegate {
    public func listener(_ listener: Listener, didAccept stream: SocketStream) {
        guard !stopping else { return stream.close() }
        guard connections.count < configuration.maximumConnections else {
            log.warning("refusing \(stream.peerDescription): \(configuration.maximumConnections) connections already")
            return stream.close()
        }
        stream.setNoDelay(true)
        let id = nextConnectionID
        nextConnectionID += 1
        let connection = Connection(id: id, stream: stream, server: self, exports: exports, pool: pool, log: log,
                                    limits: configuration.connectionLimits, budget: budget, loop: loop)
        connections[id] = connection
        log.debug("connection \(id) from \(stream.peerDescription)")
        connection.start()
    }

    public func listener(_ listener: Listener, didFailToAcceptWith error: UVError) {
        log.warning("accept failed on \(listener.localDescription): \(error)")
    }
}

extension Server: BlockIOHandler {
    /// The final flush of a shutdown, once per export; the last one lets the loop end.
    public func blockIOCompleted(tag: UInt64, outcome: BlockOutcome) {
        if case .failed(let error) = outcome {
            log.error("final flush failed: \(error)")
            exitStatus = 1
        }
        imagesClosing -= 1
        guard imagesClosing == 0 else { return }
        for s in signals { s.close() }
        signals.removeAll()
        stopMailbox?.close()
        if let pidFile = configuration.pidFile { unlink(pidFile) }
        log.info("stopped")
    }
}
