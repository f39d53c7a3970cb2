// SIGHUP: re-read the config file and bring the exports in line with it, without dropping a client.
//
// The whole file is read and checked first (syntax, keys, authfiles, image conflicts); any mistake is
// logged and nothing changes. Then: added exports open and appear; removed exports leave the table
// (no new connections) and their image closes when the last connection holding it ends; an export
// whose settings changed keeps serving with the old ones until nobody holds it, then closes and
// reopens with the new ones. Authfiles are re-read for every export. Listen addresses, user/group,
// threads and the memory budget need a restart (bound and set once) and say so.

#if canImport(Glibc)
import Glibc
#endif

extension Server {
    func reload() {
        guard !stopping else { return }
        guard let file = configuration.configFile else {
            log.warning("SIGHUP: qnbd was started without --config, so there is nothing to re-read")
            return
        }
        notify.send("RELOADING=1\nMONOTONIC_USEC=\(SystemdNotify.monotonicMicroseconds)")
        defer { notify.send("READY=1\nSTATUS=serving \(exports.exports.count) export(s)") }
        log.info("SIGHUP: re-reading \(file)")
        var new: ServerConfiguration
        var accessLists: [String: AccessList] = [:]
        do {
            new = try ConfigFile.load(file)
            new.configFile = file
            configuration.overrides?(&new)
            for export in new.exports { accessLists[export.name] = try AccessList.load(export.authFile) }
            try Self.checkImageConflicts(new.exports)
        } catch {
            log.error("reload failed, nothing changed: \(error)")
            return
        }
        let restartOnly = new.restartOnlyDifferences(from: configuration)
        if !restartOnly.isEmpty {
            log.warning("reload: \(restartOnly.joined(separator: ", ")) changed; that takes a restart")
        }
        configuration.maximumConnections = new.maximumConnections
        configuration.connectionLimits = new.connectionLimits
        configuration.allowList = new.allowList
        exports.listAllowed = new.allowList
        let order = new.exports.map(\.name)
        let wanted = Set(order)

        for old in exports.exports where !wanted.contains(old.name) {
            pendingChanges[old.name] = nil
            exports.replaceAll(exports.exports.filter { $0 !== old })
            // Retired first: no loop may attach to it between this decision and its table update.
            if old.usage.retire() == 0 {
                log.info("reload: export \"\(old.name)\" removed")
                closeExport(old)
            } else {
                log.info("reload: export \"\(old.name)\" removed; it takes no new clients, and its image closes once its \(old.connectionCount) connection(s) end")
            }
        }
        publishExports()
        // An export closing to reopen takes the newest settings when it reopens, or stays closed.
        for name in reopening {
            pendingChanges[name] = new.exports.first { $0.name == name }
        }
        for configuration in new.exports where !reopening.contains(configuration.name) {
            let access = accessLists[configuration.name] ?? .everyone
            if let current = exports.export(named: configuration.name) {
                current.access = access
                guard current.configuration.differsInService(from: configuration) else {
                    pendingChanges[configuration.name] = nil
                    continue
                }
                pendingChanges[configuration.name] = configuration
                if current.connectionCount == 0 {
                    log.info("reload: export \"\(configuration.name)\" changed; reopening it")
                    reopen(current)
                } else {
                    log.info("reload: export \"\(configuration.name)\" changed; the new settings wait until its \(current.connectionCount) connection(s) end")
                }
                continue
            }
            let stillOpen = openExports + closers.values.map(\.export)
            if let holder = stillOpen.first(where: { sameImage($0.configuration, configuration) && !($0.configuration.readOnly && configuration.readOnly) }) {
                log.error("reload: export \"\(configuration.name)\" not added: its image is still held by the removed export \"\(holder.name)\"; send SIGHUP again once those clients are gone")
                continue
            }
            do {
                let export = try openExport(configuration, access: access)
                openExports.append(export)
                insert(export, order: order)
                log.info("reload: export \"\(configuration.name)\" added")
            } catch {
                log.error("reload: export \"\(configuration.name)\" not added: \(error)")
            }
        }
        exportOrder = order
        publishExports()
        log.info("reload done: \(exports.exports.count) export(s): \(exports.exports.map { "\"\($0.name)\"" }.joined(separator: ", "))")
    }

    /// The last connection holding `export` ended: close a removed image, apply waiting settings.
    func exportBecameIdle(_ export: Export) {
        guard !stopping else { return }
        if reopenWhenIdle.remove(ObjectIdentifier(export)) != nil { return closeAndReopen(export) }
        if exports.exports.contains(where: { $0 === export }) {
            if pendingChanges[export.name] != nil {
                log.info("export \"\(export.name)\": its last client left; reopening with the new settings")
                reopen(export)
            }
        } else if openExports.contains(where: { $0 === export }) {
            log.info("export \"\(export.name)\": its last client left; closing the removed export's image")
            closeExport(export)
        }
    }

    /// Closes `export` and opens its waiting configuration in its place.
    private func reopen(_ export: Export) {
        let name = export.name
        guard pendingChanges[name] != nil else { return }
        exports.replaceAll(exports.exports.filter { $0 !== export })
        publishExports()
        reopening.insert(name)
        if export.usage.retire() > 0 {
            // A client on another loop attached before the export retired: reopen once it leaves.
            reopenWhenIdle.insert(ObjectIdentifier(export))
            return
        }
        closeAndReopen(export)
    }

    /// Closes a retired, idle `export` and opens its waiting configuration in its place.
    private func closeAndReopen(_ export: Export) {
        let name = export.name
        closeExport(export) { [unowned self] in
            self.reopening.remove(name)
            // A reload while the image closed may have changed the settings again, or removed it.
            guard let configuration = self.pendingChanges.removeValue(forKey: name) else { return }
            let access: AccessList
            do {
                access = try AccessList.load(configuration.authFile)
            } catch {
                self.log.error("export \"\(name)\" could not reopen with its new settings: \(error)")
                return
            }
            do {
                let replacement = try self.openExport(configuration, access: access)
                self.openExports.append(replacement)
                self.insert(replacement, order: self.exportOrder)
                self.publishExports()
            } catch {
                self.log.error("export \"\(configuration.name)\" could not reopen with its new settings: \(error)")
            }
        }
    }

    private func insert(_ export: Export, order: [String]) {
        var list = exports.exports.filter { $0.name != export.name }
        list.append(export)
        let rank = Dictionary(order.enumerated().map { ($1, $0) }, uniquingKeysWith: { a, _ in a })
        list.sort { (rank[$0.name] ?? Int.max) < (rank[$1.name] ?? Int.max) }
        exports.replaceAll(list)
    }

    private func sameImage(_ a: ExportConfiguration, _ b: ExportConfiguration) -> Bool {
        var x = stat(), y = stat()
        guard stat(a.imagePath, &x) == 0, stat(b.imagePath, &y) == 0 else { return a.imagePath == b.imagePath }
        return x.st_dev == y.st_dev && x.st_ino == y.st_ino
    }
}
