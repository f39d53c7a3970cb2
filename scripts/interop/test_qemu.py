# qemu-io and qemu-img (qemu 7.2 NBD client) against nbd+unix:// and nbd://127.0.0.1 URLs.
# Run alone: /usr/bin/python3 -m unittest -v scripts/interop/test_qemu.py
import json
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qnbdtest as T  # noqa: E402
from qnbdtest import KiB, MiB  # noqa: E402

SIZE = 64 * MiB
REGIONS = [(0, T.pattern_bytes(80, 512 * KiB)), (20 * MiB, T.pattern_bytes(81, 3 * MiB))]


def qemu_io(uri, *cmds, check=True):
    argv = ["qemu-io", "-f", "raw"]
    for c in cmds:
        argv += ["-c", c]
    p = T.run(argv + [uri], timeout=120, check=False)
    out = p.stdout + p.stderr
    if check:
        bad = [l for l in out.splitlines() if "failed" in l.lower() or "error" in l.lower()]
        if p.returncode != 0 or bad:
            raise AssertionError("qemu-io %r exit %d:\n%s" % (cmds, p.returncode, out[-3000:]))
    return p


class QemuBase(T.QnbdTestCase):
    tcp = False
    export_name = None

    def setUp(self):
        super().setUp()
        self.img = self.image(SIZE, REGIONS)
        self.srv = self.start_server(self.img, tcp=self.tcp, export_name=self.export_name)
        self.uri = self.srv.uri()

    def compare(self, a, b, fmt_a="raw", fmt_b="raw"):
        # -U: do not take image locks (the server has the file open)
        return T.run(["qemu-img", "compare", "-U", "-f", fmt_a, "-F", fmt_b, a, b],
                     timeout=120, check=False)

    def assertIdentical(self, a, b):
        p = self.compare(a, b)
        self.assertEqual(p.returncode, 0, "qemu-img compare %s %s:\n%s%s" % (
            a, b, p.stdout, p.stderr))
        self.assertIn("Images are identical", p.stdout)


class QemuIoTests(QemuBase):
    def test_pattern_write_and_read(self):
        qemu_io(self.uri, "write -P 0xab 0 1M", "read -P 0xab 0 1M", "read -P 0 1M 1M")
        self.assertEqual(T.read_file(self.img, 0, 1 * MiB), b"\xab" * MiB)
        # the pattern check is real: a wrong pattern must fail
        p = qemu_io(self.uri, "read -P 0xcd 0 1M", check=False)
        self.assertIn("Pattern verification failed", p.stdout + p.stderr)
        qemu_io(self.uri, "write -P 0x3c 30M 8M", "read -P 0x3c 30M 8M", "flush")
        self.assertEqual(T.read_file(self.img, 30 * MiB, 8 * MiB), b"\x3c" * (8 * MiB))

    def test_write_zeroes(self):
        qemu_io(self.uri, "write -P 0x55 1M 2M", "write -z 1052672 65536",
                "write -z -u 2M 512K", "read -P 0x55 1M 4096", "read -P 0 1052672 65536",
                "read -P 0x55 1118208 978944", "read -P 0 2M 512K", "read -P 0x55 2621440 512K")
        want = bytearray(b"\x55" * (2 * MiB))
        want[4096:4096 + 65536] = bytes(65536)
        want[1 * MiB:1 * MiB + 512 * KiB] = bytes(512 * KiB)
        self.assertTrue(T.read_file(self.img, 1 * MiB, 2 * MiB) == want, "image file content")

    def test_discard(self):
        qemu_io(self.uri, "write -P 0x77 8M 4M", "flush")
        before = T.allocated_bytes(self.img)
        qemu_io(self.uri, "discard 8M 4M", "flush", "read -P 0 8M 4M")
        self.assertGreaterEqual(before - T.allocated_bytes(self.img), 3 * MiB)
        self.assertEqual(T.read_file(self.img, 8 * MiB, 4 * MiB), bytes(4 * MiB))

    def test_misaligned_offsets(self):
        b = 30 * MiB            # a hole
        qemu_io(self.uri, "write -P 0x11 %d 511" % (b + 1), "write -P 0x22 %d 1000" % (b + 513),
                "write -P 0x33 %d 3" % (b + 65535), "write -P 0x66 %d 2" % (512 * KiB - 1),
                "read -P 0 %d 1" % b, "read -P 0x11 %d 511" % (b + 1),
                "read -P 0 %d 1" % (b + 512), "read -P 0x22 %d 1000" % (b + 513),
                "read -P 0 %d 64022" % (b + 1513), "read -P 0x33 %d 3" % (b + 65535),
                "read -P 0 %d 100000" % (b + 65538), "read -P 0x66 %d 2" % (512 * KiB - 1))
        want = bytearray(200000)
        want[1:512] = b"\x11" * 511
        want[513:1513] = b"\x22" * 1000
        want[65535:65538] = b"\x33" * 3
        self.assertEqual(T.read_file(self.img, b, 200000), bytes(want))
        self.assertEqual(T.read_file(self.img, 512 * KiB - 2, 4),
                         REGIONS[0][1][-2:-1] + b"\x66\x66\x00")

    def test_qemu_img_info(self):
        info = json.loads(T.run(["qemu-img", "info", "--output=json", "-f", "raw", self.uri],
                                timeout=30).stdout)
        self.assertEqual(info["virtual-size"], SIZE)
        self.assertEqual(info["format"], "raw")

    def test_qemu_img_compare_after_writes(self):
        qemu_io(self.uri, "write -P 0x5a 3M 5M", "write -z 21M 1M", "discard 22M 1M",
                "write -P 0x01 63M 1M")
        self.assertIdentical(self.uri, self.img)
        # negative control: a copy with one changed byte is reported as different
        other = os.path.join(self.dir, "other.img")
        with open(self.img, "rb") as src, open(other, "wb") as dst:
            dst.write(src.read())
        with open(other, "r+b") as f:
            f.seek(40 * MiB + 12345)
            f.write(b"\x01")
        p = self.compare(self.uri, other)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("Content mismatch at offset %d" % ((40 * MiB + 12345) // 512 * 512), p.stdout)

    def test_qemu_img_convert_into_export(self):
        qemu_io(self.uri, "write -P 0xee 0 64M")          # garbage the convert must overwrite
        src = T.make_image(os.path.join(self.dir, "src.img"), SIZE,
                           [(1 * MiB, T.pattern_bytes(82, 5 * MiB)),
                            (33 * MiB + 512, T.pattern_bytes(83, 100 * KiB)),
                            (SIZE - 4096, T.pattern_bytes(84, 4096))])
        T.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, self.uri], timeout=120)
        self.assertIdentical(src, self.uri)
        with open(src, "rb") as a, open(self.img, "rb") as b:
            self.assertTrue(a.read() == b.read(), "image file differs from the convert source")

    def test_qemu_img_map(self):
        qemu_io(self.uri, "write -P 0x44 40M 1M", "flush")
        out = T.run(["qemu-img", "map", "--output=json", "-f", "raw", self.uri], timeout=60).stdout
        got = T.merge_extents([(e["start"], e["length"], T.qemu_map_flags(e))
                               for e in json.loads(out)])
        self.assertEqual(got, T.file_map(self.img))


class QemuTcpTests(QemuBase):
    tcp = True
    export_name = "disk1"

    def test_tcp_url(self):
        self.assertEqual(self.uri, "nbd://127.0.0.1:%d/disk1" % self.srv.port)
        qemu_io(self.uri, "write -P 0x9e 100K 300K", "read -P 0x9e 100K 300K",
                "read -P 0 600K 112K")
        self.assertEqual(T.read_file(self.img, 100 * KiB, 300 * KiB), b"\x9e" * (300 * KiB))
        self.assertIdentical(self.uri, self.img)
        # the legacy host/port/export syntax as well
        qemu_io("nbd:127.0.0.1:%d:exportname=disk1" % self.srv.port, "read -P 0x9e 100K 300K")


if __name__ == "__main__":
    unittest.main(verbosity=2)
