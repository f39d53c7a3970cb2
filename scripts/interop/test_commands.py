# Transmission commands, flags and error codes via python3-libnbd (plus raw sockets where libnbd
# cannot produce the request). Run alone: /usr/bin/python3 -m unittest -v scripts/interop/test_commands.py
import errno
import hashlib
import os
import random
import struct
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qnbdtest as T  # noqa: E402
from qnbdtest import KiB, MiB, nbd  # noqa: E402

SIZE = 64 * MiB
# Allocated regions of the test image; everything else is a hole.
REGIONS = [(0, T.pattern_bytes(10, 1 * MiB)),
           (4 * MiB, T.pattern_bytes(11, 64 * KiB)),
           (10 * MiB, T.pattern_bytes(12, 2 * MiB)),
           (63 * MiB, T.pattern_bytes(13, 1 * MiB))]


def model_image():
    m = bytearray(SIZE)
    for off, data in REGIONS:
        m[off:off + len(data)] = data
    return m


class CommandBase(T.QnbdTestCase):
    read_only = False
    strict = True

    def setUp(self):
        super().setUp()
        self.img = self.image(SIZE, REGIONS)
        self.model = model_image()
        self.srv = self.start_server(self.img, read_only=self.read_only)
        self.h = self.connect(self.srv, strict=self.strict)

    def check_range(self, off, length, what="export"):
        got = b"".join(self.h.pread(min(16 * MiB, off + length - o), o)
                       for o in range(off, off + length, 16 * MiB))
        self.assertBytesEqual(got, self.model[off:off + length],
                              "%s [%d, +%d) via NBD" % (what, off, length))
        self.assertBytesEqual(T.read_file(self.img, off, length), self.model[off:off + length],
                              "%s [%d, +%d) in the image file" % (what, off, length))

    def check_all(self):
        for off in range(0, SIZE, 16 * MiB):
            self.check_range(off, 16 * MiB)

    def write(self, off, data, flags=0):
        self.h.pwrite(data, off, flags)
        self.model[off:off + len(data)] = data


class CommandTests(CommandBase):
    def test_size_flags_and_block_sizes(self):
        h = self.h
        self.assertEqual(h.get_size(), SIZE)
        self.assertFalse(h.is_read_only())
        for cap in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero", "can_df",
                    "can_multi_conn", "can_cache"):
            self.assertTrue(getattr(h, cap)(), cap)
        self.assertFalse(h.is_rotational())
        self.assertTrue(h.can_meta_context("base:allocation"))
        self.assertEqual([h.get_block_size(nbd.SIZE_MINIMUM), h.get_block_size(nbd.SIZE_PREFERRED),
                          h.get_block_size(nbd.SIZE_MAXIMUM)], [1, 4096, 32 * MiB])
        self.assertTrue(h.get_structured_replies_negotiated())

    def test_read_matches_image(self):
        self.check_all()
        self.check_range(1 * MiB - 7, 20)            # data/hole boundary, odd offsets
        self.check_range(SIZE - 1, 1)

    def test_write_read_roundtrip(self):
        rnd = random.Random(7)
        cases = [(0, 1), (1, 511), (12345, 77777), (SIZE - 1, 1), (SIZE - 100000, 100000),
                 (5 * MiB + 3, 1 * MiB + 5), (20 * MiB, 4 * MiB), (1 * MiB - 100, 200)]
        for off, length in cases:
            self.write(off, rnd.randbytes(length))
            lo, hi = max(0, off - 4096), min(SIZE, off + length + 4096)
            self.check_range(lo, hi - lo, "after write at %d+%d" % (off, length))
        self.check_all()

    def test_read_with_df(self):
        for off, length in [(0, 64 * KiB), (1 * MiB - 4096, 64 * KiB), (30 * MiB, 64 * KiB),
                            (10 * MiB + 1, 4095)]:
            chunks = []

            def cb(subbuf, offset, status, err):
                chunks.append((offset, len(subbuf), status))
                return 0
            buf = self.h.pread_structured(length, off, cb, nbd.CMD_FLAG_DF)
            self.assertEqual(len(chunks), 1, "DF read at %d came in %d chunks" % (off, len(chunks)))
            self.assertBytesEqual(buf, self.model[off:off + length], "DF read at %d" % off)

    def test_structured_read_chunks_cover_range(self):
        for off, length in [(0, 4 * MiB), (1 * MiB - 512, 3 * MiB + 1024), (62 * MiB, 2 * MiB),
                            (4 * MiB + 100, 65536)]:
            chunks = []

            def cb(subbuf, offset, status, err):
                chunks.append((offset, bytes(subbuf), status))
                return 0
            buf = self.h.pread_structured(length, off, cb)
            self.assertBytesEqual(buf, self.model[off:off + length])
            pos = off
            for coff, data, status in sorted(chunks):
                self.assertEqual(coff, pos, "chunks overlap or leave a gap at %d" % pos)
                self.assertIn(status, (nbd.READ_DATA, nbd.READ_HOLE))
                if status == nbd.READ_HOLE:
                    self.assertZero(self.model[coff:coff + len(data)], "hole chunk at %d" % coff)
                pos += len(data)
            self.assertEqual(pos, off + length)

    def test_fua_write_is_in_the_file_on_reply(self):
        data = T.pattern_bytes(20, 256 * KiB)
        self.write(7 * MiB + 3, data, nbd.CMD_FLAG_FUA)
        self.assertEqual(T.read_file(self.img, 7 * MiB + 3, len(data)), data)
        self.check_range(7 * MiB, 512 * KiB)

    def test_flush(self):
        self.h.flush()     # nothing pending
        for i in range(8):
            self.write(i * 3 * MiB + 17, T.pattern_bytes(30 + i, 100 * KiB))
        self.h.flush()
        self.check_all()

    def test_trim_reads_zero_and_frees_blocks(self):
        data = T.pattern_bytes(40, 12 * MiB)
        self.write(16 * MiB, data)
        self.h.flush()
        before = T.allocated_bytes(self.img)
        self.h.trim(8 * MiB, 18 * MiB)
        self.h.flush()
        self.model[18 * MiB:26 * MiB] = bytes(8 * MiB)
        after = T.allocated_bytes(self.img)
        self.assertGreaterEqual(before - after, 7 * MiB,
                                "TRIM of 8 MiB freed only %d bytes" % (before - after))
        self.assertZero(self.h.pread(8 * MiB, 18 * MiB), "trimmed range")
        self.check_range(15 * MiB, 14 * MiB, "around the trimmed range")
        ext = T.block_status_map(self.h, 18 * MiB, 8 * MiB)
        self.assertEqual(ext, [(18 * MiB, 8 * MiB, T.STATE_HOLE | T.STATE_ZERO)])

    def test_trim_misaligned_keeps_neighbours(self):
        self.write(30 * MiB, T.pattern_bytes(41, 1 * MiB))
        self.h.trim(10000, 30 * MiB + 4096 + 7)
        # trimmed bytes are unspecified unless aligned; bytes outside must be intact
        before = self.h.pread(4096 + 7, 30 * MiB)
        self.assertBytesEqual(before, self.model[30 * MiB:30 * MiB + 4096 + 7])
        tail_off = 30 * MiB + 4096 + 7 + 10000
        self.assertBytesEqual(self.h.pread(31 * MiB - tail_off, tail_off),
                              self.model[tail_off:31 * MiB])

    def _zero(self, off, length, flags=0):
        self.h.zero(length, off, flags)
        self.model[off:off + length] = bytes(length)

    def test_write_zeroes(self):
        self.write(20 * MiB, T.pattern_bytes(50, 8 * MiB))
        cases = [(20 * MiB + 100000, 12345, 0),
                 (21 * MiB, 1 * MiB, 0),
                 (22 * MiB + 1, 1 * MiB - 2, nbd.CMD_FLAG_NO_HOLE),
                 (23 * MiB, 1 * MiB, nbd.CMD_FLAG_FAST_ZERO),
                 (24 * MiB + 512, 512 * KiB, nbd.CMD_FLAG_FUA),
                 (25 * MiB, 2 * MiB, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)]
        for off, length, flags in cases:
            self._zero(off, length, flags)
            self.assertZero(self.h.pread(length, off), "zeroed [%d,+%d) flags %d" % (
                off, length, flags))
            self.check_range(20 * MiB, 8 * MiB, "after zero at %d flags %d" % (off, flags))
        # zeroing a hole and data straddling the end of the export
        self._zero(SIZE - 1 * MiB - 4096, 1 * MiB + 4096)
        self.check_range(SIZE - 2 * MiB, 2 * MiB)

    def test_write_zeroes_no_hole_keeps_allocation(self):
        self.write(40 * MiB, T.pattern_bytes(51, 4 * MiB))
        self.h.flush()
        before = T.allocated_bytes(self.img)
        self._zero(40 * MiB, 4 * MiB, nbd.CMD_FLAG_NO_HOLE)
        self.h.flush()
        self.assertZero(self.h.pread(4 * MiB, 40 * MiB))
        self.assertZero(T.read_file(self.img, 40 * MiB, 4 * MiB), "image file")
        after = T.allocated_bytes(self.img)
        self.assertGreaterEqual(after, before - 64 * KiB,
                                "NO_HOLE zeroing deallocated %d bytes" % (before - after))

    def test_write_zeroes_fast_zero(self):
        self.write(44 * MiB, T.pattern_bytes(52, 2 * MiB))
        self._zero(44 * MiB, 2 * MiB, nbd.CMD_FLAG_FAST_ZERO)
        self.check_range(43 * MiB, 4 * MiB)

    def test_trim_and_zero_larger_than_max_payload(self):
        # effect lengths above 32 MiB carry no payload; kernels send such discards
        self.write(8 * MiB, T.pattern_bytes(53, 4 * MiB))
        self._zero(0, SIZE - 1 * MiB)
        self.check_all()
        self.write(40 * MiB, T.pattern_bytes(54, 4 * MiB))
        self.h.trim(SIZE, 0)
        self.h.flush()
        self.assertZero(self.h.pread(32 * MiB, 0))
        self.assertZero(self.h.pread(32 * MiB, 32 * MiB))
        self.assertLess(T.allocated_bytes(self.img), 1 * MiB, "whole-export TRIM freed too little")

    def test_cache(self):
        self.h.cache(1 * MiB, 0)
        self.h.cache(32 * MiB, 32 * MiB)
        self.h.cache(4097, 10 * MiB + 3)
        self.check_range(0, 2 * MiB)

    def test_block_status_matches_qemu_img_map(self):
        self.assertEqual(T.block_status_map(self.h), T.file_map(self.img))
        # change the allocation and compare again
        self.write(30 * MiB, T.pattern_bytes(60, 1 * MiB))
        self.h.trim(1 * MiB, 10 * MiB)
        self.write(50 * MiB + 4096, T.pattern_bytes(61, 64 * KiB))
        self.h.flush()
        expected = T.file_map(self.img)
        self.assertIn((30 * MiB, 1 * MiB, 0), expected)      # referee sanity
        self.assertEqual(T.block_status_map(self.h), expected)
        # every extent describes the file: holes read as zero
        for off, length, flags in expected:
            if flags & T.STATE_ZERO:
                self.assertZero(self.h.pread(min(length, 4 * MiB), off), "hole at %d" % off)

    def test_block_status_req_one(self):
        expected = T.file_map(self.img)
        probes = [0, 512 * KiB, 1 * MiB - 512, 1 * MiB, 2 * MiB, 4 * MiB + 4096, 4 * MiB + 64 * KiB,
                  10 * MiB + 1 * MiB, 20 * MiB, 63 * MiB, SIZE - 4096]
        for off in probes:
            for length in sorted({min(4096, SIZE - off), min(3 * MiB, SIZE - off), SIZE - off}):
                got = []

                def cb(ctx, o, entries, err):
                    got.append((ctx, o, list(entries)))
                    return 0
                self.h.block_status(length, off, cb, nbd.CMD_FLAG_REQ_ONE)
                self.assertEqual(len(got), 1)
                ctx, o, entries = got[0]
                self.assertEqual((ctx, o), ("base:allocation", off))
                self.assertEqual(len(entries), 2, "REQ_ONE at %d gave %r" % (off, entries))
                elen, eflags = entries
                want, region_end = T.flags_at(expected, off)
                self.assertEqual(eflags, want, "flags at %d" % off)
                self.assertGreater(elen, 0)
                self.assertLessEqual(elen, length)
                self.assertLessEqual(off + elen, region_end, "extent at %d too long" % off)

    def test_many_in_flight_aio(self):
        h = self.h
        rnd = random.Random(99)
        slots = rnd.sample(range(0, SIZE // (256 * KiB)), 64)
        writes = {}
        cookies = []
        for i, slot in enumerate(slots):
            off = slot * 256 * KiB + rnd.randrange(0, 4096)
            data = rnd.randbytes(rnd.choice([512, 4096, 65536, 100000]))
            writes[off] = data
            cookies.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off))
        self.assertEqual(h.aio_in_flight(), 64)
        T.wait_aio(h, cookies)
        for off, data in writes.items():
            self.model[off:off + len(data)] = data
        # 64 reads in flight, interleaved with 32 writes elsewhere
        reads = []
        for off, data in writes.items():
            buf = nbd.Buffer(len(data))
            reads.append((h.aio_pread(buf, off), buf, off, data))
        more = []
        for i in range(32):
            off = 48 * MiB + i * 128 * KiB
            data = rnd.randbytes(128 * KiB)
            self.model[off:off + len(data)] = data
            more.append(h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(data)), off,
                                     flags=nbd.CMD_FLAG_FUA if i % 4 == 0 else 0))
        self.assertGreaterEqual(h.aio_in_flight(), 64)
        T.wait_aio(h, [r[0] for r in reads] + more)
        for ck, buf, off, data in reads:
            self.assertBytesEqual(buf.to_bytearray(), data, "aio read at %d" % off)
        self.check_all()


class ErrorTests(CommandBase):
    strict = False

    def test_write_past_end_enospc(self):
        h = self.h
        self.assertNbdError(errno.ENOSPC, h.pwrite, b"x" * 1024, SIZE - 512)
        self.assertNbdError(errno.ENOSPC, h.pwrite, b"x" * 512, SIZE)
        self.assertNbdError(errno.ENOSPC, h.zero, 1024, SIZE - 512)
        self.assertNbdError(errno.ENOSPC, h.zero, 4096, SIZE + 4096)
        self.check_range(SIZE - 512, 512)

    def test_read_trim_cache_block_status_past_end_einval(self):
        h = self.h
        for what, fn, args in [("read", h.pread, (1024, SIZE - 512)),
                               ("read at end", h.pread, (1, SIZE)),
                               ("trim", h.trim, (1024, SIZE - 512)),
                               ("cache", h.cache, (1024, SIZE - 512)),
                               ("block status", h.block_status, (1024, SIZE - 512,
                                                                 lambda *a: 0)),
                               ("block status at end", h.block_status, (512, SIZE,
                                                                        lambda *a: 0))]:
            with self.subTest(what):
                self.assertNbdError(errno.EINVAL, fn, *args)
        self.check_range(SIZE - 1 * MiB, 1 * MiB)

    def test_zero_length_requests_are_noops(self):
        h = self.h
        self.assertEqual(h.pread(0, 4096), b"")
        h.pwrite(b"", 4096)
        h.trim(0, 4096)
        h.zero(0, 4096)
        h.cache(0, 4096)
        h.pwrite(b"", SIZE)         # zero length at the very end is still in range
        self.check_range(0, 1 * MiB)

    def test_zero_length_block_status_einval(self):
        self.assertNbdError(errno.EINVAL, self.h.block_status, 0, 0, lambda *a: 0)
        self.check_range(0, 4096)

    def test_flags_not_valid_for_command_einval(self):
        h = self.h
        F = nbd
        cases = [("read+NO_HOLE", h.pread, (512, 0, F.CMD_FLAG_NO_HOLE)),
                 ("read+FAST_ZERO", h.pread, (512, 0, F.CMD_FLAG_FAST_ZERO)),
                 ("read+REQ_ONE", h.pread, (512, 0, F.CMD_FLAG_REQ_ONE)),
                 ("write+DF", h.pwrite, (b"\xee" * 512, 0, F.CMD_FLAG_DF)),
                 ("write+NO_HOLE", h.pwrite, (b"\xee" * 512, 0, F.CMD_FLAG_NO_HOLE)),
                 ("write+REQ_ONE", h.pwrite, (b"\xee" * 512, 0, F.CMD_FLAG_REQ_ONE)),
                 ("write+FAST_ZERO", h.pwrite, (b"\xee" * 512, 0, F.CMD_FLAG_FAST_ZERO)),
                 ("trim+NO_HOLE", h.trim, (512, 0, F.CMD_FLAG_NO_HOLE)),
                 ("trim+FAST_ZERO", h.trim, (512, 0, F.CMD_FLAG_FAST_ZERO)),
                 ("trim+DF", h.trim, (512, 0, F.CMD_FLAG_DF)),
                 ("zero+DF", h.zero, (512, 0, F.CMD_FLAG_DF)),
                 ("zero+REQ_ONE", h.zero, (512, 0, F.CMD_FLAG_REQ_ONE)),
                 ("cache+DF", h.cache, (512, 0, F.CMD_FLAG_DF)),
                 ("cache+NO_HOLE", h.cache, (512, 0, F.CMD_FLAG_NO_HOLE)),
                 ("block_status+DF", h.block_status, (512, 0, lambda *a: 0, F.CMD_FLAG_DF)),
                 ("block_status+FAST_ZERO", h.block_status, (512, 0, lambda *a: 0,
                                                             F.CMD_FLAG_FAST_ZERO)),
                 ("flush+NO_HOLE", h.flush, (F.CMD_FLAG_NO_HOLE,))]
        for what, fn, args in cases:
            with self.subTest(what):
                self.assertNbdError(errno.EINVAL, fn, *args)
        # nothing was written or zeroed by the rejected requests, and the connection still works
        self.check_range(0, 1 * MiB)

    def test_fua_is_accepted_on_every_command(self):
        h = self.h
        F = nbd.CMD_FLAG_FUA
        self.assertBytesEqual(h.pread(4096, 0, F), self.model[:4096])
        self.write(2 * MiB, b"\x11" * 4096, F)
        h.flush(F)
        h.trim(4096, 3 * MiB, F)
        h.zero(4096, 2 * MiB + 1024, F)
        self.model[2 * MiB + 1024:2 * MiB + 5120] = bytes(4096)
        h.cache(4096, 0, F)
        self.check_range(0, 4 * MiB - 1 * MiB)

    def test_unknown_flag_bits_einval(self):
        c = self.raw(self.srv)
        c.negotiate()
        for bit in (1 << 6, 1 << 7, 1 << 15):
            with self.subTest(bit=bit):
                rep = c.read(0, 512, bit)
                self.assertEqual(rep.error, T.NBD_EINVAL)
                rep = c.write(0, b"\xee" * 512, bit)
                self.assertEqual(rep.error, T.NBD_EINVAL)
        self.assertEqual(c.read(0, 512).data, bytes(self.model[:512]))
        self.check_range(0, 4096)

    def test_unknown_command_einval(self):
        for structured in (False, True):
            with self.subTest(structured=structured):
                c = self.raw(self.srv)
                c.negotiate(structured=structured)
                for cmd in (8, 9, 99, 0xFFFF):
                    rep = c.command(cmd, 0, 512)
                    self.assertEqual(rep.error, T.NBD_EINVAL, "command %d" % cmd)
                rep = c.read(4 * MiB, 4096)
                self.assertEqual((rep.error, rep.data), (0, bytes(self.model[4 * MiB:4 * MiB + 4096])))

    def test_read_over_32mib_einval(self):
        self.assertNbdError(errno.EINVAL, self.h.pread, 32 * MiB + 512, 0)
        self.assertBytesEqual(self.h.pread(32 * MiB, 0), self.model[:32 * MiB])

    def test_write_over_32mib_einval_and_payload_discarded(self):
        self.assertNbdError(errno.EINVAL, self.h.pwrite, b"\xab" * (33 * MiB), 0)
        self.assertTrue(self.h.aio_is_ready(), "connection should survive a 33 MiB write")
        self.check_range(0, 34 * MiB)
        self.write(1 * MiB, b"\xcd" * (32 * MiB))     # exactly the maximum is fine
        self.check_range(0, 34 * MiB)

    def test_write_over_64mib_closes_connection(self):
        c = self.raw(self.srv)
        c.negotiate()
        c.send_request(T.CMD_WRITE, 0, 64 * MiB + 4096)
        try:
            c.send(b"\xab" * 65536)
        except OSError:
            pass
        closed, _ = c.read_until_close(5)
        self.assertTrue(closed, "a WRITE header of 64 MiB + 4 KiB must close the connection")
        self.assertTrue(self.srv.alive())
        self.check_range(0, 1 * MiB)


class ReadOnlyTests(CommandBase):
    read_only = True
    strict = False

    def test_read_only_export(self):
        h = self.h
        digest = hashlib.sha256(open(self.img, "rb").read()).hexdigest()
        self.assertTrue(h.is_read_only())
        self.assertFalse(h.can_trim())
        self.assertFalse(h.can_zero())
        self.assertFalse(h.can_fast_zero())
        self.assertTrue(h.can_flush())
        self.assertTrue(h.can_cache())
        self.assertTrue(h.can_multi_conn())
        self.assertNbdError(errno.EPERM, h.pwrite, b"x" * 4096, 0)
        self.assertNbdError(errno.EPERM, h.pwrite, b"x" * 4096, 0, nbd.CMD_FLAG_FUA)
        self.assertNbdError(errno.EPERM, h.trim, 1 * MiB, 0)
        self.assertNbdError(errno.EPERM, h.zero, 1 * MiB, 0)
        h.flush()
        h.cache(1 * MiB, 0)
        self.check_all()
        self.assertEqual(T.block_status_map(h), T.file_map(self.img))
        self.assertEqual(hashlib.sha256(open(self.img, "rb").read()).hexdigest(), digest)


class RobustnessTests(CommandBase):
    def test_bad_request_magic_closes_only_that_connection(self):
        for magic in (0x12345678, T.SIMPLE_REPLY_MAGIC, 0x25609514):
            with self.subTest(magic=hex(magic)):
                c = self.raw(self.srv)
                c.negotiate()
                c.send_request(T.CMD_READ, 0, 512, magic=magic)
                closed, _ = c.read_until_close(5)
                self.assertTrue(closed, "bad request magic %#x did not close the connection" % magic)
                self.check_range(0, 64 * KiB)          # the libnbd connection is unaffected
        self.assertTrue(self.srv.alive())

    def test_malformed_clients_do_not_disturb_a_good_one(self):
        errors = []
        stats = {"ops": 0}
        stop = threading.Event()
        region = (32 * MiB, 48 * MiB)
        good = T.nbd_connect(self.srv.uri(), name="good")
        self.addCleanup(T.nbd_close, good)

        def good_client():
            rnd = random.Random(5)
            mine = {}
            try:
                while not stop.is_set() or stats["ops"] < 20:
                    off = rnd.randrange(region[0], region[1] - 65536, 4096)
                    data = rnd.randbytes(rnd.choice([4096, 65536, 12345]))
                    good.pwrite(data, off)
                    for o in [k for k in mine if k < off + len(data) and off < k + len(mine[k])]:
                        del mine[o]
                    mine[off] = data
                    if good.pread(len(data), off) != data:
                        raise AssertionError("good client read back wrong data at %d" % off)
                    o = rnd.choice(list(mine))
                    if good.pread(len(mine[o]), o) != mine[o]:
                        raise AssertionError("good client lost earlier data at %d" % o)
                    stats["ops"] += 1
                    if stats["ops"] > 100000:
                        break
            except Exception as e:  # noqa: BLE001
                errors.append(e)

        t = threading.Thread(target=good_client, daemon=True)
        t.start()
        addr = self.srv.address()

        def attack(name, fn, expect_close=True):
            c = T.RawClient(addr, timeout=10)
            try:
                fn(c)
                if expect_close:
                    closed, _ = c.read_until_close(5)
                    self.assertTrue(closed, "%s: connection not closed by the server" % name)
            finally:
                c.close()

        def garbage_after_go(c):
            c.negotiate()
            c.send(os.urandom(4096))

        def bad_magic(c):
            c.negotiate(structured=False)
            c.send(struct.pack(">IHHQQI", 0xCAFEBABE, 0, 0, 1, 0, 512))

        def truncated_header(c):
            c.negotiate()
            c.send(struct.pack(">IHHQQI", T.REQUEST_MAGIC, 0, 0, 1, 0, 512)[:10])
            c.sock.shutdown(2)

        def truncated_write(c):
            c.negotiate()
            c.send(struct.pack(">IHHQQI", T.REQUEST_MAGIC, 0, T.CMD_WRITE, 2, 0, 1 * MiB))
            c.send(b"\xff" * 1000)

        def garbage_handshake(c):
            c.read_greeting()
            c.send(os.urandom(64))

        def partial_option(c):
            c.start()
            c.send(struct.pack(">QI", T.IHAVEOPT, T.OPT_GO))

        def instant_close(c):
            pass

        for name, fn, close in [("garbage after GO", garbage_after_go, True),
                                ("bad request magic", bad_magic, True),
                                ("truncated header", truncated_header, False),
                                ("truncated write payload", truncated_write, False),
                                ("garbage in handshake", garbage_handshake, True),
                                ("partial option header", partial_option, False),
                                ("connect and close", instant_close, False)]:
            attack(name, fn, close)
            time.sleep(0.05)
        time.sleep(0.3)
        stop.set()
        t.join(60)
        self.assertFalse(t.is_alive(), "good client hung")
        if errors:
            raise errors[0]
        self.assertGreaterEqual(stats["ops"], 20)
        self.assertTrue(self.srv.alive(), "server died")
        # and a new client still gets served
        h2 = self.connect(self.srv)
        self.assertBytesEqual(h2.pread(1 * MiB, 0), self.model[:1 * MiB])


if __name__ == "__main__":
    unittest.main(verbosity=2)
