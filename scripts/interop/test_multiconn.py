# Multi-conn consistency (the logic of qemu-iotests nbd-multiconn): three connections A, B, C;
# write on A, FLUSH on B, read on C must see the data. Run alone:
#   /usr/bin/python3 -m unittest -v scripts/interop/test_multiconn.py
import os
import random
import sys
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qnbdtest as T  # noqa: E402
from qnbdtest import KiB, MiB, nbd  # noqa: E402

SIZE = 64 * MiB


class MultiConnTests(T.QnbdTestCase):
    def setUp(self):
        super().setUp()
        self.img = self.image(SIZE)
        self.srv = self.start_server(self.img)
        self.a, self.b, self.c = (self.connect(self.srv) for _ in range(3))

    def test_can_multi_conn_on_every_connection(self):
        for h in (self.a, self.b, self.c):
            self.assertTrue(h.can_multi_conn())
            self.assertTrue(h.can_flush())

    def test_write_a_flush_b_read_c(self):
        rnd = random.Random(3)
        for i in range(40):
            off = rnd.randrange(0, SIZE - 1 * MiB)
            data = rnd.randbytes(rnd.choice([1, 512, 4096, 65536, 1 * MiB - 1]))
            self.a.pwrite(data, off)
            self.b.flush()
            self.assertEqual(self.c.pread(len(data), off), data, "round %d at %d" % (i, off))
            self.assertEqual(T.read_file(self.img, off, len(data)), data)

    def test_fua_write_visible_on_other_connections(self):
        data = T.pattern_bytes(90, 256 * KiB)
        self.a.pwrite(data, 5 * MiB + 1, nbd.CMD_FLAG_FUA)
        self.assertEqual(self.c.pread(len(data), 5 * MiB + 1), data)
        self.assertEqual(self.b.pread(len(data), 5 * MiB + 1), data)
        self.assertEqual(T.read_file(self.img, 5 * MiB + 1, len(data)), data)

    def test_zero_and_trim_on_a_seen_by_c(self):
        self.a.pwrite(b"\x7f" * (2 * MiB), 10 * MiB)
        self.b.flush()
        self.a.zero(1 * MiB, 10 * MiB)
        self.a.trim(512 * KiB, 11 * MiB + 512 * KiB)
        self.b.flush()
        want = bytes(1 * MiB) + b"\x7f" * (512 * KiB) + bytes(512 * KiB)
        self.assertEqual(self.c.pread(2 * MiB, 10 * MiB), want)
        self.assertEqual(T.read_file(self.img, 10 * MiB, 2 * MiB), want)

    def test_aio_writes_on_a_flush_b_read_c(self):
        rnd = random.Random(4)
        writes = []
        for i in range(48):
            off = i * 1 * MiB + rnd.randrange(0, 4096)
            data = rnd.randbytes(rnd.choice([4096, 65536, 300000]))
            writes.append((off, data))
        cookies = [self.a.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(d)), o) for o, d in writes]
        T.wait_aio(self.a, cookies)
        self.b.flush()
        for off, data in writes:
            self.assertEqual(self.c.pread(len(data), off), data, "at %d" % off)
            self.assertEqual(T.read_file(self.img, off, len(data)), data, "file at %d" % off)

    def test_concurrent_writers_see_each_other(self):
        errors = []
        models = {}

        def writer(idx, h):
            try:
                rnd = random.Random(idx)
                base = idx * 16 * MiB
                m = bytearray(16 * MiB)
                for _ in range(60):
                    off = rnd.randrange(0, 16 * MiB - 65536)
                    data = rnd.randbytes(rnd.randrange(1, 65536))
                    h.pwrite(data, base + off)
                    m[off:off + len(data)] = data
                models[idx] = m
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(i, h), daemon=True)
                   for i, h in enumerate((self.a, self.b, self.c))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        if errors:
            raise errors[0]
        self.c.flush()
        for idx, m in models.items():
            self.assertEqual(T.read_file(self.img, idx * 16 * MiB, 16 * MiB), bytes(m))
        for reader in (self.a, self.b, self.c):
            for idx, m in models.items():
                self.assertEqual(reader.pread(16 * MiB, idx * 16 * MiB), bytes(m))


if __name__ == "__main__":
    unittest.main(verbosity=2)
