// Sizes as typed on the command line, and as printed in qemu-img's style.

import Testing
@testable import QCow2Tools

/// (typed, bytes) pairs; spelled out so the type checker has nothing to infer.
let acceptedSizes: [(String, UInt64)] = [
    ("4096", 4096), ("0", 0), ("512b", 512), ("512B", 512),
    ("64k", 65536), ("64K", 65536), ("64KiB", 65536), ("64kib", 65536),
    ("10M", 10_485_760), ("10MiB", 10_485_760), ("2g", 2_147_483_648), ("2GiB", 2_147_483_648),
    ("1T", 1_099_511_627_776), ("3TiB", 3_298_534_883_328), ("1P", 1_125_899_906_842_624),
    ("1E", 1_152_921_504_606_846_976), ("1.5G", 1_610_612_736), ("1.5M", 1_572_864),
    ("0.5K", 512), (".5K", 512), ("1.25k", 1280), (" 8M ", 8_388_608), ("1.0001K", 1024),
]

let humanSizes: [(UInt64, String)] = [
    (0, "0 B"), (1, "1 B"), (999, "999 B"), (1000, "0.977 KiB"), (1024, "1 KiB"),
    (200_704, "196 KiB"), (1_458_176, "1.39 MiB"), (10_737_418_240, "10 GiB"), (1_024_000, "0.977 MiB"),
    (1_099_511_627_776, "1 TiB"), (1_610_612_736, "1.5 GiB"),
]

@Suite struct SizeParsingTests {
    @Test(arguments: acceptedSizes)
    func accepted(text: String, bytes: UInt64) throws {
        #expect(try SizeParser.parse(text) == bytes)
    }

    @Test(arguments: ["", "M", "abc", "1.5", "12Q", "10KB", "1BiB", "-1", "1..5G", "1.G", "1.5.5M", "9E",
                      "99999999999999999999", "1 G x", "15.99E"])
    func refused(text: String) {
        #expect(throws: ToolError.self) { try SizeParser.parse(text) }
    }

    @Test func fractionsTruncateToWholeBytes() throws {
        // 0.3 KiB = 307.2 bytes: qemu keeps 307.
        #expect(try SizeParser.parse("0.3K") == 307)
        #expect(try SizeParser.parse("1.1E") == 1_268_213_655_067_531_673)
    }
}

@Suite struct SizeFormattingTests {
    @Test(arguments: humanSizes)
    func qemuStyle(bytes: UInt64, text: String) {
        #expect(SizeFormatter.human(bytes) == text)
    }
}
