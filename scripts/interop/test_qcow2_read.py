# qcow2 read path against qemu as the referee: images made by qemu-img/qemu-io (v2 and v3, cluster
# sizes 512 B..2 MiB, refcount widths, extended L2, zlib and zstd compression, internal snapshots,
# backing chains), each served with `qnbd serve -r` and checked three ways:
#   (a) qemu-img compare of the image against the export says identical;
#   (b) nbdcopy of the export equals `qemu-img convert -O raw` of the image, byte for byte;
#   (c) nbdinfo --map (base:allocation) and --map=qemu:allocation-depth agree with qemu-img map.
# Plus broken images that `qnbd serve -r` must refuse with one line naming the structure at fault.
#
# Run alone: /usr/bin/python3 -m unittest -v scripts/interop/test_qcow2_read.py
import json
import os
import struct
import subprocess
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qnbdtest as T  # noqa: E402
from qnbdtest import KiB, MiB  # noqa: E402

SIZE = 32 * MiB

# qemu-io writes for the standard image: patterns at unaligned offsets, zeroes that keep the
# allocation (ZERO_ALLOC) and that unmap it, zeroes on unallocated clusters (ZERO_PLAIN), a discard,
# and writes at the very end of the disk.
STANDARD_WRITES = [
    "write -P 0x11 0 70k",
    "write -P 0x22 123457 9999",
    "write -P 0x33 1m 1m",
    "write -z 1088k 64k",
    "write -z -u 1280k 128k",
    "write -P 0x44 2101249 8191",
    "write -P 0x77 3m 1m",
    "discard 3m 512k",
    "write -z 5m 3m",
    "write -P 0x55 20971517 7",
    "write -P 0x66 31m 1m",
    "write -P 0x68 33554431 1",
]


def qemu_io(image, commands, fmt="qcow2", cwd=None):
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    T.run(argv + [image], timeout=60, cwd=cwd)


def qemu_img(*args, cwd=None, check=True):
    return T.run(["qemu-img"] + list(args), timeout=60, cwd=cwd, check=check)


def create(path, options="", size=SIZE, backing=None, backing_fmt=None, cwd=None):
    argv = ["create", "-q", "-f", "qcow2"]
    if options:
        argv += ["-o", options]
    if backing:
        argv += ["-b", backing, "-F", backing_fmt]
    argv += [path]
    if size is not None:
        argv += [str(size)]
    qemu_img(*argv, cwd=cwd)
    return path


def compressible(seed, length):
    """Text-like data: compresses well, but differs per call."""
    line = b"qcow2 cluster %d refcount %d lorem ipsum dolor sit amet\n" % (seed, seed * 7919)
    return (line * (length // len(line) + 1))[:length]


def merge(extents):
    """[(offset, length, value)] -> merged, adjacent equal values joined."""
    return T.merge_extents(sorted(extents))


class Qcow2ReadCase(T.QnbdTestCase):
    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def serve(self, image, cwd=None):
        srv = T.Server(cwd or self.dir, image, read_only=True,
                       socket_path=self.path("nbd.sock"), pid_file=self.path("qnbd.pid"))
        self.addCleanup(self._stop_server, srv, True)
        srv.start()
        return srv

    def check(self, image, layers, cwd=None):
        """Serve `image` (path relative to `cwd` or absolute) and run checks (a), (b), (c).
        `layers` lists the formats of the chain from the top ("qcow2", ..., "raw")."""
        cwd = cwd or self.dir
        abs_image = os.path.join(cwd, image)
        srv = self.serve(image, cwd=cwd)
        uri = srv.uri()

        # (a) qemu-img compare says identical.
        p = qemu_img("compare", "-f", "qcow2", abs_image, "-F", "raw", uri, check=False)
        self.assertEqual(p.returncode, 0, "qemu-img compare:\n%s%s" % (p.stdout, p.stderr))
        self.assertIn("Images are identical", p.stdout)

        # (b) nbdcopy of the export == qemu-img convert -O raw, byte for byte.
        got, want = self.path("got.raw"), self.path("want.raw")
        for f in (got, want):
            if os.path.exists(f):
                os.unlink(f)
        T.run(["nbdcopy", uri, got], timeout=60)
        qemu_img("convert", "-f", "qcow2", "-O", "raw", abs_image, want)
        self.assertEqual(os.path.getsize(got), os.path.getsize(want))
        with open(got, "rb") as a, open(want, "rb") as b:
            offset = 0
            while True:
                x, y = a.read(4 * MiB), b.read(4 * MiB)
                if not x and not y:
                    break
                if x != y:
                    i = next(i for i in range(min(len(x), len(y))) if x[i] != y[i])
                    self.fail("nbdcopy output differs from qemu-img convert at byte %d" % (offset + i))
                offset += len(x)

        # (c) block status against qemu-img map.
        qmap = json.loads(qemu_img("map", "--output=json", "-f", "qcow2", abs_image).stdout)
        want_alloc, want_depth = [], []
        for e in qmap:
            if e.get("data"):
                flags = 0
            elif e.get("zero") and e.get("present") and "offset" in e and layers[e["depth"]] == "qcow2":
                flags = T.STATE_ZERO                        # zero-allocated: storage kept, reads as zeros
            else:
                flags = T.qemu_map_flags(e)
            want_alloc.append((e["start"], e["length"], flags))
            want_depth.append((e["start"], e["length"], e["depth"] + 1 if e.get("present") else 0))
        got_alloc = self.nbdinfo_map(uri, None)
        got_depth = self.nbdinfo_map(uri, "qemu:allocation-depth")
        self.assertEqual(got_alloc, merge(want_alloc), "base:allocation differs from qemu-img map")
        self.assertEqual(got_depth, merge(want_depth), "qemu:allocation-depth differs from qemu-img map")
        return srv

    def nbdinfo_map(self, uri, context):
        arg = "--map" if context is None else "--map=" + context
        out = T.run(["nbdinfo", arg, "--json", uri], timeout=60).stdout
        return merge([(e["offset"], e["length"], e["type"]) for e in json.loads(out)])

    def standard(self, options, writes=STANDARD_WRITES, size=SIZE):
        img = create(self.path("img.qcow2"), options, size=size)
        qemu_io(img, writes)
        return img


class Qcow2VersionsAndClusters(Qcow2ReadCase):
    def test_v2_compat_0_10(self):
        self.check(self.standard("compat=0.10"), ["qcow2"])

    def test_v3_default(self):
        self.check(self.standard(""), ["qcow2"])

    def test_v2_512_byte_clusters(self):
        self.check(self.standard("compat=0.10,cluster_size=512"), ["qcow2"])

    def test_cluster_512(self):
        self.check(self.standard("cluster_size=512"), ["qcow2"])

    def test_cluster_4k(self):
        self.check(self.standard("cluster_size=4k"), ["qcow2"])

    def test_cluster_64k_many_l2_tables(self):
        # A 4 KiB-cluster L2 table maps only 2 MiB: a 64 MiB disk needs 32 of them.
        img = self.standard("cluster_size=4k", size=64 * MiB,
                            writes=STANDARD_WRITES + ["write -P 0x99 %d 6m" % (40 * MiB - 3 * MiB - 5)])
        self.check(img, ["qcow2"])

    def test_cluster_2m(self):
        self.check(self.standard("cluster_size=2M"), ["qcow2"])


class Qcow2Refcounts(Qcow2ReadCase):
    def test_refcount_bits_1(self):
        self.check(self.standard("refcount_bits=1"), ["qcow2"])

    def test_refcount_bits_16_16k(self):
        self.check(self.standard("refcount_bits=16,cluster_size=16k"), ["qcow2"])

    def test_refcount_bits_64(self):
        self.check(self.standard("refcount_bits=64"), ["qcow2"])


class Qcow2ExtendedL2(Qcow2ReadCase):
    WRITES = STANDARD_WRITES + [
        # Subcluster-sized pieces inside fresh clusters: allocated, zero and unallocated subclusters.
        "write -P 0xa1 8m 4k", "write -P 0xa2 %d 8k" % (8 * MiB + 40 * KiB), "write -z %d 4k" % (9 * MiB),
        "write -P 0xa3 %d 2k" % (10 * MiB + 126 * KiB),
    ]

    def test_extended_l2_64k(self):
        self.check(self.standard("extended_l2=on,cluster_size=64k", writes=self.WRITES), ["qcow2"])

    def test_extended_l2_128k(self):
        self.check(self.standard("extended_l2=on,cluster_size=128k", writes=self.WRITES), ["qcow2"])

    def test_extended_l2_over_backing(self):
        base = self.path("base.raw")
        T.make_image(base, 12 * MiB, [(0, T.pattern_bytes(5, 12 * MiB))])
        img = create(self.path("img.qcow2"), "extended_l2=on,cluster_size=128k", backing="base.raw",
                     backing_fmt="raw")
        qemu_io(img, ["write -P 0xb1 4k 4k", "write -z 64k 2k", "write -P 0xb2 %d 6k" % (11 * MiB + 123 * KiB),
                      "write -P 0xb3 20m 4k"])
        self.check(img, ["qcow2", "raw"])


class Qcow2Compressed(Qcow2ReadCase):
    def source(self):
        src = self.path("src.raw")
        regions = []
        for i in range(24):                    # compressible clusters, unaligned and spread out
            regions.append((i * 700 * KiB + i * 4097, compressible(i, 96 * KiB + i * 333)))
        regions.append((18 * MiB, T.pattern_bytes(9, 2 * MiB)))         # incompressible: stored plain
        regions.append((SIZE - 100 * KiB, compressible(99, 100 * KiB)))  # up to the last byte
        T.make_image(src, SIZE, regions)
        return src

    def convert(self, options):
        img = self.path("img.qcow2")
        qemu_img("convert", "-c", "-f", "raw", "-O", "qcow2", "-o", options, self.source(), img)
        info = json.loads(qemu_img("check", "--output=json", img).stdout)
        self.assertGreater(info.get("compressed-clusters", 0), 0, "nothing was compressed")
        return img

    def test_zlib_64k(self):
        self.check(self.convert("compression_type=zlib"), ["qcow2"])

    def test_zlib_4k(self):
        self.check(self.convert("compression_type=zlib,cluster_size=4k"), ["qcow2"])

    def test_zlib_v2_512(self):
        self.check(self.convert("compat=0.10,cluster_size=512"), ["qcow2"])

    def test_zstd_64k(self):
        self.check(self.convert("compression_type=zstd"), ["qcow2"])

    def test_zstd_2m(self):
        self.check(self.convert("compression_type=zstd,cluster_size=2M"), ["qcow2"])

    def test_zlib_then_overwritten(self):
        img = self.convert("compression_type=zlib")
        # Partial overwrites turn compressed clusters into normal ones; zeroes over compressed ones.
        qemu_io(img, ["write -P 0x5a 12345 3000", "write -z 1400k 64k", "write -P 0x5b 2m 100k"])
        self.check(img, ["qcow2"])


class Qcow2Snapshots(Qcow2ReadCase):
    def test_internal_snapshot_then_more_writes(self):
        img = self.standard("")
        qemu_img("snapshot", "-c", "s1", img)
        qemu_io(img, ["write -P 0xc1 0 100k", "write -P 0xc2 1500k 200k", "write -z 3m 64k",
                      "write -P 0xc3 25m 1m"])
        qemu_img("snapshot", "-c", "s2", img)
        qemu_io(img, ["write -P 0xc4 60k 8k"])
        self.check(img, ["qcow2"])

    def test_internal_snapshot_v2(self):
        img = self.standard("compat=0.10,cluster_size=4k")
        qemu_img("snapshot", "-c", "s1", img)
        qemu_io(img, ["write -P 0xd1 5000 70000"])
        self.check(img, ["qcow2"])


class Qcow2BackingChains(Qcow2ReadCase):
    def test_three_levels_relative_names_from_another_cwd(self):
        # chain/top.qcow2 -> chain/mid/mid.qcow2 -> chain/raw/base.raw, every name relative to the
        # folder of the image that names it; the server runs in self.dir and gets a relative path.
        chain = self.path("chain")
        os.makedirs(os.path.join(chain, "mid"))
        os.makedirs(os.path.join(chain, "raw"))
        T.make_image(os.path.join(chain, "raw", "base.raw"), SIZE,
                     [(0, T.pattern_bytes(1, 3 * MiB)), (10 * MiB + 5, T.pattern_bytes(2, 1 * MiB)),
                      (SIZE - 4 * KiB, T.pattern_bytes(3, 4 * KiB))])
        create("mid.qcow2", "cluster_size=4k", backing="../raw/base.raw", backing_fmt="raw",
               cwd=os.path.join(chain, "mid"))
        qemu_io("mid.qcow2", ["write -P 0x21 1m 1m", "write -z 2m 64k", "write -P 0x22 12m 3m"],
                cwd=os.path.join(chain, "mid"))
        create("top.qcow2", "", backing="mid/mid.qcow2", backing_fmt="qcow2", cwd=chain)
        qemu_io("top.qcow2", ["write -P 0x31 1500k 1m", "write -z 13m 64k", "write -P 0x32 %d 77" % (20 * MiB - 11)],
                cwd=chain)
        self.check(os.path.join("chain", "top.qcow2"), ["qcow2", "qcow2", "raw"])

    def test_backing_smaller_than_overlay(self):
        base = self.path("small.qcow2")
        create(base, "cluster_size=4k", size=5 * MiB + 1234)
        qemu_io(base, ["write -P 0x41 0 %d" % (5 * MiB + 1234), "write -z 1m 64k"])
        img = create(self.path("img.qcow2"), "", backing="small.qcow2", backing_fmt="qcow2")
        qemu_io(img, ["write -P 0x42 2m 64k", "write -P 0x43 %d 4096" % (5 * MiB), "write -P 0x44 20m 1m"])
        self.check(img, ["qcow2", "qcow2"])

    def test_raw_backing_smaller_than_overlay(self):
        base = self.path("small.raw")
        T.make_image(base, 3 * MiB + 100, [(0, T.pattern_bytes(6, 3 * MiB + 100))])
        img = create(self.path("img.qcow2"), "compat=0.10", backing="small.raw", backing_fmt="raw")
        qemu_io(img, ["write -P 0x45 %d 20000" % (3 * MiB - 7000), "write -P 0x46 9m 1m"])
        self.check(img, ["qcow2", "raw"])

    def test_sparse_raw_backing(self):
        base = self.path("sparse.raw")
        T.make_image(base, SIZE, [(1 * MiB, T.pattern_bytes(7, 256 * KiB)), (16 * MiB, T.pattern_bytes(8, 4 * KiB))])
        img = create(self.path("img.qcow2"), "cluster_size=512", backing="sparse.raw", backing_fmt="raw")
        qemu_io(img, ["write -P 0x47 %d 3000" % (1 * MiB + 100 * KiB), "write -z 16m 4k", "write -P 0x48 30m 4k"])
        self.check(img, ["qcow2", "raw"])


def poke(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def header_field(path, offset, fmt):
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]


class Qcow2CopiedWithoutHost(Qcow2ReadCase):
    """COPIED set on an L2 entry with no host offset (and no zero flag). Without an external data file
    qemu reads it as unallocated and `qemu-img check` calls the image clean; `qnbd check` and
    `qnbd serve` follow the same rule (one cluster-type decoding in the format layer)."""

    def image_with_copied_unallocated(self):
        img = create(self.path("img.qcow2"), "", size=4 * MiB)
        qemu_io(img, ["write -P 0x5a 0 64k"])
        l2 = header_field(img, header_field(img, 40, ">Q"), ">Q") & 0x00fffffffffffe00
        poke(img, l2 + 8, struct.pack(">Q", 1 << 63))          # guest cluster 1: COPIED, offset 0
        return img

    def test_check_and_serve_agree_with_qemu(self):
        img = self.image_with_copied_unallocated()
        q = qemu_img("check", img, check=False)
        self.assertEqual(q.returncode, 0, q.stdout + q.stderr)
        n = subprocess.run([T.QNBD, "check", img], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=60)
        self.assertEqual(n.returncode, 0, n.stdout + n.stderr)
        self.check(img, ["qcow2"])

    def test_writable_serve_allocates_over_it(self):
        img = self.image_with_copied_unallocated()
        srv = T.Server(self.dir, img, socket_path=self.path("nbd.sock"), pid_file=self.path("qnbd.pid"))
        self.addCleanup(self._stop_server, srv, True)
        srv.start()
        T.run(["qemu-io", "-f", "raw", "-c", "write -P 0x66 64k 4k", srv.uri()], timeout=60)
        self.assertEqual(srv.stop(), 0)
        qemu_io(img, ["read -P 0x66 64k 4k", "read -P 0 68k 60k", "read -P 0x5a 0 64k"])
        self.assertEqual(qemu_img("check", img, check=False).returncode, 0)


class Qcow2OddVirtualSize(Qcow2ReadCase):
    """A header size that is not a multiple of 512 (qemu-img never writes one, other tools may): qemu
    counts whole sectors and rounds it down, and so do `qnbd info` and `qnbd serve`."""

    ODD = 4 * MiB - 1000                                     # rounds down to 4 MiB - 1536

    def odd_image(self):
        img = create(self.path("img.qcow2"), "cluster_size=4k", size=4 * MiB)
        qemu_io(img, ["write -P 0x61 0 64k", "write -P 0x62 %d 8k" % (4 * MiB - 8 * KiB)])
        poke(img, 24, struct.pack(">Q", self.ODD))
        return img

    def qemu_size(self, img):
        return json.loads(qemu_img("info", "--output=json", img).stdout)["virtual-size"]

    def test_export_size_is_qemus(self):
        img = self.odd_image()
        want = self.qemu_size(img)
        self.assertEqual(want, self.ODD & ~511)
        srv = self.check(img, ["qcow2"])
        self.assertEqual(int(T.run(["nbdinfo", "--size", srv.uri()], timeout=60).stdout), want)
        info = json.loads(T.run([T.QNBD, "info", "--output=json", img], timeout=60).stdout)
        self.assertEqual(info["virtual-size"], want)

    def test_writes_past_the_rounded_size_are_out_of_range(self):
        img = self.odd_image()
        want = self.qemu_size(img)
        srv = T.Server(self.dir, img, socket_path=self.path("nbd.sock"), pid_file=self.path("qnbd.pid"))
        self.addCleanup(self._stop_server, srv, True)
        srv.start()
        h = self.connect(srv, strict=False)                    # the server, not libnbd, must say no
        self.assertEqual(h.get_size(), want)
        h.pwrite(b"\x63" * 512, want - 512)
        with self.assertRaises(T.nbd.Error) as raised:
            h.pwrite(b"\x64" * 512, want)
        self.assertEqual(raised.exception.errno, "ENOSPC")
        with self.assertRaises(T.nbd.Error) as raised:
            h.pread(1, want)
        self.assertEqual(raised.exception.errno, "EINVAL")
        h.flush()
        h.shutdown()
        self.assertEqual(srv.stop(), 0)
        qemu_io(img, ["read -P 0x63 %d 512" % (want - 512)])
        self.assertEqual(qemu_img("check", img, check=False).returncode, 0)


class Qcow2Refused(Qcow2ReadCase):
    def refuse(self, image, read_only=True, cwd=None):
        """Runs `qnbd serve` and expects it to exit non-zero at once; returns its one-line message."""
        argv = [T.QNBD, "serve", image, "--socket", self.path("refused.sock")]
        if read_only:
            argv.insert(2, "-r")
        try:
            p = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               timeout=20, text=True, cwd=cwd or self.dir)
        except subprocess.TimeoutExpired:
            self.fail("qnbd serve %s kept running; it should have refused the image" % image)
        self.assertNotEqual(p.returncode, 0, p.stdout)
        lines = [l for l in p.stdout.splitlines() if l.strip()]
        self.assertEqual(len(lines), 1, "expected one line, got:\n" + p.stdout)
        self.assertFalse(os.path.exists(self.path("refused.sock")), "socket created for a refused image")
        return lines[0]

    def test_l1_entry_past_end_of_file(self):
        img = self.standard("")
        l1 = header_field(img, 40, ">Q")
        poke(img, l1, struct.pack(">Q", (1 << 63) | (1 << 40)))
        msg = self.refuse(img)
        self.assertIn("L1 entry 0", msg)
        self.assertIn("outside the image file", msg)

    def test_unknown_incompatible_bit(self):
        img = self.standard("")
        poke(img, 72, struct.pack(">Q", 1 << 5))
        msg = self.refuse(img)
        self.assertIn("header", msg)
        self.assertIn("incompatible feature bit 5", msg)

    def test_unknown_incompatible_bit_named_from_the_feature_table(self):
        img = self.standard("")
        poke(img, 72, struct.pack(">Q", 1 << 6))
        # Rename the table's entry for bit 4 ("extended L2 entries") into one for bit 6.
        with open(img, "rb") as f:
            head = f.read(64 * KiB)
        at = head.index(b"\x00\x04extended L2 entries")
        poke(img, at, b"\x00\x06" + b"shiny new feature".ljust(46, b"\0"))
        msg = self.refuse(img)
        self.assertIn("incompatible feature bit 6", msg)
        self.assertIn("shiny new feature", msg)

    def test_backing_chain_loop(self):
        create(self.path("b.qcow2"), "")
        create(self.path("a.qcow2"), "", backing="b.qcow2", backing_fmt="qcow2")
        qemu_img("rebase", "-u", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", self.path("b.qcow2"))
        msg = self.refuse("a.qcow2")
        self.assertIn("backing chain", msg)
        self.assertIn("loops", msg)

    def test_missing_backing_file(self):
        create(self.path("gone.raw"), "", size=MiB)
        create(self.path("img.qcow2"), "", backing="gone.raw", backing_fmt="qcow2")
        os.unlink(self.path("gone.raw"))
        msg = self.refuse("img.qcow2")
        self.assertIn("gone.raw", msg)

    def test_backing_file_in_a_foreign_format_is_not_taken_for_raw(self):
        # No backing format in the header: the backing file is probed, and a VHD is named, not served as
        # raw bytes under the overlay.
        qemu_img("create", "-q", "-f", "vpc", self.path("base.vpc"), "4M")
        create(self.path("img.qcow2"), "", size=4 * MiB, backing="base.vpc", backing_fmt="vpc")
        with open(self.path("img.qcow2"), "rb") as f:
            head = f.read(64 * KiB)
        at = head.index(struct.pack(">I", 0xe2792aca))          # the backing format extension
        poke(self.path("img.qcow2"), at, struct.pack(">I", 0x0badf00d))   # now an unknown one, ignored
        msg = self.refuse("img.qcow2")
        self.assertIn("vpc", msg)

    def test_truncated_l1_table(self):
        img = create(self.path("img.qcow2"), "cluster_size=512", size=SIZE)
        l1 = header_field(img, 40, ">Q")
        os.truncate(img, l1 + 8)    # the L1 table (64 entries for 512-byte clusters) runs past the end
        msg = self.refuse(img)
        self.assertIn("L1 table", msg)

    def test_snapshot_l1_table_counted_free_is_refused_writable(self):
        # A hostile refcount block calls the snapshot's L1 table free: written to, the allocator would
        # hand that cluster out for new data. Read-only serving does not allocate and goes on.
        img = self.standard("")
        qemu_img("snapshot", "-c", "s1", img)
        snapshots = header_field(img, 64, ">Q")
        snapshot_l1 = header_field(img, snapshots, ">Q")
        block = header_field(img, header_field(img, 48, ">Q"), ">Q")
        poke(img, block + 2 * (snapshot_l1 // 65536), b"\0\0")      # 16-bit refcounts, 64 KiB clusters
        msg = self.refuse(img, read_only=False)
        self.assertIn("the L1 table of snapshot 0", msg)
        self.assertIn("refcount 0", msg)
        srv = T.Server(self.dir, img, read_only=True).start()
        self.assertEqual(srv.stop(), 0)

    def test_encrypted_image_is_refused(self):
        # qnbd does not implement encryption, so it must say so and not serve. (The header is edited
        # rather than made by qemu-img: LUKS creation calibrates PBKDF and fails on a loaded machine.)
        img = self.standard("")
        poke(img, 32, struct.pack(">I", 2))     # crypt_method = LUKS
        msg = self.refuse(img, read_only=False)
        self.assertIn("encrypted", msg)

if __name__ == "__main__":
    T.main()
