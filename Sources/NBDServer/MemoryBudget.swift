// The bytes all connections together may hold in request and reply buffers.
//
// Each connection bounds its own in-flight bytes, but a client can open many connections and stop
// reading replies on all of them; without a shared bound, memory would grow with the number of
// connections. When the budget is spent, connections stop reading new requests and queue here; as
// buffers are released and use falls below half the budget, they resume in arrival order.

import NBDProtocol

final class MemoryBudget {
    let limit: Int
    // Loop-confined and touched on every READ and WRITE: unchecked exclusivity, as in Connection.
    @exclusivity(unchecked) private(set) var used = 0
    @exclusivity(unchecked) private var waiting: [Connection] = []

    /// The state the Transmission machine checks a request's cost against.
    var snapshot: SharedMemory { SharedMemory(used: used, limit: limit) }

    init(limit: Int) { self.limit = limit }

    func take(_ bytes: Int) { used += bytes }

    func give(_ bytes: Int) {
        used -= bytes
        guard !waiting.isEmpty, used <= limit / 2 else { return }
        let ready = waiting
        waiting.removeAll()
        for connection in ready { connection.budgetAvailable() }
    }

    /// `connection` paused for lack of budget; it is told when there is room again.
    func wait(_ connection: Connection) {
        if !waiting.contains(where: { $0 === connection }) { waiting.append(connection) }
    }

    func forget(_ connection: Connection) {
        waiting.removeAll { $0 === connection }
    }
}
