# I/O errors under real clients: EIO and ENOSPC injected at chosen reads, writes and syncs of the
# image file (QNBD_TEST_FAULTS, see Sources/UVCore/FaultInjector.swift), and a real full disk on a
# small tmpfs. For qcow2 (64 KiB and 512-byte clusters) and raw, each case checks the NBD error the
# client sees, that another connection goes on being served, the server's log line when the image
# turns read-only, and, after the server stops, that qemu-img finds no corruption (leaks allowed and
# repaired by `qnbd check --repair leaks`) and that the data acknowledged before the last successful
# flush is there.
#
# Faults are armed by a control file: rules carry `while=<file>`, so the setup runs unharmed and the
# test creates the file just before the request it means to fail.
import contextlib
import errno
import os
import struct
import subprocess
import unittest

import qnbdtest as T

MiB = 1024 * 1024


def qemu_img(*args, check=True):
    return T.run(["qemu-img", *args], check=check, timeout=60)


class FaultCase(T.QnbdTestCase):
    """Scratch dir, a control file that arms the rules, servers started with QNBD_TEST_FAULTS."""

    fmt = "qcow2"
    cluster = 65536
    size = 64 * MiB

    def setUp(self):
        super().setUp()
        self.ctl = os.path.join(self.dir, "faults-armed")
        self.img = os.path.join(self.dir, "disk." + self.fmt)
        self.expected = {}   # guest offset -> bytes acknowledged and covered by a successful flush
        self.pending = {}    # acknowledged, not yet covered by a flush

    # -- image and server

    def make(self, directory=None):
        if directory:
            self.img = os.path.join(directory, os.path.basename(self.img))
        if self.fmt == "qcow2":
            qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % self.cluster, self.img, str(self.size))
        else:
            T.make_image(self.img, self.size)
        # A first cluster of data, written by qemu: the L2 table and refcount block exist before qnbd
        # starts, so a rule can name their offsets.
        T.run(["qemu-io", "-f", self.fmt, "-c", "write -P 0x5a 0 %d" % self.cluster, self.img], timeout=60)
        self.expected[0] = b"\x5a" * self.cluster

    def layout(self):
        """(refcount block 0, L2 table of L1 entry 0) host offsets, from the image file."""
        with open(self.img, "rb") as f:
            head = f.read(64)
            l1_offset, reftable = struct.unpack(">Q", head[40:48])[0], struct.unpack(">Q", head[48:56])[0]
            f.seek(reftable)
            refblock = struct.unpack(">Q", f.read(8))[0]
            f.seek(l1_offset)
            l2 = struct.unpack(">Q", f.read(8))[0] & 0x00FFFFFFFFFFFE00
        self.assertTrue(refblock and l2, "qemu-io left no refcount block or L2 table")
        return refblock, l2

    def serve(self, rules):
        rules = ";".join(r + ",while=" + self.ctl for r in rules)
        old = os.environ.get("QNBD_TEST_FAULTS")
        os.environ["QNBD_TEST_FAULTS"] = rules
        try:
            self.srv = self.start_server(self.img, check_stop=False)
        finally:
            if old is None:
                del os.environ["QNBD_TEST_FAULTS"]
            else:
                os.environ["QNBD_TEST_FAULTS"] = old
        self.h1 = self.connect(self.srv)
        self.h2 = self.connect(self.srv)
        return self.srv

    def arm(self):
        open(self.ctl, "w").close()

    def disarm(self):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ctl)

    # -- requests with bookkeeping

    def data(self, k, version=0):
        return T.pattern_bytes(1000 + k + 100000 * version, self.cluster)

    def write(self, h, k, version=0):
        """Writes cluster k's pattern; on success it is acknowledged, pending the next flush."""
        d = self.data(k, version)
        h.pwrite(d, k * self.cluster)
        self.pending[k * self.cluster] = d

    def flush(self, h):
        h.flush()
        self.expected.update(self.pending)
        self.pending.clear()

    def assertReads(self, h, k):
        self.assertBytesEqual(h.pread(self.cluster, k * self.cluster), self.expected[k * self.cluster],
                              "cluster %d read back" % k)

    # -- after the server

    def stop(self, want_rc=(0,)):
        rc = self.srv.stop()
        self.assertIn(rc, want_rc, "server exit status\n" + T.tail(self.srv.log()))
        return self.srv.log()

    def referee(self):
        """No corruption (leaks repaired by qnbd check), and every flushed write reads back."""
        if self.fmt == "qcow2":
            rc = qemu_img("check", "-q", self.img, check=False).returncode
            self.assertIn(rc, (0, 3), "qemu-img check: corruption (exit %d)\n%s" % (
                rc, qemu_img("check", self.img, check=False).stdout))
            if rc == 3:
                T.run([T.QNBD, "check", "--repair", "leaks", "--quiet", self.img], check=False, timeout=60)
                fixed = qemu_img("check", self.img, check=False)
                self.assertEqual(fixed.returncode, 0, "leaks left after qnbd check --repair leaks\n" + fixed.stdout)
            raw = self.img + ".raw"
            qemu_img("convert", "-f", "qcow2", "-O", "raw", self.img, raw)
        else:
            raw = self.img
        with open(raw, "rb") as f:
            for offset, want in sorted(self.expected.items()):
                f.seek(offset)
                self.assertBytesEqual(f.read(len(want)), want, "flushed data at %d" % offset)


class QCow2Faults(FaultCase):
    def test_eio_on_a_data_write_fails_only_that_request(self):
        self.make()
        self.serve(["write,errno=EIO,nth=1"])
        self.write(self.h1, 1)
        self.flush(self.h1)
        self.arm()
        self.assertNbdError(errno.EIO, self.write, self.h1, 2)
        self.disarm()
        # The image stays writable: both connections write and flush.
        self.write(self.h2, 3)
        self.write(self.h1, 2)
        self.flush(self.h2)
        self.assertReads(self.h1, 3)
        self.assertNotIn("read-only", self.stop())
        self.referee()

    def test_eio_on_a_data_read_fails_only_that_request(self):
        self.make()
        self.serve(["read,errno=EIO,nth=1"])
        self.write(self.h1, 1)
        self.flush(self.h1)
        self.assertReads(self.h1, 1)   # the L2 table is cached: the next file read is data
        self.arm()
        self.assertNbdError(errno.EIO, self.h1.pread, self.cluster, self.cluster)
        self.assertReads(self.h2, 1)
        self.write(self.h2, 4)
        self.flush(self.h2)
        self.stop()
        self.referee()

    def _metadata_eio(self, rules, names, write_before_arm=True):
        """A flush whose metadata write or sync fails with EIO: the flush gets EIO, the image turns
        read-only with a log line naming the structure, reads go on."""
        self.serve(rules)
        self.write(self.h1, 1)
        self.flush(self.h1)
        self.arm()
        self.write(self.h1, 2)   # data: not faulted by these rules (or counted as the first write)
        self.assertNbdError(errno.EIO, self.h1.flush)
        self.pending.clear()
        # Another connection: reads work, writes are refused for good.
        self.assertReads(self.h2, 1)
        self.assertReads(self.h2, 0)
        self.disarm()
        self.assertNbdError(errno.EIO, self.write, self.h2, 5)
        self.assertNbdError(errno.EIO, self.h2.flush)
        log = self.stop(want_rc=(0, 1))
        lines = [l for l in log.splitlines() if "read-only from now on" in l]
        self.assertEqual(len(lines), 1, "no single read-only log line\n" + T.tail(log))
        for n in names:
            self.assertIn(n, lines[0])
        self.referee()
        return lines[0]

    def test_eio_on_an_l2_table_write_by_offset(self):
        self.make()
        _, l2 = self.layout()
        self._metadata_eio(["write,errno=EIO,offset=%d+%d" % (l2, self.cluster)],
                           ["writing the L2 table at 0x%x" % l2, "EIO (errno 5)"])

    def test_eio_on_an_l2_table_write_by_ordinal(self):
        # Armed: the data write, the refcount block, then the L2 table (stages A and C of the flush).
        self.make()
        _, l2 = self.layout()
        self._metadata_eio(["write,errno=EIO,nth=3"], ["writing the L2 table at 0x%x" % l2, "EIO (errno 5)"])

    def test_eio_on_a_refcount_block_write(self):
        self.make()
        refblock, _ = self.layout()
        self._metadata_eio(["write,errno=EIO,offset=%d+%d" % (refblock, self.cluster)],
                           ["writing the refcount block at 0x%x" % refblock, "EIO (errno 5)"])

    def test_eio_on_a_sync(self):
        self.make()
        self._metadata_eio(["sync,errno=EIO,from=1"], ["syncing", "EIO (errno 5)"])

    def test_injected_enospc_on_an_l2_table_write_is_survived(self):
        self.make()
        _, l2 = self.layout()
        self._metadata_enospc("write,errno=ENOSPC,offset=%d+%d" % (l2, self.cluster))

    def test_injected_edquot_on_a_refcount_block_write_is_survived(self):
        self.make()
        refblock, _ = self.layout()
        self._metadata_enospc("write,errno=EDQUOT,offset=%d+%d" % (refblock, self.cluster))

    def _metadata_enospc(self, rule):
        """Flushes refused for space (NBD maps EDQUOT to ENOSPC) leave the image writable; once
        space is back one flush makes everything durable."""
        self.serve([rule])
        self.write(self.h1, 1)
        self.flush(self.h1)
        self.arm()
        self.write(self.h1, 2)
        self.assertNbdError(errno.ENOSPC, self.h1.flush)
        # Still writable while the space is missing (an overwrite in place: nothing new is allocated,
        # so only the refused flush's own metadata is left to write); reads see everything written.
        self.write(self.h2, 2, version=1)
        self.assertNbdError(errno.ENOSPC, self.h2.flush)
        self.assertReads(self.h2, 1)
        self.assertBytesEqual(self.h1.pread(self.cluster, 2 * self.cluster), self.data(2, 1), "unflushed write")
        # Space is back: the next flush makes it all durable.
        self.disarm()
        self.flush(self.h1)
        log = self.stop()
        self.assertNotIn("read-only", log)
        self.referee()

    def test_injected_enospc_on_a_data_write_fails_that_write(self):
        self.make()
        self.serve(["write,errno=ENOSPC,from=1"])
        self.arm()
        self.assertNbdError(errno.ENOSPC, self.write, self.h1, 2)
        self.assertReads(self.h2, 0)
        self.disarm()
        self.write(self.h2, 2)
        self.flush(self.h2)
        self.stop()
        self.referee()


class QCow2FaultsSmallClusters(QCow2Faults):
    cluster = 512


class RawFaults(FaultCase):
    fmt = "raw"

    def test_eio_on_a_write(self):
        self.make()
        self.serve(["write,errno=EIO,nth=1"])
        self.arm()
        self.assertNbdError(errno.EIO, self.write, self.h1, 1)
        self.disarm()
        self.write(self.h2, 2)
        self.flush(self.h2)
        self.stop()
        self.referee()

    def test_enospc_on_a_write(self):
        self.make()
        self.serve(["write,errno=ENOSPC,from=1"])
        self.write(self.h1, 1)
        self.flush(self.h1)
        self.arm()
        self.assertNbdError(errno.ENOSPC, self.write, self.h1, 2)
        self.assertReads(self.h2, 1)
        self.disarm()
        self.write(self.h2, 2)
        self.flush(self.h2)
        self.stop()
        self.referee()

    def test_eio_on_a_read(self):
        self.make()
        self.serve(["read,errno=EIO,nth=1"])
        self.write(self.h1, 1)
        self.flush(self.h1)
        self.arm()
        self.assertNbdError(errno.EIO, self.h1.pread, self.cluster, self.cluster)
        self.assertReads(self.h2, 1)
        self.stop()
        self.referee()

    def test_eio_on_fdatasync_fails_the_flush(self):
        self.make()
        self.serve(["sync,errno=EIO,nth=1"])
        self.write(self.h1, 1)
        self.flush(self.h1)
        self.arm()
        self.write(self.h1, 2)
        self.assertNbdError(errno.EIO, self.h1.flush)
        self.disarm()
        self.flush(self.h2)
        self.stop()
        self.referee()


class RealDiskFull(FaultCase):
    """The image on a small tmpfs that a filler file fills up."""

    tmpfs_bytes = 24 * MiB
    # Big enough for a second L2 table (64 KiB clusters: one maps 512 MiB); the file stays sparse.
    size = 1024 * MiB

    def mount_tmpfs(self):
        mnt = os.path.join(self.dir, "mnt")
        os.mkdir(mnt)
        p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%d" % self.tmpfs_bytes, "tmpfs", mnt],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
        if p.returncode != 0:
            raise unittest.SkipTest("cannot mount a tmpfs to fill up (needs root): " + p.stdout.strip())
        self.addCleanup(subprocess.run, ["umount", "-l", mnt], timeout=30)
        return mnt

    def fill(self, path):
        """Writes `path` until the file system is full."""
        chunk = b"\xa5" * (64 * 1024)
        with open(path, "wb", buffering=0) as f:
            while True:
                try:
                    f.write(chunk)
                except OSError as e:
                    self.assertEqual(e.errno, errno.ENOSPC)
                    break
        # What little a short write may have left.
        with open(path, "ab", buffering=0) as f:
            with contextlib.suppress(OSError):
                while f.write(b"\xa5" * 512):
                    pass

    def disk_full_cycle(self):
        mnt = self.mount_tmpfs()
        self.make(mnt)
        self.serve([])
        filler = os.path.join(mnt, "filler")
        for k in range(1, 4):
            self.write(self.h1, k)
        self.flush(self.h1)
        # A write in a new L2 table's range: its data lands past the table's cluster, which stays a
        # hole in the file until a flush writes the table.
        self.write(self.h1, 600 * MiB // self.cluster)
        self.fill(filler)
        if self.fmt == "qcow2":
            self.assertNbdError(errno.ENOSPC, self.flush, self.h2)
        # Write new clusters until the disk refuses; a flush may be refused too.
        refused = None
        for k in range(10, 10 + 64):
            try:
                self.write(self.h1, k)
            except T.nbd.Error as e:
                refused = e
                break
        self.assertIsNotNone(refused, "64 new clusters written on a full disk")
        self.assertEqual(refused.errnum, errno.ENOSPC, refused.string)
        try:
            self.flush(self.h2)
        except T.nbd.Error as e:
            self.assertEqual(e.errnum, errno.ENOSPC, e.string)
        # Reads keep working, on both connections.
        for k in range(1, 4):
            self.assertReads(self.h2, k)
        self.assertReads(self.h1, 0)
        # Space is freed: writes and flushes resume.
        os.unlink(filler)
        self.write(self.h2, 200)
        self.write(self.h1, 9)
        self.flush(self.h1)
        self.assertNotIn("read-only", self.stop())
        self.referee()

    def test_qcow2_survives_a_full_disk(self):
        self.disk_full_cycle()

    def test_raw_survives_a_full_disk(self):
        self.fmt = "raw"
        self.img = os.path.join(self.dir, "disk.raw")
        self.disk_full_cycle()


if __name__ == "__main__":
    T.main()
