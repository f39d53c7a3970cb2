# Persistent dirty bitmaps, engine half (issue 10): images whose bitmaps qemu (or `qnbd bitmap`) made,
# served read-write by `qnbd serve`, written through python3-libnbd (writes, zeroes, trims), stopped
# cleanly, then judged by qemu:
#   - `qemu-img check` exits 0 and `qemu-img info` lists the same bitmaps with the same flags and
#     granularity (enabled ones not left in use);
#   - `qemu-nbd -r -B NAME` + `nbdinfo --map=qemu:dirty-bitmap:NAME` shows exactly the granules dirty
#     before plus every granule qnbd wrote;
#   - disabled bitmaps are unchanged (`qnbd map --bitmap` before and after);
#   - serving with no client writing keeps the bitmaps (the original bug);
#   - hostile directories: a corrupt one is refused, an unknown flag serves read-only; neither is written.
# 64 KiB and 512 B clusters; granularities 512 B, 64 KiB and 1 MiB.
#
# Run alone: /usr/bin/python3 -m unittest -v scripts/interop/test_bitmaps_engine.py
import os
import shutil
import struct
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qnbdtest as T  # noqa: E402
from qnbdtest import KiB, MiB  # noqa: E402
from test_bitmaps import SIZE, BitmapCase, expected_runs, qemu_img, qnbd  # noqa: E402

EARLIER = [(1 * MiB, 4 * KiB), (9 * MiB + 100, 70 * KiB)]
# (kind, offset, length) sent through NBD while qnbd serves.
SERVED = [("write", 0, 4 * KiB), ("write", 3000, 1), ("write", 5 * MiB + 512, 200 * KiB),
          ("zero", 12 * MiB, 3 * MiB), ("zero", 20 * MiB + 7, 1000), ("trim", 24 * MiB, 1 * MiB),
          ("write", SIZE - 512, 512)]
GRANULARITIES = [512, 64 * KiB, 1 * MiB]


def bitmap_list(case, image):
    return sorted((b["name"], b["granularity"], tuple(b["flags"])) for b in case.qemu_bitmaps(image))


class EngineBitmaps(BitmapCase):
    def make_with_bitmaps(self, cluster):
        """Enabled bitmaps g512/g65536/g1048576 and a disabled one, all dirtied by earlier qemu-io
        writes; then one write after `frozen` was disabled (qemu marks only the enabled ones)."""
        image = self.make("disk-%d.qcow2" % cluster, cluster)
        for g in GRANULARITIES:
            qemu_img("bitmap", "--add", "-g", str(g), image, "g%d" % g)
        qemu_img("bitmap", "--add", "-g", "65536", image, "frozen")
        self.qemu_write(image, EARLIER)
        qemu_img("bitmap", "--disable", image, "frozen")
        return image

    def serve_and_write(self, image, requests):
        srv = T.Server(self.dir, image).start()
        try:
            if requests:
                h = T.nbd.NBD()
                h.connect_uri(srv.uri())
                for kind, off, length in requests:
                    if kind == "write":
                        h.pwrite(bytes([0x5a]) * length, off)
                    elif kind == "zero":
                        h.zero(length, off)
                    else:
                        h.trim(length, off)
                h.flush()
                h.shutdown()
        finally:
            rc = srv.stop()
        self.assertEqual(rc, 0, srv.log())
        return srv

    def test_bitmaps_survive_serving_without_writes(self):
        for cluster in (64 * KiB, 512):
            with self.subTest(cluster=cluster):
                image = self.make_with_bitmaps(cluster)
                before = bitmap_list(self, image)
                runs = {name: self.qnbd_runs(image, name) for name, _, _ in before}
                self.serve_and_write(image, [])
                self.assert_clean(image)
                self.assertEqual(bitmap_list(self, image), before)
                for name, r in runs.items():
                    self.assertEqual(self.qnbd_runs(image, name), r, name)

    def test_qnbd_writes_dirty_qemu_bitmaps(self):
        for cluster in (64 * KiB, 512):
            with self.subTest(cluster=cluster):
                image = self.make_with_bitmaps(cluster)
                before = bitmap_list(self, image)
                self.assertIn(("frozen", 65536, ()), before)
                frozen = self.qnbd_runs(image, "frozen")
                self.serve_and_write(image, SERVED)
                self.assert_clean(image)
                self.assertEqual(bitmap_list(self, image), before, "the same bitmaps, flags and granularities")
                written = EARLIER + [(off, length) for _, off, length in SERVED]
                for g in GRANULARITIES:
                    self.assertEqual(T.qemu_nbd_dirty_map(self.dir, image, "g%d" % g), expected_runs(written, g), "g%d" % g)
                self.assertEqual(self.qnbd_runs(image, "frozen"), frozen, "a disabled bitmap is not changed")
                self.assertEqual(T.qemu_nbd_dirty_map(self.dir, image, "frozen"), expected_runs(EARLIER, 65536))

    def test_qnbd_added_bitmap_dirtied_by_serving_reads_in_qemu(self):
        image = self.make("added.qcow2", 64 * KiB)
        self.qnbd_ok("bitmap", "--add", "-g", "65536", image, "b")
        self.serve_and_write(image, SERVED)
        self.assert_clean(image)
        self.assertEqual(bitmap_list(self, image), [("b", 65536, ("auto",))])
        self.assertEqual(T.qemu_nbd_dirty_map(self.dir, image, "b"), expected_runs([(o, n) for _, o, n in SERVED], 65536))
        # Served again, with more writes: they add to what was stored.
        self.serve_and_write(image, [("write", 30 * MiB, 1)])
        self.assertEqual(T.qemu_nbd_dirty_map(self.dir, image, "b"),
                         expected_runs([(o, n) for _, o, n in SERVED] + [(30 * MiB, 1)], 65536))

    def test_killed_server_leaves_enabled_bitmaps_in_use(self):
        image = self.make_with_bitmaps(64 * KiB)
        frozen = self.qnbd_runs(image, "frozen")
        srv = T.Server(self.dir, image).start()
        h = T.nbd.NBD()
        h.connect_uri(srv.uri())
        h.pwrite(b"\x01" * 4096, 0)
        h.flush()
        srv.stop(sig=9)
        listed = dict((n, f) for n, _, f in bitmap_list(self, image))
        for g in GRANULARITIES:
            self.assertEqual(listed["g%d" % g], ("in-use", "auto"), "an unstored bitmap reads as inconsistent")
        self.assertEqual(listed["frozen"], ())
        self.assertEqual(self.qnbd_runs(image, "frozen"), frozen)
        p = qemu_img("check", image, check=False)
        self.assertIn(p.returncode, (0, 3), p.stdout + p.stderr)

    def test_hostile_directories_refused_or_read_only_never_written(self):
        base = self.make_with_bitmaps(64 * KiB)
        entry, head = T.bitmap_directory(base)
        (l1_offset,) = struct.unpack_from(">Q", head, 40)
        cases = {
            "table into the L1 table": (entry, ">Q", l1_offset, False),
            "bad granularity": (entry + 17, ">B", 40, False),
            "unknown flag": (entry + 12, ">I", 2 | 1 << 7, True),
        }
        for what, (offset, fmt, value, serves) in cases.items():
            with self.subTest(what):
                image = self.path("hostile.qcow2")
                shutil.copy(base, image)
                T.poke(image, offset, fmt, value)
                before = T.file_contents(image)
                srv = T.Server(self.dir, image)
                if serves:
                    srv.start()
                    try:
                        h = T.nbd.NBD()
                        h.connect_uri(srv.uri())
                        self.assertTrue(h.is_read_only(), "unknown bitmap flags serve read-only")
                        with self.assertRaises(T.nbd.Error):
                            h.pwrite(b"x" * 512, 0)
                        h.shutdown()
                    finally:
                        self.assertEqual(srv.stop(), 0)
                    self.assertIn("unknown flags", srv.log())
                else:
                    with self.assertRaises(T.ServerStartError):
                        srv.start()
                    srv.stop()
                self.assertEqual(T.file_contents(image), before, "never written")


if __name__ == "__main__":
    unittest.main()
