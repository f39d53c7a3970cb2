# Process-kill crash test (run with /usr/bin/python3): a concurrent write workload with periodic FLUSH
# against qnbd serving qcow2 (or raw), SIGKILL at a random moment, then the referee:
#   - `qemu-img check` finds no corruption (leaks are allowed after a crash, and
#     `qnbd check --repair leaks` must remove them: qemu-img check is clean afterwards);
#   - every write acknowledged before the last completed FLUSH was *sent* reads back intact, except
#     where a later (possibly unfinished) operation touched the same bytes;
#   - the image reopens and serves;
#   - with --bitmaps (an enabled bitmap "live", a disabled "frozen" with bits set): after the kill
#     "live" is in use (inconsistent) and "frozen" unchanged, and both stay so through the reopen.
#
#   scripts/interop/crashkill.py --cycles 200 [--format qcow2|raw] [--cluster N]   the long run
#   test_crash.py                                                                   a short run for CI
import argparse
import json
import os
import random
import select
import signal
import sys
import threading
import time

import qnbdtest as T

MiB = 1024 * 1024


class Op:
    __slots__ = ("kind", "offset", "data", "length", "sent", "done")

    def __init__(self, kind, offset, length, data, sent):
        self.kind, self.offset, self.length, self.data, self.sent = kind, offset, length, data, sent
        self.done = None


def workload(uri, size, rnd, duration, connections=2, depth=8):
    """Runs writes/zeroes/flushes until `duration` passes; returns the op log (with completion
    times) and the send time of the last FLUSH that completed."""
    handles = []
    for _ in range(connections):
        h = T.nbd.NBD()
        h.connect_uri(uri)
        handles.append(h)
    inflight = {}
    log = []
    clock = 0
    last_flush_sent = None
    end = time.monotonic() + duration
    try:
        while time.monotonic() < end:
            for hi, h in enumerate(handles):
                while sum(1 for k in inflight if k[0] == hi) < depth:
                    clock += 1
                    r = rnd.random()
                    if r < 0.08:
                        op = Op("flush", 0, 0, None, clock)
                        cookie = h.aio_flush()
                    else:
                        length = rnd.choice([512, 4096, 65536, rnd.randrange(1, 200000)])
                        offset = rnd.randrange(0, size - length)
                        if r < 0.85:
                            data = rnd.randbytes(length)
                            op = Op("write", offset, length, data, clock)
                            cookie = h.aio_pwrite(data, offset)
                        else:
                            op = Op("zero", offset, length, None, clock)
                            cookie = h.aio_zero(length, offset)
                    inflight[(hi, cookie)] = op
                    log.append(op)
            fds = [h.aio_get_fd() for h in handles]
            rl = [h.aio_get_fd() for h in handles if h.aio_get_direction() & T.nbd.AIO_DIRECTION_READ]
            wl = [h.aio_get_fd() for h in handles if h.aio_get_direction() & T.nbd.AIO_DIRECTION_WRITE]
            r, w, _ = select.select(rl, wl, [], 0.2)
            for h, fd in zip(handles, fds):
                if fd in r:
                    h.aio_notify_read()
                if fd in w:
                    h.aio_notify_write()
            for key, op in list(inflight.items()):
                if handles[key[0]].aio_command_completed(key[1]):
                    clock += 1
                    op.done = clock
                    del inflight[key]
                    if op.kind == "flush":
                        last_flush_sent = max(last_flush_sent or 0, op.sent)
    except T.nbd.Error:
        pass   # the server is being killed under us: expected
    return handles, log, last_flush_sent


def expected_durable(log, last_flush_sent, size):
    """The bytes a completed FLUSH guarantees: writes acknowledged before the flush was sent, minus
    anything a later or unfinished operation may have changed. Returns (image model, mask)."""
    model = bytearray(size)
    certain = bytearray(size)       # 1 where the model is guaranteed
    if last_flush_sent is None:
        return model, certain
    durable = [op for op in log if op.kind != "flush" and op.done is not None and op.done < last_flush_sent]
    for op in sorted(durable, key=lambda o: o.done):
        model[op.offset:op.offset + op.length] = op.data if op.kind == "write" else bytes(op.length)
        certain[op.offset:op.offset + op.length] = b"\x01" * op.length
    # Overlapping operations that were in flight together may land in either order: open too.
    by_sent = sorted(durable, key=lambda o: o.sent)
    for i, a in enumerate(by_sent):
        for b in by_sent[i + 1:]:
            if b.sent >= a.done:
                break
            lo, hi = max(a.offset, b.offset), min(a.offset + a.length, b.offset + b.length)
            if lo < hi:
                certain[lo:hi] = bytes(hi - lo)
    # Anything sent before the flush but acknowledged after it, or never, or sent after it, is open.
    for op in log:
        if op.kind == "flush" or op in durable:
            continue
        certain[op.offset:op.offset + op.length] = bytes(op.length)
    return model, certain


def first_mismatch(image_bytes, model, certain):
    for i in range(0, len(model), MiB):
        a, b, c = image_bytes[i:i + MiB], model[i:i + MiB], certain[i:i + MiB]
        if a == b or all(x == y or not m for x, y, m in zip(a, b, c)):
            continue
        for j in range(len(c)):
            if c[j] and a[j] != b[j]:
                return i + j
    return None


def bitmap_state(image):
    """{name: (flags, dirty runs or None when in use)}, read by qemu-img info and `qnbd map`."""
    info = json.loads(T.run(["qemu-img", "info", "--output=json", image], timeout=120).stdout)
    out = {}
    for b in info["format-specific"]["data"].get("bitmaps", []):
        runs = None
        if "in-use" not in b["flags"]:
            m = T.run([T.QNBD, "map", "--bitmap", b["name"], "--output", "json", image], timeout=120)
            runs = [(r["start"], r["length"], r["dirty"]) for r in json.loads(m.stdout)]
        out[b["name"]] = (tuple(b["flags"]), runs)
    return out


def add_bitmaps(image):
    T.run(["qemu-img", "bitmap", "--add", image, "live"])
    T.run(["qemu-img", "bitmap", "--add", "-g", "1048576", image, "frozen"])
    T.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0 3M 512", image])
    T.run(["qemu-img", "bitmap", "--disable", image, "frozen"])


def bitmap_problems(image, before, when):
    after = bitmap_state(image)
    problems = []
    if after.get("frozen") != before["frozen"]:
        problems.append("%s: the disabled bitmap changed: %s -> %s" % (when, before["frozen"], after.get("frozen")))
    if after.get("live", (None,))[0] != ("in-use", "auto"):
        problems.append("%s: the enabled bitmap is not in use: %s" % (when, after.get("live")))
    return problems


def cycle(fmt, cluster, size, seed, workdir=None, duration=None, bitmaps=False):
    """One kill cycle; returns (problems, operations sent, operations acknowledged)."""
    rnd = random.Random(seed)
    workdir = workdir or T.new_workdir("crash")
    image = os.path.join(workdir, "disk." + fmt)
    if fmt == "qcow2":
        T.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=%d" % cluster, image, str(size)])
        if bitmaps:
            add_bitmaps(image)
            before = bitmap_state(image)
    else:
        T.make_image(image, size)
    server = T.Server(workdir, image).start()
    problems = []
    duration = duration if duration is not None else rnd.uniform(0.3, 2.0)
    # Kill from a timer so the workload is mid-flight, not between requests.
    threading.Timer(duration, lambda: os.killpg(server.proc.pid, signal.SIGKILL)).start()
    handles, log, last_flush_sent = workload(server.uri(), size, rnd, duration + 1.0)
    server.proc.wait(10)
    server._finish(server.proc.returncode)
    for h in handles:
        try:
            h.close()
        except Exception:
            pass
    if fmt == "qcow2":
        check = T.run(["qemu-img", "check", "-f", "qcow2", image], check=False, timeout=120)
        if check.returncode not in (0, 3):
            problems.append("qemu-img check rc=%d after the kill:\n%s%s" % (check.returncode, check.stdout, check.stderr))
            return problems, len(log), 0
        if bitmaps:
            problems += bitmap_problems(image, before, "after the kill")
        if check.returncode == 3:
            repair = T.run([T.QNBD, "check", "--repair", "leaks", image], check=False, timeout=120)
            again = T.run(["qemu-img", "check", "-f", "qcow2", image], check=False, timeout=120)
            if again.returncode != 0:
                problems.append("leaks remain after repair:\n%s%s" % (repair.stdout, again.stdout))
        raw = os.path.join(workdir, "content.raw")
        T.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", image, raw], timeout=120)
    else:
        raw = image
    with open(raw, "rb") as f:
        content = f.read()
    model, certain = expected_durable(log, last_flush_sent, size)
    bad = first_mismatch(content, model, certain)
    if bad is not None:
        problems.append("byte %d of a write acknowledged before the last completed flush was lost "
                        "(have %#x, want %#x)" % (bad, content[bad], model[bad]))
    # The image reopens and serves.
    again = T.Server(workdir, image).start()
    h = T.nbd.NBD()
    h.connect_uri(again.uri())
    h.pwrite(b"\x5a" * 4096, 0)
    if h.pread(4096, 0) != b"\x5a" * 4096:
        problems.append("reopened image does not serve writes")
    h.shutdown()
    if again.stop() != 0:
        problems.append("reopened server did not stop cleanly")
    if bitmaps:
        problems += bitmap_problems(image, before, "after the reopen")
    acked = sum(1 for op in log if op.done is not None)
    return problems, len(log), acked


def main():
    p = argparse.ArgumentParser(description="SIGKILL crash cycles against qnbd")
    p.add_argument("--cycles", type=int, default=200)
    p.add_argument("--format", choices=["qcow2", "raw"], default="qcow2")
    p.add_argument("--cluster", type=int, default=65536)
    p.add_argument("--size", type=int, default=64 * MiB)
    p.add_argument("--bitmaps", action="store_true", help="qcow2 with an enabled and a disabled persistent bitmap")
    a = p.parse_args()
    failed = 0
    for seed in range(1, a.cycles + 1):
        problems, ops, acked = cycle(a.format, a.cluster, a.size, seed, bitmaps=a.bitmaps)
        status = "PASS" if not problems else "FAIL"
        print("%s cycle %d (%d ops, %d acknowledged)" % (status, seed, ops, acked), flush=True)
        for pr in problems:
            print("    " + pr.replace("\n", "\n    "))
        failed += bool(problems)
    print("%d passed, %d failed" % (a.cycles - failed, failed))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
