// Shared plumbing for handle-owning classes.
//
// Every UVCore handle lives in raw memory owned by a Swift object. libuv keeps
// a pointer to that memory until the close callback runs, so the rule for all
// of them is: `handle.data` holds one strong reference (passRetained) from the
// moment the object exists until its close callback, which releases it; the
// object's deinit frees the memory. Memory that never got an owner (a failed
// bind or accept) is closed with `onCloseFreeing`, which frees it directly.

import CLibUV
#if canImport(Glibc)
import Glibc
#endif

/// Frees handle memory that has no Swift owner, once libuv is done with it.
let onCloseFreeing: uv_close_cb = { handle in
    UnsafeMutableRawPointer(handle!).deallocate()
}

/// Allocates zeroed memory for a handle of type `T`.
@inline(__always)
func allocateHandle<T>(_: T.Type) -> UnsafeMutableRawPointer {
    let memory = UnsafeMutableRawPointer.allocate(
        byteCount: MemoryLayout<T>.size, alignment: max(MemoryLayout<T>.alignment, 16))
    memory.initializeMemory(as: UInt8.self, repeating: 0, count: MemoryLayout<T>.size)
    return memory
}

extension UnsafeMutableRawPointer {
    @inline(__always) var asHandle: UnsafeMutablePointer<uv_handle_t> { assumingMemoryBound(to: uv_handle_t.self) }
    @inline(__always) var asStream: UnsafeMutablePointer<uv_stream_t> { assumingMemoryBound(to: uv_stream_t.self) }
    @inline(__always) var asTCP: UnsafeMutablePointer<uv_tcp_t> { assumingMemoryBound(to: uv_tcp_t.self) }
    @inline(__always) var asPipe: UnsafeMutablePointer<uv_pipe_t> { assumingMemoryBound(to: uv_pipe_t.self) }
}

/// Closes ownerless handle memory and frees it in the close callback.
func closeAndFree(_ memory: UnsafeMutableRawPointer) {
    uv_close(memory.asHandle, onCloseFreeing)
}

/// "127.0.0.1:5555" or "[::1]:5555" for an AF_INET/AF_INET6 address; "unknown" otherwise.
func describeSocketAddress(_ storage: UnsafePointer<sockaddr_storage>) -> String {
    withUnsafeTemporaryAllocation(of: CChar.self, capacity: 64) { text in
        let raw = UnsafeRawPointer(storage)
        switch Int32(storage.pointee.ss_family) {
        case AF_INET:
            let sin = raw.assumingMemoryBound(to: sockaddr_in.self)
            guard uv_ip4_name(sin, text.baseAddress, text.count) == 0 else { return "unknown" }
            return "\(String(cString: text.baseAddress!)):\(UInt16(bigEndian: sin.pointee.sin_port))"
        case AF_INET6:
            let sin6 = raw.assumingMemoryBound(to: sockaddr_in6.self)
            guard uv_ip6_name(sin6, text.baseAddress, text.count) == 0 else { return "unknown" }
            return "[\(String(cString: text.baseAddress!))]:\(UInt16(bigEndian: sin6.pointee.sin6_port))"
        default:
            return "unknown"
        }
    }
}
