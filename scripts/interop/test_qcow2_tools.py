# qnbd's offline image tools (create, info, check, map) against qemu-img as the referee:
#   create: every option combination must give an image `qemu-img check` finds clean, whose
#           `qemu-img info --output=json` equals `qnbd info --json`; the plain layouts must be byte for
#           byte what `qemu-img create` writes.
#   info:   qemu-img info's JSON, key for key, on images qemu made (snapshots, bitmaps, chains, raw).
#   check:  on images qemu made and then damaged here (leaked and missing refcounts, L2 entries pointing
#           at metadata, past EOF, misaligned, reserved bits, COPIED flags), the exit code and the JSON
#           counts equal qemu-img check's; `--repair` leaves an image qemu-img check finds clean.
#   map:    `qnbd map --output json` equals `qemu-img map --output=json` (backing chains, zero,
#           compressed, extended-L2 and preallocated clusters); the human format too.
#
# Run alone: /usr/bin/python3 -m unittest -v scripts/interop/test_qcow2_tools.py
import json
import os
import shutil
import struct
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qnbdtest as T  # noqa: E402
from qnbdtest import KiB, MiB, GiB  # noqa: E402


def qnbd(*args, cwd=None):
    return T.run([T.QNBD] + list(args), timeout=120, check=False, cwd=cwd)


def qemu_img(*args, cwd=None, check=True):
    return T.run(["qemu-img"] + list(args), timeout=120, check=check, cwd=cwd)


def qemu_io(image, commands, fmt="qcow2", cwd=None):
    argv = ["qemu-io", "-f", fmt]
    for c in commands:
        argv += ["-c", c]
    T.run(argv + [image], timeout=120, cwd=cwd)


def compressible(seed, length):
    words = [b"qcow2 ", b"cluster ", b"refcount ", b"%d " % seed, b"lorem ", b"ipsum\n"]
    out = bytearray()
    i = seed
    while len(out) < length:
        out += words[i % len(words)]
        i = i * 7 + 3
    return bytes(out[:length])


class Image:
    """Just enough of a qcow2 reader/poker to damage images in known ways."""

    def __init__(self, path):
        self.path = path
        with open(path, "rb") as f:
            h = f.read(104)
        (self.version,) = struct.unpack_from(">I", h, 4)
        (self.cluster_bits,) = struct.unpack_from(">I", h, 20)
        self.cs = 1 << self.cluster_bits
        (self.l1_size,) = struct.unpack_from(">I", h, 36)
        (self.l1_offset, self.rt_offset) = struct.unpack_from(">QQ", h, 40)
        (self.rt_clusters,) = struct.unpack_from(">I", h, 56)
        self.refcount_order = struct.unpack_from(">I", h, 96)[0] if self.version == 3 else 4
        (self.incompat,) = struct.unpack_from(">Q", h, 72) if self.version == 3 else (0,)

    def u64(self, offset):
        with open(self.path, "rb") as f:
            f.seek(offset)
            return struct.unpack(">Q", f.read(8))[0]

    def set_u64(self, offset, value):
        with open(self.path, "r+b") as f:
            f.seek(offset)
            f.write(struct.pack(">Q", value))

    def l1_entry_offset(self, index):
        return self.l1_offset + 8 * index

    def l2_entry_offset(self, guest):
        l2_bits = self.cluster_bits - 3
        l1 = self.u64(self.l1_entry_offset(guest >> (self.cluster_bits + l2_bits))) & 0x00fffffffffffe00
        assert l1, "no L2 table for guest offset %d" % guest
        return l1 + 8 * ((guest >> self.cluster_bits) & ((1 << l2_bits) - 1))

    def host_cluster(self, guest):
        return (self.u64(self.l2_entry_offset(guest)) & 0x00fffffffffffe00) >> self.cluster_bits

    def refcount_location(self, cluster):
        bits = 1 << self.refcount_order
        per_block = self.cs * 8 // bits
        block = self.u64(self.rt_offset + 8 * (cluster // per_block)) & ~0x1ff
        assert block, "no refcount block for cluster %d" % cluster
        return block, (cluster % per_block) * bits

    def refcount(self, cluster):
        block, bit = self.refcount_location(cluster)
        assert self.refcount_order == 4
        with open(self.path, "rb") as f:
            f.seek(block + bit // 8)
            return struct.unpack(">H", f.read(2))[0]

    def set_refcount(self, cluster, value):
        block, bit = self.refcount_location(cluster)
        assert self.refcount_order == 4
        with open(self.path, "r+b") as f:
            f.seek(block + bit // 8)
            f.write(struct.pack(">H", value))

    def set_incompatible(self, bits):
        self.set_u64(72, bits)


class ToolsCase(T.QnbdTestCase):
    maxDiff = None

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def qnbd_ok(self, *args):
        p = qnbd(*args, cwd=self.dir)
        self.assertEqual(p.returncode, 0, "qnbd %s:\n%s%s" % (" ".join(args), p.stdout, p.stderr))
        return p

    def qemu_info(self, image, *extra):
        return json.loads(qemu_img("info", "--output=json", *extra, image, cwd=self.dir).stdout)

    def qnbd_info(self, image, *extra):
        return json.loads(self.qnbd_ok("info", "--json", *extra, image).stdout)

    def assert_info_equal(self, image, *extra):
        want = self.qemu_info(image, *extra)
        got = self.qnbd_info(image, *extra)
        self.assertEqual(got, want, "qnbd info --json differs from qemu-img info for %s" % image)
        return got

    def assert_qemu_check_clean(self, image):
        p = qemu_img("check", image, cwd=self.dir, check=False)
        self.assertEqual(p.returncode, 0, "qemu-img check %s:\n%s%s" % (image, p.stdout, p.stderr))
        self.assertIn("No errors were found on the image.", p.stdout)

    def check_both(self, image, *repair):
        """Runs qemu-img check and qnbd check (on copies when repairing) and compares rc and JSON."""
        if repair:
            theirs = self.path("theirs." + os.path.basename(image))
            ours = self.path("ours." + os.path.basename(image))
            shutil.copyfile(self.path(image), theirs)
            shutil.copyfile(self.path(image), ours)
        else:
            theirs = ours = image
        q = qemu_img("check", "--output=json", *repair, theirs, cwd=self.dir, check=False)
        n = qnbd("check", "--json", *repair, ours, cwd=self.dir)
        self.assertEqual(n.returncode, q.returncode,
                         "exit code: qnbd %d, qemu-img %d\nqnbd:\n%s%s\nqemu-img:\n%s%s" % (
                             n.returncode, q.returncode, n.stdout, n.stderr, q.stdout, q.stderr))
        if q.returncode != 1:
            want = json.loads(q.stdout)
            got = json.loads(n.stdout)
            want.pop("filename")
            got.pop("filename")
            if "Rebuilding refcount structure" in q.stderr:
                # qemu rebuilt the whole refcount structure (moving it, then freeing the old one) where
                # qnbd raised the one refcount in place: the same repair, other bookkeeping.
                for key in ("image-end-offset", "leaks-fixed"):
                    want.pop(key, None)
                    got.pop(key, None)
            self.assertEqual(got, want, "qnbd check:\n%s%s\nqemu-img check:\n%s%s" % (
                n.stdout, n.stderr, q.stdout, q.stderr))
        return n, q, ours

    def assert_map_equal(self, image):
        want = qemu_img("map", "--output=json", image, cwd=self.dir).stdout
        got = self.qnbd_ok("map", "--output", "json", image).stdout
        self.assertEqual(json.loads(got), json.loads(want), "qnbd map differs from qemu-img map for %s" % image)
        self.assertEqual(got, want, "same extents, different text")
        q = qemu_img("map", image, cwd=self.dir, check=False)
        n = qnbd("map", image, cwd=self.dir)
        self.assertEqual(n.returncode, q.returncode)
        self.assertEqual(n.stdout, q.stdout)


# ---------------------------------------------------------------------------------------------
# create
# ---------------------------------------------------------------------------------------------
# (qnbd create flags, equivalent qemu-img -o options, size, byte-identical to qemu-img's output)
CREATE_MATRIX = [
    ([], "", "10G", True),
    (["--compat", "0.10"], "compat=0.10", "10G", True),
    (["--compat", "2"], "compat=0.10", "1000", True),
    (["--cluster-size", "512"], "cluster_size=512", "100M", True),
    (["--cluster-size", "4K"], "cluster_size=4k", "1G", True),
    (["--cluster-size", "2M"], "cluster_size=2M", "1T", True),
    (["--refcount-bits", "1"], "refcount_bits=1", "1G", True),
    (["--refcount-bits", "2"], "refcount_bits=2", "1G", True),
    (["--refcount-bits", "4"], "refcount_bits=4", "1G", True),
    (["--refcount-bits", "8"], "refcount_bits=8", "1G", True),
    (["--refcount-bits", "32"], "refcount_bits=32", "1G", True),
    (["--refcount-bits", "64"], "refcount_bits=64", "1G", True),
    (["--lazy-refcounts"], "lazy_refcounts=on", "1G", True),
    (["--extended-l2"], "extended_l2=on", "1G", True),
    (["--extended-l2", "--cluster-size", "16K"], "extended_l2=on,cluster_size=16k", "1G", True),
    (["--extended-l2", "--cluster-size", "2M", "--refcount-bits", "8"],
     "extended_l2=on,cluster_size=2M,refcount_bits=8", "100G", True),
    (["--compression-type", "zstd"], "compression_type=zstd", "1G", True),
    ([], "", "0", True),
    ([], "", "1000", True),
    (["--lazy-refcounts", "--refcount-bits", "1", "--cluster-size", "1K"],
     "lazy_refcounts=on,refcount_bits=1,cluster_size=1k", "3G", False),
    # An L1 table bigger than the first refcount block covers: more refcount blocks.
    (["--cluster-size", "512"], "cluster_size=512", "1G", False),
    (["--cluster-size", "512"], "cluster_size=512", "10G", False),
    (["--cluster-size", "512", "--refcount-bits", "64"], "cluster_size=512,refcount_bits=64", "4G", False),
    # Enough refcount blocks to need a second refcount table cluster.
    (["--cluster-size", "512", "--refcount-bits", "64"], "cluster_size=512,refcount_bits=64", "12G", False),
    (["--preallocation", "metadata"], "preallocation=metadata", "1G", False),
    (["--preallocation", "metadata"], "preallocation=metadata", "1000000", False),
    (["--preallocation", "metadata", "--cluster-size", "512"], "preallocation=metadata,cluster_size=512",
     "64M", False),
    (["--preallocation", "metadata", "--cluster-size", "4K", "--refcount-bits", "1"],
     "preallocation=metadata,cluster_size=4k,refcount_bits=1", "256M", False),
    (["--preallocation", "metadata", "--extended-l2"], "preallocation=metadata,extended_l2=on", "1G", False),
    (["--preallocation", "metadata", "--compat", "0.10"], "preallocation=metadata,compat=0.10", "100M", False),
]


class CreateMatrix(ToolsCase):
    def test_option_matrix(self):
        for flags, options, size, identical in CREATE_MATRIX:
            with self.subTest(flags=flags, size=size):
                ours = self.path("ours.qcow2")
                theirs = self.path("theirs.qcow2")
                for f in (ours, theirs):
                    if os.path.exists(f):
                        os.unlink(f)
                self.qnbd_ok("create", "-q", *flags, ours, size)
                self.assert_qemu_check_clean(ours)
                self.assert_info_equal(ours)
                # Against what qemu-img makes from the same options: same disk, same header fields.
                qemu_img("create", "-q", "-f", "qcow2", "-o", options or "compat=1.1", theirs, size)
                mine, ref = self.qemu_info(ours), self.qemu_info(theirs)
                for info in (mine, ref):
                    info.pop("filename")
                    info.pop("actual-size")
                self.assertEqual(mine, ref)
                if identical:
                    with open(ours, "rb") as a, open(theirs, "rb") as b:
                        self.assertTrue(a.read() == b.read(), "not byte-identical to qemu-img create")
                # And it works: qemu writes to it, and it stays consistent.
                qemu_io(ours, ["write -P 0x5a 0 1k"] if size not in ("0",) else [])
                self.assert_qemu_check_clean(ours)

    def test_preallocated_metadata_maps_every_cluster(self):
        img = self.path("p.qcow2")
        self.qnbd_ok("create", "-q", "--preallocation", "metadata", img, "64M")
        self.assert_qemu_check_clean(img)
        self.assertLess(os.stat(img).st_blocks * 512, 2 * MiB, "data clusters must stay sparse")
        m = json.loads(qemu_img("map", "--output=json", img, cwd=self.dir).stdout)
        self.assertTrue(all(e["present"] and e["data"] and "offset" in e for e in m), m)
        self.assertEqual(sum(e["length"] for e in m), 64 * MiB)
        self.assert_map_equal("p.qcow2")
        check = json.loads(qemu_img("check", "--output=json", img, cwd=self.dir).stdout)
        self.assertEqual(check["allocated-clusters"], 64 * MiB // (64 * KiB))
        qemu_io(img, ["write -P 0x33 1m 100k", "read -P 0 0 1m", "read -P 0x33 1m 100k"])
        self.assert_qemu_check_clean(img)

    def test_backing_files(self):
        qemu_img("create", "-q", "-f", "qcow2", self.path("base.qcow2"), "100M")
        T.make_image(self.path("base.raw"), 30 * MiB, [(1 * MiB, b"raw!" * 1024)])
        os.mkdir(self.path("sub"))
        cases = [
            # size and format from the backing file
            (["-b", "base.qcow2"], "top1.qcow2", 100 * MiB, "qcow2"),
            (["-b", "base.qcow2", "-F", "qcow2"], "top2.qcow2", 200 * MiB, "qcow2"),
            (["--backing", "base.raw", "--backing-format", "raw"], "top3.qcow2", 30 * MiB, "raw"),
            (["-b", "base.raw", "-F", "raw", "--compat", "0.10"], "top4.qcow2", 64 * MiB, "raw"),
            # relative to the new image's directory, not the current one
            (["-b", "../base.qcow2"], "sub/top5.qcow2", 100 * MiB, "qcow2"),
            (["-b", self.path("base.qcow2")], "top6.qcow2", 100 * MiB, "qcow2"),
            (["-b", "base.qcow2", "--extended-l2", "--preallocation", "metadata"], "top7.qcow2", 100 * MiB, "qcow2"),
        ]
        for flags, name, size, fmt in cases:
            with self.subTest(name=name):
                args = ["create", "-q"] + flags + [name]
                if size not in (100 * MiB, 30 * MiB):
                    args.append(str(size))
                self.qnbd_ok(*args)
                self.assert_qemu_check_clean(name)
                info = self.assert_info_equal(name)
                self.assertEqual(info["virtual-size"], size)
                self.assertEqual(info["backing-filename-format"], fmt)
                self.assertEqual(self.qnbd_info(name, "--backing-chain"), self.qemu_info(name, "--backing-chain"))
                qemu_io(name, ["read -P 0 0 64k"], cwd=self.dir)
        # The plain overlay is what qemu-img writes for the same command.
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "ref.qcow2", cwd=self.dir)
        with open(self.path("top1.qcow2"), "rb") as a, open(self.path("ref.qcow2"), "rb") as b:
            self.assertTrue(a.read() == b.read(), "overlay differs from qemu-img create -b")
        self.assert_map_equal("top3.qcow2")

    def test_raw(self):
        self.qnbd_ok("create", "-q", "-f", "raw", self.path("r.img"), "1000")
        self.assertEqual(os.path.getsize(self.path("r.img")), 1024)
        self.assert_info_equal("r.img")
        self.qnbd_ok("create", "-q", "-f", "raw", self.path("r2.img"), "1.5G")
        self.assertEqual(os.path.getsize(self.path("r2.img")), 1536 * MiB)
        self.assertEqual(os.stat(self.path("r2.img")).st_blocks, 0)

    def test_sizes(self):
        for text, size in [("4096", 4096), ("64k", 64 * KiB), ("64KiB", 64 * KiB), ("1.5M", 1536 * KiB),
                           ("2g", 2 * GiB), ("1T", 1 << 40), ("3MiB", 3 * MiB), ("513", 1024)]:
            with self.subTest(text=text):
                img = self.path("s%s.qcow2" % text.replace(".", "_"))
                self.qnbd_ok("create", "-q", img, text)
                self.assertEqual(self.qemu_info(img)["virtual-size"], size)

    def test_refusals(self):
        img = self.path("x.qcow2")
        T.make_image(self.path("base.raw"), 1 * MiB)
        refused = [
            ["--compat", "0.10", "--lazy-refcounts", img, "1G"],
            ["--compat", "0.10", "--refcount-bits", "8", img, "1G"],
            ["--compat", "0.10", "--extended-l2", img, "1G"],
            ["--extended-l2", "--cluster-size", "4K", img, "1G"],
            ["--cluster-size", "3000", img, "1G"],
            ["--cluster-size", "4M", img, "1G"],
            ["--cluster-size", "256", img, "1G"],
            ["--refcount-bits", "3", img, "1G"],
            ["--refcount-bits", "128", img, "1G"],
            ["-b", "base.raw", img],                        # raw backing: format not guessed
            ["-b", "base.qcow2", img],                      # no such backing file
            ["-b", "base.raw", "-F", "raw", "--preallocation", "metadata", img, "1G"],
            ["-f", "raw", "-b", "base.raw", "-F", "raw", img, "1G"],
            [img],                                          # no size, no backing
            [img, "12Q"],
            [img, "1.5"],
            ["--compat", "4", img, "1G"],
            ["--preallocation", "full", img, "1G"],
        ]
        for args in refused:
            with self.subTest(args=args):
                p = qnbd("create", *args, cwd=self.dir)
                self.assertNotEqual(p.returncode, 0, p.stdout)
                self.assertTrue(p.stderr.startswith("qnbd: "), p.stderr)
                self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
                self.assertFalse(os.path.exists(img), "a refused create left a file behind")

    def test_existing_file_needs_force(self):
        img = self.path("keep.qcow2")
        with open(img, "wb") as f:
            f.write(b"precious")
        p = qnbd("create", img, "1G", cwd=self.dir)
        self.assertEqual(p.returncode, 1)
        self.assertIn("exists", p.stderr)
        with open(img, "rb") as f:
            self.assertEqual(f.read(), b"precious")
        self.qnbd_ok("create", "-q", "--force", img, "1G")
        self.assert_qemu_check_clean(img)


# ---------------------------------------------------------------------------------------------
# info
# ---------------------------------------------------------------------------------------------
class InfoMatchesQemu(ToolsCase):
    def test_plain_images(self):
        for options in ["", "compat=0.10", "lazy_refcounts=on,refcount_bits=2", "extended_l2=on,cluster_size=32k",
                        "compression_type=zstd"]:
            with self.subTest(options=options):
                img = self.path("i.qcow2")
                if os.path.exists(img):
                    os.unlink(img)
                qemu_img("create", "-q", "-f", "qcow2", "-o", options or "compat=1.1", img, "1G")
                qemu_io(img, ["write -P 1 0 1m", "write -z 2m 1m"])
                self.assert_info_equal("i.qcow2")

    def test_foreign_formats_are_named_not_shown_as_raw(self):
        # The tools probe like serve does: a VHD or VMDK is not described, mapped or checked as raw bytes.
        for fmt in ("vpc", "vmdk"):
            with self.subTest(fmt=fmt):
                img = "disk." + fmt
                qemu_img("create", "-q", "-f", fmt, self.path(img), "16M")
                for command in (["info"], ["map"], ["check"]):
                    p = qnbd(*(command + [img]), cwd=self.dir)
                    self.assertEqual(p.returncode, 1, "qnbd %s %s: %s%s" % (command[0], img, p.stdout, p.stderr))
                    self.assertIn(fmt, p.stderr)
                    self.assertIn("qemu-img convert", p.stderr)

    def test_snapshots_and_bitmaps(self):
        img = self.path("s.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", img, "64M")
        qemu_io(img, ["write -P 1 0 1m"])
        qemu_img("snapshot", "-c", "first", img)
        qemu_io(img, ["write -P 2 0 64k"])
        qemu_img("snapshot", "-c", "second", img)
        qemu_img("bitmap", "--add", img, "b0")
        qemu_img("bitmap", "--add", "-g", "1M", "--disable", img, "b1")
        info = self.assert_info_equal("s.qcow2")
        self.assertEqual([s["name"] for s in info["snapshots"]], ["first", "second"])
        human = self.qnbd_ok("info", "s.qcow2").stdout
        self.assertEqual(human, qemu_img("info", "s.qcow2", cwd=self.dir).stdout)

    def test_dirty_and_corrupt_bits(self):
        img = self.path("d.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "64M")
        Image(img).set_incompatible(0x3)
        info = self.assert_info_equal("d.qcow2")
        self.assertTrue(info["dirty-flag"])
        self.assertTrue(info["format-specific"]["data"]["corrupt"])
        self.assertIn("cleanly shut down: no", self.qnbd_ok("info", "d.qcow2").stdout)

    def test_raw_and_chain(self):
        T.make_image(self.path("base.raw"), 8 * MiB, [(0, b"x" * 4096)])
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", self.path("mid.qcow2"), "16M")
        os.mkdir(self.path("d"))
        qemu_img("create", "-q", "-f", "qcow2", "-b", "../mid.qcow2", "-F", "qcow2", self.path("d/top.qcow2"))
        self.assert_info_equal("base.raw")
        self.assert_info_equal("d/top.qcow2")
        self.assertEqual(self.qnbd_info("d/top.qcow2", "--backing-chain"),
                         self.qemu_info("d/top.qcow2", "--backing-chain"))
        human = self.qnbd_ok("info", "--backing-chain", "d/top.qcow2").stdout
        self.assertEqual(human, qemu_img("info", "--backing-chain", "d/top.qcow2", cwd=self.dir).stdout)
        p = qnbd("info", "missing.qcow2", cwd=self.dir)
        self.assertEqual(p.returncode, 1)
        self.assertTrue(p.stderr.startswith("qnbd: "))


# ---------------------------------------------------------------------------------------------
# check
# ---------------------------------------------------------------------------------------------
class CheckMatchesQemu(ToolsCase):
    def image_with_data(self, name="img.qcow2", options="", size="64M", writes=None):
        img = self.path(name)
        qemu_img("create", "-q", "-f", "qcow2", "-o", options or "compat=1.1", img, size)
        qemu_io(img, writes or ["write -P 1 0 192k", "write -P 2 1m 64k", "write -z 2m 64k", "write -P 3 5m 128k"])
        return img

    def test_clean_images(self):
        # Snapshots, compressed clusters, backing files, extended L2, odd refcount widths: all clean.
        self.image_with_data("plain.qcow2")
        snap = self.image_with_data("snap.qcow2")
        qemu_img("snapshot", "-c", "s1", snap)
        qemu_io(snap, ["write -P 9 0 64k"])
        qemu_img("snapshot", "-c", "s2", snap)
        src = self.path("src.raw")
        T.make_image(src, 4 * MiB, [(i * 128 * KiB, compressible(i, 64 * KiB)) for i in range(32)]
                     + [(3 * MiB, os.urandom(MiB))])
        qemu_img("convert", "-q", "-c", "-O", "qcow2", src, self.path("comp.qcow2"))
        qemu_img("convert", "-q", "-c", "-O", "qcow2", "-o", "compression_type=zstd,cluster_size=4k", src,
                 self.path("zstd.qcow2"))
        qemu_img("create", "-q", "-f", "qcow2", "-b", "comp.qcow2", "-F", "qcow2", self.path("over.qcow2"))
        qemu_io(self.path("over.qcow2"), ["write -P 4 64k 4k", "write -z 1m 64k"])
        self.image_with_data("ext.qcow2", "extended_l2=on,cluster_size=128k")
        self.image_with_data("r1.qcow2", "refcount_bits=1,cluster_size=4k")
        self.image_with_data("r64.qcow2", "refcount_bits=64,cluster_size=1k")
        self.image_with_data("v2.qcow2", "compat=0.10,cluster_size=512")
        qemu_img("bitmap", "--add", self.path("plain.qcow2"), "b0")
        for name in ["plain.qcow2", "snap.qcow2", "comp.qcow2", "zstd.qcow2", "over.qcow2", "ext.qcow2",
                     "r1.qcow2", "r64.qcow2", "v2.qcow2"]:
            with self.subTest(image=name):
                n, q, _ = self.check_both(name)
                self.assertEqual(n.returncode, 0)
                human = qnbd("check", name, cwd=self.dir).stdout
                self.assertEqual(human, qemu_img("check", name, cwd=self.dir).stdout)

    def damaged(self, name, damage, options=""):
        img = self.image_with_data(name, options)
        damage(Image(img))
        return name

    def test_damage_classification(self):
        def leak(im):
            # Two clusters past everything else claim a refcount: leaks.
            with open(im.path, "ab") as f:
                f.truncate(os.path.getsize(im.path) + 3 * im.cs)
            end = os.path.getsize(im.path) // im.cs
            im.set_refcount(end - 2, 1)
            im.set_refcount(end - 1, 2)

        def refcount_too_low(im):
            im.set_refcount(im.host_cluster(0), 0)          # in use, refcount 0

        def refcount_shared(im):
            # A data cluster referenced twice (two L2 entries) but counted once.
            im.set_u64(im.l2_entry_offset(64 * KiB), im.u64(im.l2_entry_offset(0)))

        def l2_at_l1(im):
            # A data cluster pointing at the L1 table: overlap with metadata.
            im.set_u64(im.l2_entry_offset(0), (1 << 63) | im.l1_offset)

        def l2_past_eof(im):
            im.set_u64(im.l2_entry_offset(0), (1 << 63) | (1 << 40))

        def l2_misaligned(im):
            im.set_u64(im.l2_entry_offset(0), (1 << 63) | (im.host_cluster(0) * im.cs + 512))

        def l2_misaligned_zero(im):
            im.set_u64(im.l2_entry_offset(0), (1 << 63) | (im.host_cluster(0) * im.cs + 512) | 1)

        def l2_reserved(im):
            im.set_u64(im.l2_entry_offset(0), im.u64(im.l2_entry_offset(0)) | 0x2)

        def l1_reserved(im):
            im.set_u64(im.l1_entry_offset(0), im.u64(im.l1_entry_offset(0)) | 0x1)

        def copied_cleared(im):
            im.set_u64(im.l2_entry_offset(0), im.u64(im.l2_entry_offset(0)) & ~(1 << 63))

        def copied_on_l1(im):
            im.set_u64(im.l1_entry_offset(0), im.u64(im.l1_entry_offset(0)) & ~(1 << 63))

        def refblock_missing(im):
            im.set_u64(im.rt_offset, 0)

        def refblock_misaligned(im):
            im.set_u64(im.rt_offset, im.u64(im.rt_offset) + 512)

        def reftable_reserved(im):
            im.set_u64(im.rt_offset, im.u64(im.rt_offset) | 1)

        def refcount_of_refblock(im):
            block, _ = im.refcount_location(0)
            im.set_refcount(block // im.cs, 3)

        def header_overlap(im):
            im.set_u64(im.l2_entry_offset(1 * MiB), (1 << 63))   # offset 0 with COPIED: "external data"

        def dirty_with_leak(im):
            im.set_incompatible(0x1)
            leak(im)

        damages = [leak, refcount_too_low, refcount_shared, l2_at_l1, l2_past_eof, l2_misaligned,
                   l2_misaligned_zero, l2_reserved, l1_reserved, copied_cleared, copied_on_l1, refblock_missing,
                   refblock_misaligned, reftable_reserved, refcount_of_refblock, header_overlap, dirty_with_leak]
        for damage in damages:
            with self.subTest(damage=damage.__name__):
                name = self.damaged(damage.__name__ + ".qcow2", damage)
                n, q, _ = self.check_both(name)
                self.assertNotEqual(q.returncode, 0, "the damage was not damage")

    def test_tables_beyond_any_file(self):
        # Header offsets whose table would end past the largest file offset: qemu refuses to open the
        # image (exit 1); qnbd check used to trap reading the table. The inputs are the fuzz corpus's.
        corpus = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fuzz", "corpus", "qcow2")
        for name in ("regress-l1-offset-overflow", "regress-reftable-offset-overflow"):
            with self.subTest(image=name):
                shutil.copyfile(os.path.join(corpus, name), self.path(name))
                n, q, _ = self.check_both(name)
                self.assertEqual(n.returncode, 1)
                self.assertIn("beyond any file", n.stderr)

    def test_missing_backing_file(self):
        # qemu-img check opens the backing chain and fails (exit 1) without it; qnbd serve refuses the
        # image too, and qnbd check no longer calls it clean.
        qemu_img("create", "-q", "-f", "qcow2", self.path("gone.qcow2"), "1M")
        qemu_img("create", "-q", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", self.path("top.qcow2"))
        os.unlink(self.path("gone.qcow2"))
        n, q, _ = self.check_both("top.qcow2")
        self.assertEqual(n.returncode, 1)
        self.assertIn("gone.qcow2", n.stderr)

    def test_compressed_damage(self):
        src = self.path("src.raw")
        T.make_image(src, 2 * MiB, [(i * 64 * KiB, compressible(i, 64 * KiB)) for i in range(32)])
        qemu_img("convert", "-q", "-c", "-O", "qcow2", src, self.path("c.qcow2"))
        im = Image(self.path("c.qcow2"))
        first = im.u64(im.l2_entry_offset(0))
        # A compressed cluster's host cluster is shared by many entries: lower its refcount by one.
        host = (first & ((1 << 54) - 1)) // im.cs
        im.set_refcount(host, im.refcount(host) - 1)
        self.check_both("c.qcow2")
        self.check_both("c.qcow2", "-r", "all")
        # COPIED on a compressed entry is corruption.
        shutil.copyfile(src, self.path("src2.raw"))
        qemu_img("convert", "-q", "-c", "-O", "qcow2", src, self.path("c2.qcow2"))
        im = Image(self.path("c2.qcow2"))
        im.set_u64(im.l2_entry_offset(64 * KiB), im.u64(im.l2_entry_offset(64 * KiB)) | (1 << 63))
        self.check_both("c2.qcow2")

    def test_snapshot_refcounts(self):
        img = self.image_with_data("s.qcow2")
        qemu_img("snapshot", "-c", "s1", img)
        im = Image(img)
        shared = im.host_cluster(1 * MiB)
        self.assertEqual(im.refcount(shared), 2)
        im.set_refcount(shared, 1)                           # snapshot + active share it: too low
        n, q, _ = self.check_both("s.qcow2")
        self.assertEqual(n.returncode, 2)
        n, q, ours = self.check_both("s.qcow2", "-r", "all")
        self.assertEqual(n.returncode, 0)
        self.assert_qemu_check_clean(ours)

    def test_repair_leaks(self):
        img = self.image_with_data("l.qcow2")
        im = Image(img)
        with open(img, "ab") as f:
            f.truncate(os.path.getsize(img) + 4 * im.cs)
        end = os.path.getsize(img) // im.cs
        for c in range(end - 4, end):
            im.set_refcount(c, 1)
        n, q, _ = self.check_both("l.qcow2")
        self.assertEqual(n.returncode, 3)
        self.assertEqual(json.loads(n.stdout)["leaks"], 4)
        self.assertEqual(n.stderr.count("Leaked cluster"), 4)
        n, q, ours = self.check_both("l.qcow2", "-r", "leaks")
        self.assertEqual(n.returncode, 0)
        self.assertEqual(json.loads(n.stdout)["leaks-fixed"], 4)
        self.assert_qemu_check_clean(ours)
        human = qnbd("check", "-r", "leaks", self.path("l.qcow2"), cwd=self.dir).stdout
        self.assertIn("The following inconsistencies were found and repaired:", human)
        self.assertIn("    4 leaked clusters", human)
        self.assertIn("No errors were found on the image.", human)
        self.assert_qemu_check_clean("l.qcow2")

    def test_repairs_leave_clean_images(self):
        cases = {
            "low": (lambda im: im.set_refcount(im.host_cluster(1 * MiB), 0), "all"),
            "copied": (lambda im: im.set_u64(im.l2_entry_offset(0), im.u64(im.l2_entry_offset(0)) & ~(1 << 63)),
                       "all"),
            "copied_l1": (lambda im: im.set_u64(im.l1_entry_offset(0), im.u64(im.l1_entry_offset(0)) & ~(1 << 63)),
                          "all"),
            "misaligned_zero": (lambda im: im.set_u64(im.l2_entry_offset(2 * MiB),
                                                      (1 << 63) | (im.host_cluster(2 * MiB) * im.cs + 512) | 1),
                                "all"),
            "dirty_leak": (self.dirty_leak, "leaks"),
        }
        for name, (damage, mode) in cases.items():
            with self.subTest(case=name):
                img = self.image_with_data(name + ".qcow2")
                damage(Image(img))
                n, q, ours = self.check_both(name + ".qcow2", "-r", mode)
                self.assertEqual(n.returncode, 0, n.stdout + n.stderr)
                self.assert_qemu_check_clean(ours)
                self.assertEqual(Image(ours).incompat & 3, 0, "dirty/corrupt bit left set")
                qemu_io(ours, ["read -P 1 0 192k", "read -P 2 1m 64k"])

    def test_lazy_refcounts_crash_is_repaired(self):
        # A writer with lazy refcounts killed before its refcounts reached the disk: dirty bit set,
        # data clusters in use with refcount 0. -r all makes it whole; the data is still there.
        img = self.path("lazy.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "64M")
        T.run(["qemu-io", "-f", "qcow2", "-c", "write -P 1 0 128k", "-c", "write -P 2 1m 64k", "-c", "abort", img],
              timeout=60, check=False)
        self.assertTrue(self.qemu_info("lazy.qcow2")["dirty-flag"])
        n, q, _ = self.check_both("lazy.qcow2")
        self.assertEqual(n.returncode, 2)
        n, q, ours = self.check_both("lazy.qcow2", "-r", "all")
        self.assertEqual(n.returncode, 0)
        self.assert_qemu_check_clean(ours)
        self.assertFalse(self.qemu_info(ours)["dirty-flag"])
        qemu_io(ours, ["read -P 1 0 128k", "read -P 2 1m 64k"])

    def dirty_leak(self, im):
        im.set_incompatible(0x1)
        with open(im.path, "ab") as f:
            f.truncate(os.path.getsize(im.path) + im.cs)
        im.set_refcount(os.path.getsize(im.path) // im.cs - 1, 1)

    def test_missing_refblock_at_end_is_recreated(self):
        # 512-byte clusters: the second refcount block covers the data; drop it from the table.
        img = self.image_with_data("m.qcow2", "cluster_size=512", size="8M",
                                   writes=["write -P 1 0 200k", "write -P 2 1m 64k"])
        im = Image(img)
        entries = [im.u64(im.rt_offset + 8 * i) for i in range(4)]
        last = max(i for i, e in enumerate(entries) if e)
        self.assertGreater(last, 0)
        im.set_u64(im.rt_offset + 8 * last, 0)
        n, q, _ = self.check_both("m.qcow2")
        self.assertEqual(n.returncode, 2)
        ours = self.path("ours.m.qcow2")
        shutil.copyfile(img, ours)
        p = qnbd("check", "-r", "all", ours, cwd=self.dir)
        if p.returncode == 0:
            self.assert_qemu_check_clean(ours)
            qemu_io(ours, ["read -P 1 0 200k", "read -P 2 1m 64k"])
        else:
            # Refused: the image is left as it was, and the reason is given.
            self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
            self.assertIn("rebuild", p.stderr)

    def test_unrepairable_is_refused_not_damaged(self):
        img = self.image_with_data("u.qcow2")
        im = Image(img)
        im.set_u64(im.rt_offset, im.u64(im.rt_offset) + 512)      # refcount block misaligned
        before = open(img, "rb").read()
        for mode in ("leaks", "all"):
            with self.subTest(mode=mode):
                p = qnbd("check", "-r", mode, img, cwd=self.dir)
                self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
                self.assertIn("rebuild", p.stderr)
                self.assertEqual(open(img, "rb").read(), before, "a refused repair changed the image")

    def test_not_checkable(self):
        T.make_image(self.path("r.img"), 1 * MiB)
        p = qnbd("check", "r.img", cwd=self.dir)
        q = qemu_img("check", "-f", "raw", "r.img", cwd=self.dir, check=False)
        self.assertEqual(p.returncode, q.returncode)
        p = qnbd("check", "nothing.qcow2", cwd=self.dir)
        self.assertEqual(p.returncode, 1)
        with open(self.path("trunc.qcow2"), "wb") as f:
            f.write(b"QFI\xfb\x00\x00\x00\x03")
        self.assertEqual(qnbd("check", "trunc.qcow2", cwd=self.dir).returncode, 1)


# ---------------------------------------------------------------------------------------------
# map
# ---------------------------------------------------------------------------------------------
class MapMatchesQemu(ToolsCase):
    def test_single_images(self):
        images = {
            "plain": ("", ["write -P 1 0 192k", "write -P 2 1m 64k", "write -z 2m 64k", "write -z -u 3m 64k",
                           "write -P 3 5m 128k", "write -P 4 %d 4k" % (64 * MiB - 4096)]),
            "c512": ("cluster_size=512", ["write -P 1 1000 5000", "write -z 8k 4k", "write -P 2 1m 3k"]),
            "ext": ("extended_l2=on,cluster_size=64k",
                    ["write -P 1 4k 4k", "write -z 16k 4k", "write -z 64k 64k", "write -P 2 1m 2k"]),
            "v2": ("compat=0.10", ["write -P 1 0 64k", "write -z 1m 64k"]),
            "zeroalloc": ("", ["write -P 1 0 1m", "write -z 0 512k"]),
        }
        for name, (options, writes) in images.items():
            with self.subTest(image=name):
                img = self.path(name + ".qcow2")
                qemu_img("create", "-q", "-f", "qcow2", "-o", options or "compat=1.1", img, "64M")
                qemu_io(img, writes)
                self.assert_map_equal(name + ".qcow2")
        for options in ["", "extended_l2=on", "cluster_size=512"]:
            with self.subTest(prealloc=options):
                img = self.path("pre.qcow2")
                if os.path.exists(img):
                    os.unlink(img)
                qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata," + (options or "compat=1.1"),
                         img, "8M")
                qemu_io(img, ["write -P 7 100k 10k"])
                self.assert_map_equal("pre.qcow2")

    def test_compressed(self):
        src = self.path("src.raw")
        T.make_image(src, 3 * MiB, [(i * 64 * KiB, compressible(i, 64 * KiB)) for i in range(16)]
                     + [(2 * MiB, os.urandom(512 * KiB))])
        qemu_img("convert", "-q", "-c", "-O", "qcow2", src, self.path("c.qcow2"))
        self.assert_map_equal("c.qcow2")
        p = qnbd("map", "c.qcow2", cwd=self.dir)
        self.assertEqual(p.returncode, 1)
        self.assertIn("compressed clusters", p.stderr)

    def test_backing_chains(self):
        base = self.path("base.raw")
        T.make_image(base, 5 * MiB - 4096, [(0, b"a" * 70000), (3 * MiB, b"b" * 4096)])
        qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", self.path("mid.qcow2"), "6M")
        qemu_io(self.path("mid.qcow2"), ["write -P 1 64k 64k", "write -z 1m 128k", "write -P 2 4m 1m"])
        os.mkdir(self.path("top"))
        qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", "../mid.qcow2", "-F", "qcow2",
                 self.path("top/top.qcow2"), "8M")
        qemu_io(self.path("top/top.qcow2"), ["write -P 3 8k 4k", "write -z 1m 4k", "write -P 4 7m 4k"])
        src = self.path("src.raw")
        T.make_image(src, 2 * MiB, [(i * 64 * KiB, compressible(i, 64 * KiB)) for i in range(32)])
        qemu_img("convert", "-q", "-c", "-O", "qcow2", src, self.path("cbase.qcow2"))
        qemu_img("create", "-q", "-f", "qcow2", "-b", "cbase.qcow2", "-F", "qcow2", self.path("cover.qcow2"), "4M")
        qemu_io(self.path("cover.qcow2"), ["write -P 5 64k 64k", "write -z 192k 64k"])
        qemu_img("create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", self.path("empty.qcow2"))
        for name in ["mid.qcow2", "top/top.qcow2", "cover.qcow2", "empty.qcow2"]:
            with self.subTest(image=name):
                self.assert_map_equal(name)
        # From another directory, through an absolute path.
        self.assertEqual(qnbd("map", self.path("top/top.qcow2"), cwd="/").stdout,
                         qemu_img("map", self.path("top/top.qcow2"), cwd="/").stdout)

    def test_snapshots_and_empty(self):
        img = self.path("s.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", img, "64M")
        qemu_io(img, ["write -P 1 0 1m"])
        qemu_img("snapshot", "-c", "s1", img)
        qemu_io(img, ["write -P 2 0 64k"])
        self.assert_map_equal("s.qcow2")
        qemu_img("create", "-q", "-f", "qcow2", self.path("zero.qcow2"), "0")
        self.assert_map_equal("zero.qcow2")
        T.make_image(self.path("r.img"), 1 * MiB, [(64 * KiB, b"x" * 8192)])
        self.assertEqual(qnbd("map", "--output", "json", "r.img", cwd=self.dir).stdout,
                         qemu_img("map", "--output=json", "-f", "raw", "r.img", cwd=self.dir).stdout)


if __name__ == "__main__":
    unittest.main()
