// swift-tools-version: 6.0
import PackageDescription

let package = Package(
    name: "qnbd",
    products: [
        .executable(name: "qnbd", targets: ["qnbd"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        // The only module that sees <uv.h>.
        .systemLibrary(name: "CLibUV", pkgConfig: "libuv", providers: [.apt(["libuv1-dev"])]),
        // liburing (Debian's liburing-dev), seen only by UVCore's FileRing (io_uring file I/O).
        .systemLibrary(name: "CLibURing", pkgConfig: "liburing", providers: [.apt(["liburing-dev"])]),
        // Swift face of libuv: loop, listeners, streams, off-loop file I/O, timers, signals, mailbox.
        .target(name: "UVCore", dependencies: ["CLibUV", "CLibURing", "SystemCalls"]),
        // Pure NBD wire format and the handshake/transmission state machines. No I/O.
        .target(name: "NBDProtocol"),
        // The seam between the protocol and the image formats. No I/O.
        .target(name: "BlockDevice"),
        // Every C call outside libuv: the Linux calls Glibc's Swift module hides (preadv2/pwritev2 flags,
        // fallocate, SEEK_DATA/SEEK_HOLE, BLKGETSIZE64).
        .target(name: "CSystem"),
        // The one layer of file syscalls with their EINTR and short-transfer loops.
        .target(name: "SystemCalls", dependencies: ["CSystem"]),
        // GnuTLS (Debian's libgnutls28-dev), seen only by the TLS module.
        .systemLibrary(name: "CGnuTLS", pkgConfig: "gnutls", providers: [.apt(["libgnutls28-dev"])]),
        // TLS over UVCore's streams: credentials and policy, and TLSStream (GnuTLS driven by the loop).
        .target(name: "TLS", dependencies: ["UVCore", "CGnuTLS", "SystemCalls"]),
        // Moves bytes both ways through TLSStream (or plain), for callgrind instruction counts.
        .executableTarget(name: "TLSThroughput", dependencies: ["TLS", "UVCore", "CGnuTLS"]),
        // Pure qcow2 format and request state machines: I/O leaves as actions, results return as events.
        .target(name: "QCow2", dependencies: ["BlockDevice"]),
        // Decompression of compressed qcow2 clusters (deflate and zstd), from Debian's -dev packages.
        .systemLibrary(name: "CZlib", pkgConfig: "zlib", providers: [.apt(["zlib1g-dev"])]),
        .systemLibrary(name: "CZstd", pkgConfig: "libzstd", providers: [.apt(["libzstd-dev"])]),
        // The I/O shell that runs the qcow2 engine's actions on UVCore, and opens backing chains.
        .target(name: "QCow2Driver", dependencies: ["QCow2", "BlockDevice", "UVCore", "RawDriver", "SystemCalls", "CZlib", "CZstd"]),
        // Raw files and block devices, served through UVCore's file I/O.
        .target(name: "RawDriver", dependencies: ["BlockDevice", "UVCore", "SystemCalls"]),
        // Offline image tools (create, info, check, map) on plain blocking file I/O.
        .target(name: "QCow2Tools", dependencies: ["QCow2", "BlockDevice", "SystemCalls"]),
        // Glue: listeners, connections, exports, configuration.
        .target(name: "NBDServer", dependencies: [
            "UVCore", "NBDProtocol", "BlockDevice", "RawDriver", "QCow2", "QCow2Driver", "TLS", "SystemCalls",
        ]),
        .executableTarget(name: "qnbd", dependencies: [
            "NBDServer", "NBDProtocol", "TLS",
            "QCow2Tools",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),

        .testTarget(name: "UVCoreTests", dependencies: ["UVCore"]),
        .testTarget(name: "TLSTests", dependencies: ["TLS", "UVCore", "CGnuTLS"]),
        .testTarget(name: "NBDProtocolTests", dependencies: ["NBDProtocol"]),
        .testTarget(name: "QCow2Tests", dependencies: ["QCow2", "BlockDevice"]),
        .testTarget(name: "QCow2ToolsTests", dependencies: ["QCow2Tools", "QCow2"]),
        .testTarget(name: "RawDriverTests", dependencies: ["RawDriver", "BlockDevice", "UVCore"]),
        .testTarget(name: "QCow2DriverTests", dependencies: ["QCow2Driver", "BlockDevice", "UVCore"]),
        .testTarget(name: "NBDServerTests", dependencies: ["NBDServer", "RawDriver", "BlockDevice", "UVCore", "TLS"]),
    ],
    swiftLanguageModes: [.v6]
)
