// ByteStream: what a connection needs from a stream of bytes, whether the bytes travel in the clear
// (SocketStream) or through TLS (the TLS module's TLSStream, which wraps a SocketStream). A protocol
// handler written against this surface can switch to TLS in the middle of a connection.
//
// The contract is SocketStream's (see that file): reads land in the buffer the delegate hands out,
// writes are gathered buffers with a caller context, completions are reported in order, and a
// stream's delegate is told exactly once that it closed, after every write has been reported.

/// A connected, ordered, reliable stream of bytes, confined to its loop's thread.
public protocol ByteStream: AnyObject {
    /// "127.0.0.1:5555", "[::1]:5555" or "unix".
    var peerDescription: String { get }
    /// Starts delivering reads. Does nothing if already reading or closing.
    func startReading()
    /// Stops delivering reads (back-pressure). Safe to call at any time.
    func stopReading()
    /// Writes the buffers in order; see `SocketStream.write`. `context` comes back in didFinishWrite.
    func write(_ buffers: UnsafeBufferPointer<UnsafeRawBufferPointer>, context: UInt64) -> WriteOutcome
    /// From now on `write` gathers and sends at the end of each loop turn; see `SocketStream.coalesceWrites`.
    func coalesceWrites()
    /// Bytes accepted by `write` but not yet taken by the kernel (on the wire's terms: ciphertext for TLS).
    var pendingWriteBytes: Int { get }
    /// Bytes the kernel has taken so far (wrapping), on the wire's terms; see `SocketStream.bytesWritten`.
    var bytesWritten: UInt64 { get }
    /// Lets queued writes drain, ends the sending side, then closes.
    func shutdownAndClose()
    /// Closes now: queued writes fail with `.canceled`, then the delegate hears `streamDidClose`. Idempotent.
    func close()
    /// True from the first close on.
    var isClosing: Bool { get }
}

/// Receives everything a `ByteStream` reports. All calls arrive on the loop thread.
/// (SocketStream still reports through `SocketStreamDelegate`, whose methods name the concrete
/// type; the two become one when connections hold `any ByteStream`.)
public protocol ByteStreamDelegate: AnyObject {
    /// Where to put the next bytes. Return a non-empty buffer; it must stay valid until didRead.
    func streamWantsReadBuffer(_ stream: any ByteStream) -> UnsafeMutableRawBufferPointer
    /// `count` bytes (> 0) landed at the start of the buffer last handed out.
    func stream(_ stream: any ByteStream, didRead count: Int)
    /// The peer closed (error == .eof) or the read failed. The stream stops reading; the owner decides to close.
    func stream(_ stream: any ByteStream, didFailReadingWith error: UVError)
    /// A write that `write` reported as `.pending` finished (error nil) or failed; `context` is what was passed.
    func stream(_ stream: any ByteStream, didFinishWrite context: UInt64, error: UVError?)
    /// The stream is closed; no more callbacks after this one.
    func streamDidClose(_ stream: any ByteStream)
}
