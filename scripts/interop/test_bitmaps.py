# Persistent dirty bitmaps, offline half (issue 10), against qemu as the referee:
#   qnbd -> qemu: bitmaps `qnbd bitmap` made or changed are listed by `qemu-img info` with the same
#                 flags and granularity, `qemu-img check` finds the image clean, and `qemu-nbd -B NAME`
#                 serves the dirty map qnbd --merge'd into them (nbdinfo --map=qemu:dirty-bitmap:NAME).
#   qemu -> qnbd: bitmaps qemu made and dirtied (qemu-io writes with the bitmap enabled) read through
#                 `qnbd map --bitmap NAME --output json` equal what qemu-nbd -B NAME serves.
#   operations:   each qnbd bitmap operation and the same qemu-img bitmap operation, on copies of one
#                 image: `qemu-img compare` equal, the same bitmap lists and bits, the same exit codes.
#   hostile:      broken bitmap directories are refused by qnbd bitmap, info and check, naming the fault.
# 64 KiB and 512 B clusters, several granularities.
#
# Run alone: /usr/bin/python3 -m unittest -v scripts/interop/test_bitmaps.py
import json
import os
import shutil
import struct
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qnbdtest as T  # noqa: E402
from qnbdtest import KiB, MiB  # noqa: E402

SIZE = 32 * MiB
WRITES = [(0, 64 * KiB), (3000, 1), (5 * MiB, 200 * KiB), (17 * MiB + 512, 3 * MiB), (SIZE - 512, 512)]
LAYOUTS = [(64 * KiB, [None, 512, 1 * MiB]), (512, [None, 512, 64 * KiB])]


def qnbd(*args, cwd=None):
    return T.run([T.QNBD] + list(args), timeout=120, check=False, cwd=cwd)


def qemu_img(*args, cwd=None, check=True):
    return T.run(["qemu-img"] + list(args), timeout=120, check=check, cwd=cwd)


merged = T.merged_runs


def expected_runs(writes, granularity, size=SIZE):
    dirty = set()
    for off, length in writes:
        dirty.update(range(off // granularity, (off + length - 1) // granularity + 1))
    runs = []
    for g in range((size + granularity - 1) // granularity):
        start = g * granularity
        runs.append((start, min(granularity, size - start), g in dirty))
    return merged(runs)


class BitmapCase(T.QnbdTestCase):
    maxDiff = None

    def path(self, name):
        return os.path.join(self.dir, name)

    def make(self, name, cluster, size=SIZE):
        qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % cluster, self.path(name), str(size))
        return self.path(name)

    def qnbd_ok(self, *args):
        p = qnbd(*args, cwd=self.dir)
        self.assertEqual(p.returncode, 0, "qnbd %s:\n%s%s" % (" ".join(args), p.stdout, p.stderr))
        return p

    def qemu_bitmaps(self, image):
        info = json.loads(qemu_img("info", "--output=json", image).stdout)
        return info["format-specific"]["data"].get("bitmaps", [])

    def qemu_write(self, image, writes):
        argv = ["qemu-io", "-f", "qcow2"]
        for off, length in writes:
            argv += ["-c", "write %d %d" % (off, length)]
        T.run(argv + [image], timeout=120)

    def qnbd_runs(self, image, name):
        out = json.loads(self.qnbd_ok("map", "--bitmap", name, "--output", "json", image).stdout)
        return merged([(r["start"], r["length"], r["dirty"]) for r in out])

    def assert_clean(self, image):
        p = qemu_img("check", image, check=False)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        self.assertIn("No errors were found", p.stdout)


class QnbdToQemu(BitmapCase):
    def test_added_bitmaps_read_by_qemu(self):
        for cluster, granularities in LAYOUTS:
            for g in granularities:
                with self.subTest(cluster=cluster, granularity=g):
                    image = self.make("a-%d-%s.qcow2" % (cluster, g), cluster)
                    self.qnbd_ok("bitmap", "--add", *(["-g", str(g)] if g else []), image, "on")
                    self.qnbd_ok("bitmap", "--add", "--disable", *(["-g", str(g)] if g else []), image, "off")
                    want_g = g or min(64 * KiB, max(4 * KiB, cluster))
                    self.assertEqual(self.qemu_bitmaps(image), [
                        {"flags": ["auto"], "name": "on", "granularity": want_g},
                        {"flags": [], "name": "off", "granularity": want_g}])
                    self.assert_clean(image)
                    self.assertEqual(T.qemu_nbd_dirty_map(self.dir, image, "on"), [(0, SIZE, False)])

    def test_merged_bitmap_served_by_qemu_nbd(self):
        for cluster, granularities in LAYOUTS:
            for g in granularities:
                with self.subTest(cluster=cluster, granularity=g):
                    image = self.make("m-%d-%s.qcow2" % (cluster, g), cluster)
                    qemu_img("bitmap", "--add", "-g", "512", image, "src")
                    self.qemu_write(image, WRITES)
                    self.qnbd_ok("bitmap", "--add", *(["-g", str(g)] if g else []), "--merge", "src", image, "dst")
                    self.assert_clean(image)
                    want = expected_runs(WRITES, g or min(64 * KiB, max(4 * KiB, cluster)))
                    self.assertEqual(T.qemu_nbd_dirty_map(self.dir, image, "dst"), want)
                    self.assertEqual(self.qnbd_runs(image, "dst"), want)


class QemuToQnbd(BitmapCase):
    def test_qemu_dirtied_bitmaps_read_by_qnbd(self):
        for cluster, granularities in LAYOUTS:
            for g in granularities:
                with self.subTest(cluster=cluster, granularity=g):
                    image = self.make("q-%d-%s.qcow2" % (cluster, g), cluster)
                    qemu_img("bitmap", "--add", *(["-g", str(g)] if g else []), image, "b")
                    self.qemu_write(image, WRITES)
                    served = T.qemu_nbd_dirty_map(self.dir, image, "b")
                    self.assertEqual(self.qnbd_runs(image, "b"), served)
                    self.assertTrue(any(d for _, _, d in served))


class SameAsQemuImg(BitmapCase):
    SEQUENCES = [
        [("--add",)],
        [("--add", "-g", "4096"), ("--disable",)],
        [("--add", "--disable")],
        [("--enable",)],
        [("--disable",)],
        [("--clear",)],
        [("--remove",)],
        [("--add", "-g", "1M", "--merge", "base")],
        [("--merge", "base")],
        [("--clear", "--merge", "base", "--disable")],
        [("--remove",), ("--add",), ("--merge", "base")],
    ]

    def prepared(self, cluster):
        image = self.make("p-%d.qcow2" % cluster, cluster)
        qemu_img("bitmap", "--add", "-g", "512", image, "base")
        self.qemu_write(image, WRITES[:3])
        qemu_img("bitmap", "--add", image, "b")
        qemu_img("bitmap", "--disable", image, "base")
        self.qemu_write(image, WRITES[3:])
        return image

    def test_operations_match_qemu_img(self):
        for cluster in (64 * KiB, 512):
            source = self.prepared(cluster)
            for i, steps in enumerate(self.SEQUENCES):
                # A fresh name for --add, the existing "b" for the rest.
                name = "new" if steps[0][0] == "--add" else "b"
                with self.subTest(cluster=cluster, steps=steps):
                    mine, theirs = self.path("mine%d.qcow2" % i), self.path("theirs%d.qcow2" % i)
                    shutil.copy(source, mine)
                    shutil.copy(source, theirs)
                    for step in steps:
                        a = qnbd("bitmap", *step, mine, name, cwd=self.dir)
                        b = qemu_img("bitmap", *step, theirs, name, check=False)
                        self.assertEqual(a.returncode, b.returncode, a.stderr + b.stderr)
                    self.assert_clean(mine)
                    self.assertEqual(qemu_img("compare", mine, theirs, check=False).returncode, 0)
                    self.assertEqual(self.qemu_bitmaps(mine), self.qemu_bitmaps(theirs))
                    for b in self.qemu_bitmaps(theirs):
                        self.assertEqual(self.qnbd_runs(mine, b["name"]), self.qnbd_runs(theirs, b["name"]), b["name"])

    def test_merge_from_another_image(self):
        other = self.make("other.qcow2", 512)
        qemu_img("bitmap", "--add", "-g", "512", other, "ob")
        self.qemu_write(other, WRITES)
        for cluster in (64 * KiB, 512):
            with self.subTest(cluster=cluster):
                mine, theirs = self.make("mm-%d.qcow2" % cluster, cluster), self.path("mt-%d.qcow2" % cluster)
                qemu_img("bitmap", "--add", mine, "t")
                shutil.copy(mine, theirs)
                self.qnbd_ok("bitmap", "--merge", "ob", "-b", other, "-F", "qcow2", mine, "t")
                qemu_img("bitmap", "--merge", "ob", "-b", other, "-F", "qcow2", theirs, "t")
                self.assert_clean(mine)
                self.assertEqual(self.qemu_bitmaps(mine), self.qemu_bitmaps(theirs))
                self.assertEqual(self.qnbd_runs(mine, "t"), T.qemu_nbd_dirty_map(self.dir, theirs, "t"))

    def test_errors_match_qemu_img(self):
        source = self.prepared(64 * KiB)
        cases = [("--add", "b"), ("--remove", "nope"), ("--clear", "nope"), ("--merge", "nope", "b"),
                 ("--enable", "nope"), ("--add", "-g", "1000", "z"), ("--add", "-g", "256", "z"),
                 ("--clear", "-g", "512", "b"), ("--add", "--merge", "b", "-b", "missing.qcow2", "z")]
        for case in cases:
            with self.subTest(case=case):
                mine, theirs = self.path("e-mine.qcow2"), self.path("e-theirs.qcow2")
                shutil.copy(source, mine)
                shutil.copy(source, theirs)
                a = qnbd("bitmap", *case[:-1], mine, case[-1], cwd=self.dir)
                b = qemu_img("bitmap", *case[:-1], theirs, case[-1], check=False)
                self.assertEqual((a.returncode, b.returncode), (1, 1), a.stderr + b.stderr)
                self.assertEqual(qemu_img("compare", mine, theirs, check=False).returncode, 0)
                self.assertEqual(self.qemu_bitmaps(mine), self.qemu_bitmaps(theirs))


class Hostile(BitmapCase):
    def assert_check_like_qemu(self, image):
        a = qnbd("check", "--output", "json", image, cwd=self.dir)
        b = qemu_img("check", "--output=json", image, check=False)
        self.assertEqual(a.returncode, b.returncode, a.stdout + a.stderr + b.stdout + b.stderr)
        mine, theirs = json.loads(a.stdout), json.loads(b.stdout)
        for key in ("corruptions", "leaks", "check-errors", "allocated-clusters", "total-clusters"):
            self.assertEqual(mine.get(key), theirs.get(key), key)

    def test_in_use_bitmaps_as_qemu_img_treats_them(self):
        base = self.make("u.qcow2", 64 * KiB)
        qemu_img("bitmap", "--add", base, "b")
        qemu_img("bitmap", "--add", base, "c")
        self.qemu_write(base, WRITES[:2])
        entry, _ = T.bitmap_directory(base)
        T.poke(base, entry + 12, ">I", 3)   # "b": in_use | auto, as a crash leaves it
        cases = [("--clear", "b"), ("--enable", "b"), ("--disable", "b"), ("--merge", "c", "b"),
                 ("--merge", "b", "c"), ("--remove", "b"), ("--clear", "c")]
        for case in cases:
            with self.subTest(case=case):
                mine, theirs = self.path("u-mine.qcow2"), self.path("u-theirs.qcow2")
                shutil.copy(base, mine)
                shutil.copy(base, theirs)
                a = qnbd("bitmap", *case[:-1], mine, case[-1], cwd=self.dir)
                b = qemu_img("bitmap", *case[:-1], theirs, case[-1], check=False)
                self.assertEqual(a.returncode, b.returncode, a.stderr + b.stderr)
                if b.returncode != 0:
                    self.assertIn("inconsistent", a.stderr)
                self.assertEqual(self.qemu_bitmaps(mine), self.qemu_bitmaps(theirs))
                self.assertEqual(qemu_img("check", mine, check=False).returncode,
                                 qemu_img("check", theirs, check=False).returncode)

    def test_bitmap_data_on_other_clusters_not_freed(self):
        # A table entry pointing at the L2 table: --clear would free the L2 table along with the
        # bitmap's data. qnbd refuses to change bitmaps in an image the check finds corrupt.
        base = self.make("l2.qcow2", 64 * KiB)
        qemu_img("bitmap", "--add", base, "b")
        self.qemu_write(base, WRITES[:2])
        entry, head = T.bitmap_directory(base)
        (l1_offset,) = struct.unpack_from(">Q", head, 40)
        with open(base, "rb") as f:
            f.seek(entry)
            (table,) = struct.unpack(">Q", f.read(8))
            f.seek(l1_offset)
            (l2,) = struct.unpack(">Q", f.read(8))
        T.poke(base, table, ">Q", l2 & 0x00fffffffffffe00)
        before = T.file_contents(base)
        p = qnbd("bitmap", "--clear", base, "b", cwd=self.dir)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertIn("corruptions", p.stderr)
        self.assertEqual(T.file_contents(base), before)

    def test_check_counts_bad_bitmap_tables_like_qemu(self):
        base = self.make("k.qcow2", 64 * KiB)
        qemu_img("bitmap", "--add", base, "b")
        self.qemu_write(base, WRITES[:2])
        entry, _ = T.bitmap_directory(base)
        with open(base, "rb") as f:
            f.seek(entry)
            (table,) = struct.unpack(">Q", f.read(8))
        image = self.path("k2.qcow2")
        shutil.copy(base, image)
        T.poke(image, table, ">Q", (os.path.getsize(base) + 32 * 65536) & ~0xffff)   # data cluster past EOF
        self.assert_check_like_qemu(image)
        self.assert_check_like_qemu(base)
        # A table entry with reserved bits: qemu's check fails (exit 1) for consistent and in-use
        # bitmaps alike; qnbd's says why.
        for flags in (2, 3):
            with self.subTest(flags=flags):
                shutil.copy(base, image)
                T.poke(image, table, ">Q", 2)
                T.poke(image, entry + 12, ">I", flags)
                self.assertEqual(qemu_img("check", image, check=False).returncode, 1)
                p = qnbd("check", image, cwd=self.dir)
                self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
                self.assertIn("bitmap 'b': table entry 0x2 is invalid", p.stderr)

    def test_hostile_directories_refused(self):
        base = self.make("h.qcow2", 64 * KiB)
        qemu_img("bitmap", "--add", base, "b")
        qemu_img("bitmap", "--add", base, "c")
        self.qemu_write(base, WRITES[:2])
        entry, head = T.bitmap_directory(base)
        (l1_offset,) = struct.unpack_from(">Q", head, 40)
        size = os.path.getsize(base)
        second = entry + 32   # "b": 24 + 1-byte name, padded to 32
        # qemu opens the first image (it looks at a table only when it loads the bitmap); qnbd refuses
        # it at once, before any reader or writer can follow the pointer.
        qemu_opens = {"table beyond EOF"}
        cases = {
            "table beyond EOF": (entry, ">Q", (size + 16 * 65536) & ~0xffff, "runs past the end of the file"),
            "table into the L1 table": (entry, ">Q", l1_offset, "overlaps the L1 table"),
            "bad granularity": (entry + 17, ">B", 40, "granularity_bits 40"),
            "duplicate names": (second + 24, ">B", ord("b"), "two bitmaps are named 'b'"),
            "unknown flag": (entry + 12, ">I", 2 | 1 << 7, "unknown flags"),
        }
        for what, (offset, fmt, value, message) in cases.items():
            with self.subTest(what):
                image = self.path("hostile.qcow2")
                shutil.copy(base, image)
                T.poke(image, offset, fmt, value)
                before = T.file_contents(image)
                commands = [["bitmap", "--add", image, "x"], ["bitmap", "--remove", image, "c"],
                            ["info", image], ["map", "--bitmap", "b", image]]
                if what in qemu_opens:
                    # qemu-img check counts this one (a reference past the end of the file); so does qnbd.
                    self.assert_check_like_qemu(image)
                else:
                    commands.append(["check", image])
                for argv in commands:
                    p = qnbd(*argv, cwd=self.dir)
                    self.assertNotEqual(p.returncode, 0, "%s accepted it" % argv[0])
                    self.assertIn(message, p.stdout + p.stderr, argv)
                if what not in qemu_opens:
                    self.assertNotEqual(qemu_img("info", image, check=False).returncode, 0, "qemu refuses it too")
                self.assertEqual(T.file_contents(image), before, "a refusal must not write")


if __name__ == "__main__":
    unittest.main()
