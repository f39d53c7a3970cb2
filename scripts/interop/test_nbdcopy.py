# nbdcopy (libnbd 1.14): a 256 MiB random file copied into the export and back out, byte-compared;
# once over one connection and once with -C 4 (multi-conn).
# Run alone: /usr/bin/python3 -m unittest -v scripts/interop/test_nbdcopy.py
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qnbdtest as T  # noqa: E402
from qnbdtest import MiB  # noqa: E402

SIZE = 256 * MiB
ZERO_RANGES = [(64 * MiB, 16 * MiB), (200 * MiB + 4096, 3 * MiB)]   # zero runs inside the source


def make_source(path):
    with open(path, "wb") as f:
        for off in range(0, SIZE, 8 * MiB):
            f.write(os.urandom(8 * MiB))
        for off, length in ZERO_RANGES:
            f.seek(off)
            f.write(bytes(length))
    return path


class NbdcopyTests(T.QnbdTestCase):
    def setUp(self):
        super().setUp()
        self.src = make_source(os.path.join(self.dir, "src.bin"))
        # the export starts with 0xff where the source has zeroes, so zeroing must really happen
        self.img = self.image(SIZE, [(off, b"\xff" * length) for off, length in ZERO_RANGES])
        self.srv = self.start_server(self.img)

    def roundtrip(self, extra=()):
        uri = self.srv.uri()
        T.run(["nbdcopy", "--flush"] + list(extra) + [self.src, uri], timeout=180)
        p = T.run(["cmp", self.src, self.img], timeout=60, check=False)
        self.assertEqual(p.returncode, 0, "image file differs after copy-in: " + p.stdout)
        out = os.path.join(self.dir, "out.bin")
        T.run(["nbdcopy"] + list(extra) + [uri, out], timeout=180)
        p = T.run(["cmp", self.src, out], timeout=60, check=False)
        self.assertEqual(p.returncode, 0, "copy-out differs: " + p.stdout)
        self.assertEqual(os.path.getsize(out), SIZE)

    def test_copy_in_and_out(self):
        self.roundtrip()

    def test_copy_in_and_out_four_connections(self):
        self.roundtrip(["-C", "4", "--requests=64"])


if __name__ == "__main__":
    unittest.main(verbosity=2)
