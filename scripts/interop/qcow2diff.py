# Randomized differential workload for qcow2 writes through qnbd (run with /usr/bin/python3).
#
# One qnbd serves a qcow2 image; several libnbd connections issue concurrent writes (random sizes and
# offsets, unaligned included), zeroes (with and without NO_HOLE), trims, FUA writes, flushes and
# verifying reads. An in-memory model of the guest disk receives the same operations. Concurrent
# operations never overlap (the scheduler only issues an operation whose range is free), so the final
# contents are deterministic whatever order the server completes them in. After a clean stop, qemu is
# the referee: `qemu-img check` must find no errors and no leaks, and `qemu-img compare` must find the
# image identical to the model written out as a raw twin.
# With bitmaps (v3 only): the image starts with persistent bitmaps (enabled at 512 B and 64 KiB
# granularity, and a disabled one with bits set); afterwards `qemu-img info` lists the same bitmaps with
# the same flags, the disabled one reads the same (`qnbd map --bitmap`), and `qemu-nbd -r -B NAME` +
# `nbdinfo --map=qemu:dirty-bitmap:NAME` shows every byte written, zeroed or trimmed as dirty.
#
#   scripts/interop/qcow2diff.py --help     the full matrix and single cases from the command line
#   test_qcow2_write.py                      the CI subset
import argparse
import itertools
import json
import os
import random
import select
import sys
import time

import qnbdtest as T

MiB = 1024 * 1024


class Case:
    def __init__(self, cluster=65536, refcount_bits=16, compat="1.1", backing=None, lazy=False,
                 size=64 * MiB, backing_size=None, ops=600, connections=3, depth=8, seed=1, snapshot=False,
                 extended_l2=False, bitmaps=False):
        self.cluster = cluster
        self.refcount_bits = refcount_bits
        self.compat = compat
        self.backing = backing            # None, "raw" or "qcow2"
        self.lazy = lazy
        self.size = size
        self.backing_size = backing_size or size
        self.ops = ops
        self.connections = connections
        self.depth = depth
        self.seed = seed
        # An internal snapshot taken before the workload: shared clusters must be copied on write
        # and the snapshot must read back unchanged afterwards.
        self.snapshot = snapshot
        self.extended_l2 = extended_l2
        self.bitmaps = bitmaps

    def __str__(self):
        return "cluster=%d refcount_bits=%d compat=%s backing=%s lazy=%s snapshot=%s extended_l2=%s bitmaps=%s seed=%d" % (
            self.cluster, self.refcount_bits, self.compat, self.backing, self.lazy, self.snapshot,
            self.extended_l2, self.bitmaps, self.seed)

    @property
    def v3(self):
        return self.compat != "0.10"


def qemu_img(*args, check=True):
    return T.run(["qemu-img", *args], timeout=300, check=check)


def make_images(case, workdir, rnd):
    """Creates the image (and its backing file); returns (image path, initial model)."""
    model = bytearray(case.size)
    image = os.path.join(workdir, "disk.qcow2")
    opts = "cluster_size=%d,refcount_bits=%d,compat=%s" % (case.cluster, case.refcount_bits, case.compat)
    if case.lazy:
        opts += ",lazy_refcounts=on"
    if case.extended_l2:
        opts += ",extended_l2=on"
    if case.backing:
        base = os.path.join(workdir, "base." + case.backing)
        with open(os.path.join(workdir, "base.raw"), "wb") as f:
            f.truncate(case.backing_size)
            # Scattered data in the backing file, so COW reads and hidden backing data matter.
            for _ in range(40):
                off = rnd.randrange(0, case.backing_size - 4096)
                data = rnd.randbytes(rnd.randrange(1, 3 * case.cluster))[: case.backing_size - off]
                f.seek(off)
                f.write(data)
                model[off:off + len(data)] = data
        if case.backing == "qcow2":
            qemu_img("convert", "-q", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=%d" % case.cluster,
                     os.path.join(workdir, "base.raw"), base)
        else:
            os.rename(os.path.join(workdir, "base.raw"), base)
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", os.path.basename(base), "-F", case.backing,
                 image, str(case.size))
    else:
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, image, str(case.size))
    if case.snapshot:
        cmds = []
        for _ in range(30):
            off = rnd.randrange(0, case.size - 3 * case.cluster)
            n = rnd.randrange(1, 3 * case.cluster)
            pattern = rnd.randrange(1, 256)
            cmds += ["-c", "write -P %d %d %d" % (pattern, off, n)]
            model[off:off + n] = bytes([pattern]) * n
        T.run(["qemu-io", "-f", "qcow2", image] + cmds, timeout=120)
        qemu_img("snapshot", "-c", "s1", image)
        with open(os.path.join(workdir, "snapshot.raw"), "wb") as f:
            f.write(model)
    if case.bitmaps:
        qemu_img("bitmap", "--add", "-g", "512", image, "fine")
        qemu_img("bitmap", "--add", "-g", "65536", image, "coarse")
        qemu_img("bitmap", "--add", "-g", "65536", image, "frozen")
        n = min(3 * case.cluster, 200000)
        T.run(["qemu-io", "-f", "qcow2", image, "-c", "write -P 7 1000 %d" % n], timeout=120)
        model[1000:1000 + n] = bytes([7]) * n
        qemu_img("bitmap", "--disable", image, "frozen")
    return image, model


def bitmap_list(image):
    info = json.loads(qemu_img("info", "--output=json", image).stdout)
    return sorted((b["name"], b["granularity"], tuple(b["flags"])) for b in info["format-specific"]["data"].get("bitmaps", []))


def qnbd_bitmap_runs(image, name):
    out = T.run([T.QNBD, "map", "--bitmap", name, "--output", "json", image], timeout=120).stdout
    return [(r["start"], r["length"], r["dirty"]) for r in json.loads(out)]


def qemu_dirty_runs(workdir, image, name):
    """Dirty (offset, length) runs of bitmap `name` as qemu-nbd -B serves them to nbdinfo."""
    return [(off, length) for off, length, dirty in T.qemu_nbd_dirty_map(workdir, image, name) if dirty]


def bitmap_problems(workdir, image, before, frozen, changed):
    problems = []
    if bitmap_list(image) != before:
        problems.append("bitmaps changed: %s -> %s" % (before, bitmap_list(image)))
        return problems
    if qnbd_bitmap_runs(image, "frozen") != frozen:
        problems.append("the disabled bitmap changed")
    for name in ("fine", "coarse"):
        dirty = sorted(qemu_dirty_runs(workdir, image, name))
        merged = []
        for off, length in dirty:
            if merged and merged[-1][1] >= off:
                merged[-1][1] = max(merged[-1][1], off + length)
            else:
                merged.append([off, off + length])
        for off, length in changed:
            if not any(lo <= off and off + length <= hi for lo, hi in merged):
                problems.append("bitmap %s: %d+%d was changed but is not dirty" % (name, off, length))
                break
    return problems


class Workload:
    """Non-overlapping concurrent operations over several libnbd handles, mirrored into a model."""

    def __init__(self, case, uri, model, rnd):
        self.case = case
        self.model = model
        self.rnd = rnd
        self.handles = []
        for _ in range(case.connections):
            h = T.nbd.NBD()
            h.set_strict_mode(0)
            h.connect_uri(uri)
            self.handles.append(h)
        self.inflight = {}   # (handle index, cookie) -> (kind, offset, length, expected, buffer)
        self.busy = []       # ranges in flight
        self.errors = []
        self.counts = {}
        self.changed = []    # (offset, length) of every write, zero and trim sent

    def overlaps(self, off, length):
        return any(off < o + l and o < off + length for o, l in self.busy)

    def pick_range(self):
        c = self.case.cluster
        size = self.case.size
        r = self.rnd.random()
        if r < 0.35:      # cluster aligned, whole clusters
            n = self.rnd.randrange(1, 5)
            off = self.rnd.randrange(0, size // c - n + 1) * c
            return off, n * c
        if r < 0.85:      # unaligned, small
            length = self.rnd.randrange(1, 3 * c + 1)
            off = self.rnd.randrange(0, size - length + 1)
            return off, length
        length = self.rnd.randrange(1, min(MiB, size) + 1)      # large
        off = self.rnd.randrange(0, size - length + 1)
        return off, length

    def trim_effect(self, off, length):
        """What TRIM does to the guest view: whole clusters read as zeros (v3, or without backing);
        the rest of a cluster keeps its data (TRIM is advisory)."""
        if self.case.backing and not self.case.v3:
            return
        c = self.case.cluster
        end = off + length
        first = (off + c - 1) // c
        cl = first
        while cl * c < end:
            lo, hi = cl * c, min((cl + 1) * c, self.case.size)
            if lo >= off and hi <= end:
                self.model[lo:hi] = bytes(hi - lo)
            cl += 1

    def issue(self, hi):
        h = self.handles[hi]
        kind = self.rnd.choices(["write", "fua", "zero", "trim", "read", "flush"], [40, 5, 12, 10, 25, 3])[0]
        if kind == "flush":
            cookie = h.aio_flush()
            self.inflight[(hi, cookie)] = ("flush", 0, 0, None, None)
            return True
        off, length = self.pick_range()
        if self.overlaps(off, length):
            return False
        if kind in ("write", "fua"):
            data = self.rnd.randbytes(length)
            # Plain bytearrays, not nbd.Buffer: libnbd 1.14's Python binding never frees the memory
            # of an nbd.Buffer passed to an aio call (1 MiB leaked per 1 MiB request), which took this
            # script to 21 GiB on the 2 MiB-cluster cases.
            buf = bytearray(data)
            cookie = h.aio_pwrite(buf, off, flags=T.nbd.CMD_FLAG_FUA if kind == "fua" else 0)
            self.model[off:off + length] = data
            expected = None
        elif kind == "zero":
            flags = T.nbd.CMD_FLAG_NO_HOLE if self.rnd.random() < 0.3 else 0
            cookie = h.aio_zero(length, off, flags=flags)
            self.model[off:off + length] = bytes(length)
            buf = expected = None
        elif kind == "trim":
            cookie = h.aio_trim(length, off)
            self.trim_effect(off, length)
            buf = expected = None
        else:
            buf = bytearray(length)
            cookie = h.aio_pread(buf, off)
            expected = bytes(self.model[off:off + length])
        self.inflight[(hi, cookie)] = (kind, off, length, expected, buf)
        if kind != "read":
            self.changed.append((off, length))
        self.busy.append((off, length))
        self.counts[kind] = self.counts.get(kind, 0) + 1
        return True

    def reap(self):
        for (hi, cookie), (kind, off, length, expected, buf) in list(self.inflight.items()):
            h = self.handles[hi]
            try:
                done = h.aio_command_completed(cookie)
            except T.nbd.Error as e:
                self.errors.append("%s at %d+%d failed: %s" % (kind, off, length, e))
                done = True
            if not done:
                continue
            del self.inflight[(hi, cookie)]
            if kind != "flush":
                self.busy.remove((off, length))
            if kind == "read" and not self.errors:
                got = buf
                if got != expected:
                    bad = next(i for i in range(length) if got[i] != expected[i])
                    self.errors.append("read at %d+%d differs from the model at byte %d" % (off, length, off + bad))

    def pump(self, timeout=1.0):
        rl, wl = [], []
        for h in self.handles:
            d = h.aio_get_direction()
            if d & T.nbd.AIO_DIRECTION_READ:
                rl.append(h.aio_get_fd())
            if d & T.nbd.AIO_DIRECTION_WRITE:
                wl.append(h.aio_get_fd())
        r, w, _ = select.select(rl, wl, [], timeout)
        for h in self.handles:
            fd = h.aio_get_fd()
            if fd in r:
                h.aio_notify_read()
            if fd in w:
                h.aio_notify_write()
        self.reap()

    def run(self, deadline):
        issued = 0
        while issued < self.case.ops and not self.errors:
            if time.monotonic() > deadline:
                self.errors.append("workload timed out")
                break
            progressed = False
            for hi in range(len(self.handles)):
                if sum(1 for k in self.inflight if k[0] == hi) < self.case.depth and issued < self.case.ops:
                    if self.issue(hi):
                        issued += 1
                        progressed = True
            self.pump(0 if progressed else 0.5)
        while self.inflight and time.monotonic() < deadline:
            self.pump(0.5)
        if self.inflight:
            self.errors.append("%d requests never completed" % len(self.inflight))

    def verify_all(self):
        """Reads the whole disk back through one connection and compares it with the model."""
        h = self.handles[0]
        step = 4 * MiB
        for off in range(0, self.case.size, step):
            n = min(step, self.case.size - off)
            got = h.pread(n, off)
            if got != self.model[off:off + n]:
                bad = next(i for i in range(n) if got[i] != self.model[off + i])
                self.errors.append("final read differs from the model at byte %d" % (off + bad))
                return

    def close(self):
        for h in self.handles:
            try:
                h.flush()
                h.shutdown()
            except T.nbd.Error:
                pass


def run_case(case, workdir=None, timeout=240):
    """Runs one case; returns a list of problems (empty = pass)."""
    rnd = random.Random(case.seed)
    workdir = workdir or T.new_workdir("qcow2diff")
    image, model = make_images(case, workdir, rnd)
    if case.bitmaps:
        before_bitmaps = bitmap_list(image)
        frozen = qnbd_bitmap_runs(image, "frozen")
    server = T.Server(workdir, image).start()
    problems = []
    try:
        w = Workload(case, server.uri(), model, rnd)
        w.run(time.monotonic() + timeout)
        if not w.errors:
            w.verify_all()
        w.close()
        problems += w.errors
    finally:
        rc = server.stop()
    if case.bitmaps and rc == 0:
        problems += bitmap_problems(workdir, image, before_bitmaps, frozen, w.changed)
    if rc != 0:
        problems.append("server exited with %r; log:\n%s" % (rc, server.log()[-2000:]))
    check = qemu_img("check", "-f", "qcow2", image, check=False)
    if check.returncode != 0 or "leaked" in check.stdout or "ERROR" in check.stdout:
        problems.append("qemu-img check rc=%d:\n%s%s" % (check.returncode, check.stdout, check.stderr))
    twin = os.path.join(workdir, "model.raw")
    with open(twin, "wb") as f:
        f.write(model)
    compare = qemu_img("compare", "-f", "raw", twin, "-F", "qcow2", image, check=False)
    if compare.returncode != 0:
        problems.append("qemu-img compare: %s%s" % (compare.stdout, compare.stderr))
    if case.snapshot:
        frozen = os.path.join(workdir, "s1.raw")
        qemu_img("convert", "-f", "qcow2", "-O", "raw", "-l", "snapshot.name=s1", image, frozen)
        compare = qemu_img("compare", "-f", "raw", os.path.join(workdir, "snapshot.raw"), "-F", "raw", frozen, check=False)
        if compare.returncode != 0:
            problems.append("snapshot s1 changed: %s%s" % (compare.stdout, compare.stderr))
    return problems


def matrix():
    """The full matrix the issue asks for."""
    for cluster, bits, compat, backing, lazy in itertools.product(
            [512, 4096, 65536, 2 * MiB], [1, 16, 64], ["0.10", "1.1"], [None, "qcow2", "raw"], [False, True]):
        if compat == "0.10" and (bits != 16 or lazy):
            continue   # qemu cannot make those
        size = 64 * MiB if cluster < 2 * MiB else 256 * MiB
        yield Case(cluster=cluster, refcount_bits=bits, compat=compat, backing=backing, lazy=lazy, size=size)
    for cluster, compat in itertools.product([512, 65536], ["0.10", "1.1"]):
        # 1-bit refcounts cannot count a snapshot's second reference, so qemu refuses those.
        yield Case(cluster=cluster, compat=compat, snapshot=True)
    for cluster, backing, snapshot in itertools.product([16384, 65536, 2 * MiB], [None, "qcow2", "raw"], [False, True]):
        yield Case(cluster=cluster, backing=backing, extended_l2=True, snapshot=snapshot,
                   size=64 * MiB if cluster < 2 * MiB else 256 * MiB)
    for cluster, backing, bits in itertools.product([512, 65536, 2 * MiB], [None, "qcow2"], [1, 16]):
        yield Case(cluster=cluster, backing=backing, refcount_bits=bits, bitmaps=True,
                   size=64 * MiB if cluster < 2 * MiB else 256 * MiB)


def main():
    p = argparse.ArgumentParser(description="qcow2 differential workload through qnbd")
    p.add_argument("--matrix", action="store_true", help="run the full matrix")
    p.add_argument("--seeds", type=int, default=1, help="seeds per case")
    p.add_argument("--ops", type=int, default=1500, help="operations per case")
    p.add_argument("--cluster", type=int, default=65536)
    p.add_argument("--refcount-bits", type=int, default=16)
    p.add_argument("--compat", default="1.1")
    p.add_argument("--backing", choices=["raw", "qcow2"])
    p.add_argument("--lazy", action="store_true")
    p.add_argument("--snapshot", action="store_true")
    p.add_argument("--extended-l2", action="store_true")
    p.add_argument("--bitmaps", action="store_true")
    a = p.parse_args()
    cases = list(matrix()) if a.matrix else [Case(cluster=a.cluster, refcount_bits=a.refcount_bits,
                                                   compat=a.compat, backing=a.backing, lazy=a.lazy,
                                                   snapshot=a.snapshot, extended_l2=a.extended_l2,
                                                   bitmaps=a.bitmaps)]
    passed = failed = 0
    for base in cases:
        for seed in range(1, a.seeds + 1):
            base.seed = seed
            base.ops = a.ops
            t0 = time.monotonic()
            problems = run_case(base)
            status = "PASS" if not problems else "FAIL"
            print("%s %s (%.1f s)" % (status, base, time.monotonic() - t0), flush=True)
            for pr in problems:
                print("    " + pr.replace("\n", "\n    "))
            passed += not problems
            failed += bool(problems)
    print("%d passed, %d failed" % (passed, failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
