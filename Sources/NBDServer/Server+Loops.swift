// The server's side of several loops: making the workers, spreading connections over the loops, giving
// each worker its views of the exports, and hearing back from the workers. See WorkerLoop.swift for the
// worker's side and LoopProxyDevice.swift for how a qcow2 request crosses loops.

import BlockDevice
import RawDriver
import UVCore

extension Server {
    /// Makes `count` worker loops (threads start at the end of init) and this loop's mailboxes for them.
    func makeWorkers(count: Int, memoryBudgetBytes: Int) throws(ServerError) {
        guard count > 0 else { return }
        do {
            workerReports = try Mailbox(loop: loop) { [unowned self] batch in
                for report in batch { self.workerReported(report) }
            }
            proxyRequests = try Mailbox(loop: loop) { ProxyLink.execute($0) }
        } catch {
            throw ServerError("cannot create the loops' mailboxes: \(error)")
        }
        for index in 1...count {
            workers.append(try WorkerLoop(index: index, memoryBudgetBytes: memoryBudgetBytes, aio: configuration.aio, log: log, tls: tlsCredentials,
                                          tlsPolicy: configuration.effectiveTLSMode, report: workerReports!))
        }
        loopLoad = Array(repeating: 0, count: count + 1)
    }

    /// Startup failed: stop the workers that run, close the rest here.
    func stopWorkersAfterFailure() {
        for worker in workers {
            if worker.isRunning {
                worker.inbox.post(.stop)
                worker.join()
            } else {
                worker.abandon()
            }
        }
        workers.removeAll()
        workerReports?.close()
        workerReports = nil
        proxyRequests?.close()
        proxyRequests = nil
    }

    /// `export` as `worker` serves it: a raw image through a driver of that loop's own (its own fd; a
    /// flush is an fdatasync of the one file, so it covers writes through every loop's fd), anything
    /// else through a proxy to the device here. A raw file that cannot be opened again is proxied too.
    func makeView(of export: Export, on worker: WorkerLoop) -> Export {
        var device: BlockDevice?
        // Under fault rules (QNBD_TEST_FAULTS, tests only) a raw export is proxied too: the rules count
        // the operations of one driver ("the 1st read fails"), so one injector must see every loop's.
        if export.device is RawDriver, !testTaps.injectsFaults {
            device = try? RawDriver(path: export.configuration.imagePath, readOnly: export.configuration.readOnly, io: worker.io)
            if device == nil { log.warning("export \"\(export.name)\": loop \(worker.index) proxies it (the file did not open again)") }
        }
        let view = Export(configuration: export.configuration,
                          device: device ?? ProxyDevice(device: export.device, ownerLoop: loop, requests: proxyRequests!,
                                                        loop: worker.loop, completions: worker.proxyCompletions),
                          usage: export.usage)
        view.access = export.access
        return view
    }

    /// Sends every worker the table as it is now (its views, the access lists, LIST allowed or not).
    func publishExports() {
        for (i, worker) in workers.enumerated() {
            let entries = exports.exports.compactMap { export in
                views[ObjectIdentifier(export)].map { ExportViewEntry(view: $0[i], access: export.access) }
            }
            worker.inbox.post(.exports(entries, listAllowed: exports.listAllowed))
        }
    }

    /// The loop for the next connection: the one with the fewest, the lowest of equals (a lone client
    /// stays on this loop, next to the qcow2 engines, and pays no proxy hop).
    func loopForNextConnection() -> Int {
        guard !workers.isEmpty else { return 0 }
        var best = 0
        for i in loopLoad.indices where loopLoad[i] < loopLoad[best] { best = i }
        return best
    }

    /// Gives an accepted connection to worker loop `index`.
    func handOver(_ stream: SocketStream, id: Int, to index: Int, listener: Listener) {
        let peer = stream.peerDescription
        guard let socket = stream.handOver() else {
            log.warning("refusing \(peer): cannot hand the connection to loop \(index)")
            return
        }
        loopLoad[index] += 1
        workerConnections[id] = index
        logAccepted(id: id, peer: peer, on: listener, loop: index)
        workers[index - 1].inbox.post(.adopt(socket, id: id, startedAt: ConnectionReport.now, limits: configuration.connectionLimits))
    }

    private func workerReported(_ report: WorkerReport) {
        switch report {
        case .connectionFinished(let id, let index, let usage, let line):
            guard workerConnections.removeValue(forKey: id) != nil else { return }
            loopLoad[index] -= 1
            if let line { log.info(line) }
            log.debug("\(connections.count + workerConnections.count) connection(s) left")
            if let usage, usage.count == 0, let export = openExports.first(where: { $0.usage === usage }) {
                exportBecameIdle(export)
            }
            finishShutdownIfIdle()
        case .viewsClosed(let token, let failure):
            closers[token]?.blockIOCompleted(tag: 0, outcome: failure.map { .failed($0) } ?? .done)
        }
    }
}
