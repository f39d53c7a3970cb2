# qcow2 writes through qnbd, refereed by qemu: a differential workload over a CI-sized matrix
# (the full matrix: scripts/interop/qcow2diff.py --matrix), and the NBD semantics qcow2 adds.
import json
import os
import unittest

import qnbdtest as T
from qcow2diff import Case, run_case, qemu_img

MiB = 1024 * 1024


class DifferentialTests(unittest.TestCase):
    """Concurrent random writes, zeroes, trims and flushes on three connections; after a clean stop
    qemu-img check finds no errors or leaks and qemu-img compare finds the image equal to the model."""

    def check(self, **kw):
        problems = run_case(Case(ops=1200, **kw))
        self.assertEqual(problems, [], "\n".join(problems))

    def test_default_v3_64k(self):
        self.check()

    def test_512_byte_clusters_grow_the_refcount_table(self):
        # 512-byte clusters with 16-bit refcounts: a refcount block covers 128 KiB and the first table
        # 8 MiB, so the workload allocates new refcount blocks and moves the table.
        self.check(cluster=512)

    def test_1_bit_refcounts_4k_clusters(self):
        self.check(cluster=4096, refcount_bits=1)

    def test_v2_with_qcow2_backing(self):
        self.check(compat="0.10", cluster=4096, backing="qcow2")

    def test_2m_clusters_64_bit_refcounts_raw_backing(self):
        self.check(cluster=2 * MiB, refcount_bits=64, backing="raw", size=128 * MiB)

    def test_extended_l2_subclusters_over_a_backing_file(self):
        self.check(extended_l2=True, backing="qcow2")

    def test_persistent_bitmaps_mark_every_change(self):
        # Bitmaps kept and stored: qemu-img info lists them unchanged, qemu-nbd -B shows every change.
        self.check(bitmaps=True)
        self.check(bitmaps=True, cluster=512, backing="qcow2")

    def test_extended_l2_16k_clusters_with_a_snapshot(self):
        self.check(extended_l2=True, cluster=16384, snapshot=True)

    def test_internal_snapshot_is_copied_on_write_and_survives(self):
        self.check(snapshot=True)

    def test_lazy_refcounts_with_backing_smaller_than_the_image(self):
        self.check(lazy=True, backing="qcow2", backing_size=40 * MiB)


class QCow2SemanticsTests(unittest.TestCase):
    def setUp(self):
        self.dir = T.new_workdir(self.id())
        self.img = os.path.join(self.dir, "disk.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", self.img, str(64 * MiB))
        self.srv = T.Server(self.dir, self.img).start()
        self.h = T.nbd.NBD()
        self.h.set_strict_mode(0)
        self.h.add_meta_context("base:allocation")
        self.h.add_meta_context("qemu:allocation-depth")
        self.h.connect_uri(self.srv.uri())

    def tearDown(self):
        try:
            self.h.shutdown()
        except Exception:
            pass
        self.assertEqual(self.srv.stop(), 0, self.srv.log())
        check = qemu_img("check", "-f", "qcow2", self.img, check=False)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)

    def test_flags_and_contexts(self):
        self.assertFalse(self.h.is_read_only())
        self.assertTrue(self.h.can_trim())
        self.assertTrue(self.h.can_zero())
        self.assertTrue(self.h.can_fast_zero())
        self.assertTrue(self.h.can_multi_conn())
        self.assertTrue(self.h.can_meta_context("qemu:allocation-depth"))

    def test_trim_frees_clusters_and_the_file_shrinks(self):
        self.h.pwrite(b"\xab" * (8 * MiB), 0)
        self.h.flush()
        before = T.allocated_bytes(self.img)
        self.h.trim(8 * MiB, 0)
        self.h.flush()
        self.h.flush()   # the second flush writes the refcount decreases the first one applied
        after = T.allocated_bytes(self.img)
        self.assertLess(after, before - 6 * MiB, "trimmed clusters are punched out of the file")
        self.assertEqual(self.h.pread(MiB, 0), bytes(MiB))
        # Freed clusters are reused: writing again does not grow the file past its old size.
        size = os.path.getsize(self.img)
        self.h.pwrite(b"\xcd" * (4 * MiB), 16 * MiB)
        self.h.flush()
        self.assertLessEqual(os.path.getsize(self.img), size)

    def test_fast_zero_only_for_whole_clusters(self):
        self.h.pwrite(b"\x11" * (1 * MiB), 0)
        self.h.zero(64 * 1024, 0, T.nbd.CMD_FLAG_FAST_ZERO)
        self.assertEqual(self.h.pread(64 * 1024, 0), bytes(64 * 1024))
        with self.assertRaises(T.nbd.Error) as e:
            self.h.zero(4096, 128 * 1024 + 512, T.nbd.CMD_FLAG_FAST_ZERO)
        self.assertEqual(e.exception.errnum, T.errno.ENOTSUP)
        self.assertEqual(self.h.pread(4096, 128 * 1024 + 512), b"\x11" * 4096, "a refused fast zero changes nothing")

    def test_zeroes_leave_no_data_and_no_hole_keeps_allocation(self):
        self.h.pwrite(b"\x22" * (2 * MiB), 0)
        self.h.zero(MiB, 0)
        self.h.zero(MiB, MiB, T.nbd.CMD_FLAG_NO_HOLE)
        self.h.flush()
        self.assertEqual(self.h.pread(2 * MiB, 0), bytes(2 * MiB))
        ext = self.extents("base:allocation", 0, 2 * MiB)
        self.assertEqual(ext, [(MiB, 3), (MiB, 2)], "zero clusters are holes; NO_HOLE keeps them allocated")

    def extents(self, context, offset, length):
        out = []

        def cb(meta, off, entries, err):
            if meta == context:
                for i in range(0, len(entries), 2):
                    out.append((entries[i], entries[i + 1]))
            return 0
        self.h.block_status(length, offset, cb)
        merged = []
        for n, f in out:
            if merged and merged[-1][1] == f:
                merged[-1] = (merged[-1][0] + n, f)
            else:
                merged.append((n, f))
        return merged

    def test_block_status_after_writes_matches_qemu_img_map(self):
        self.h.pwrite(b"\x33" * 200000, 1000000)
        self.h.zero(2 * MiB, 10 * MiB)
        self.h.pwrite(b"\x44" * 4096, 40 * MiB)
        self.h.flush()
        ours = []
        off = 0
        while off < 64 * MiB:
            ext = self.extents("base:allocation", off, 64 * MiB - off)
            for n, f in ext:
                ours.append((off, n, f))
                off += n
        # Allocation (the HOLE bit) must agree. qemu also looks into the host file and calls the holes
        # inside a freshly written cluster "zero"; NBD allows a server not to know that.
        ours = T.merge_extents([(o, n, f & 1) for o, n, f in ours])
        qemu = T.merge_extents([(e["start"], e["length"], T.qemu_map_flags(e) & 1) for e in json.loads(
            qemu_img("map", "--output=json", "-U", "-f", "qcow2", self.img).stdout)])
        self.assertEqual(ours, qemu)

    def test_fua_write_is_in_the_file_without_flush(self):
        self.h.pwrite(b"\x55" * 65536, 5 * MiB, T.nbd.CMD_FLAG_FUA)
        out = qemu_img("convert", "-U", "-f", "qcow2", "-O", "raw", self.img, os.path.join(self.dir, "x.raw"))
        self.assertEqual(out.returncode, 0)
        self.assertEqual(T.read_file(os.path.join(self.dir, "x.raw"), 5 * MiB, 65536), b"\x55" * 65536)


class QCow2OpenTests(unittest.TestCase):
    def test_dirty_image_is_repaired_before_it_is_served_writable(self):
        d = T.new_workdir(self.id())
        img = os.path.join(d, "dirty.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, str(16 * MiB))
        T.run(["qemu-io", "-f", "qcow2", img, "-c", "write -P 7 0 1M"])
        with open(img, "r+b") as f:
            # What a crash with lazy refcounts leaves: the dirty bit, and refcounts that were never
            # written for clusters the L2 table already uses.
            data = bytearray(f.read())
            data[72:80] = (1).to_bytes(8, "big")
            table = int.from_bytes(data[48:56], "big")
            block = int.from_bytes(data[table:table + 8], "big")
            for cluster in range(5, 9):
                data[block + 2 * cluster:block + 2 * cluster + 2] = b"\0\0"
            f.seek(0)
            f.write(data)
        srv = T.Server(d, img).start()
        h = T.nbd.NBD()
        h.connect_uri(srv.uri())
        self.assertEqual(h.pread(MiB, 0), b"\x07" * MiB, "data survives the repair")
        h.pwrite(b"\x08" * MiB, 4 * MiB)
        h.shutdown()
        self.assertEqual(srv.stop(), 0)
        self.assertIn("repaired 4 refcount errors", srv.log())
        check = qemu_img("check", "-f", "qcow2", img, check=False)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        with open(img, "rb") as f:
            self.assertEqual(f.read(80)[72:80], bytes(8), "the dirty bit is cleared")

    def test_a_corrupt_entry_fails_its_request_and_marks_the_image_corrupt(self):
        d = T.new_workdir(self.id())
        img = os.path.join(d, "bad.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", img, str(16 * MiB))
        T.run(["qemu-io", "-f", "qcow2", img, "-c", "write -P 7 0 128k", "-c", "write -P 9 1M 64k"])
        with open(img, "r+b") as f:
            data = bytearray(f.read())
            l1 = int.from_bytes(data[40:48], "big")
            l2 = int.from_bytes(data[l1:l1 + 8], "big") & 0x00FFFFFFFFFFFE00
            # The second cluster's entry now points 1 TiB past the end of the file.
            data[l2 + 8:l2 + 16] = ((1 << 63) | (1 << 40)).to_bytes(8, "big")
            f.seek(0)
            f.write(data)
        srv = T.Server(d, img).start()
        h = T.nbd.NBD()
        h.connect_uri(srv.uri())
        self.assertEqual(h.pread(65536, 0), b"\x07" * 65536)
        with self.assertRaises(T.nbd.Error) as e:
            h.pread(65536, 65536)
        self.assertEqual(e.exception.errnum, T.errno.EIO)
        self.assertEqual(h.pread(65536, MiB), b"\x09" * 65536, "sound clusters still read")
        with self.assertRaises(T.nbd.Error):
            h.pwrite(b"x" * 4096, 2 * MiB)
        h.shutdown()
        self.assertEqual(srv.stop(), 0)
        self.assertIn("lies outside the image file", srv.log())
        with open(img, "rb") as f:
            self.assertTrue(int.from_bytes(f.read(80)[72:80], "big") & 2, "the corrupt bit is set")
        self.assertEqual(os.path.getsize(img), len(data), "nothing was written outside the image")

    def test_unknown_autoclear_bits_are_cleared_and_bitmaps_kept_on_a_writable_open(self):
        d = T.new_workdir(self.id())
        img = os.path.join(d, "bm.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", img, str(16 * MiB))
        qemu_img("bitmap", "--add", img, "b0")
        # An autoclear bit qnbd does not know (bit 1) besides the bitmaps bit (0).
        with open(img, "r+b") as f:
            f.seek(88)
            self.assertEqual(f.read(8), (1).to_bytes(8, "big"))
            f.seek(88)
            f.write((3).to_bytes(8, "big"))
        srv = T.Server(d, img).start()
        self.assertEqual(srv.stop(), 0)
        with open(img, "rb") as f:
            self.assertEqual(f.read(96)[88:96], (1).to_bytes(8, "big"),
                             "unknown autoclear bits are cleared; the bitmaps bit stays (qnbd maintains bitmaps)")
        check = qemu_img("check", "-f", "qcow2", img, check=False)
        self.assertEqual(check.returncode, 0, check.stdout + check.stderr)
        info = qemu_img("info", "--output=json", img).stdout
        self.assertIn('"b0"', info)


if __name__ == "__main__":
    unittest.main()
