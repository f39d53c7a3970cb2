# qnbdtest.bitmaps: persistent dirty bitmaps in the tests: the bitmap directory found in the file (to
# damage it on purpose), raw file bytes, and the dirty map qemu-nbd -B NAME serves, which is the
# referee for qnbd's. Part of the qnbdtest package (see __init__.py); run with /usr/bin/python3.

import contextlib
import json
import os
import struct
import subprocess
import time

from .processes import run, unix_socket_accepts, uri_quote_socket
from .images import merged_runs

# docs/interop/qcow2.txt, "Header extensions": the bitmaps extension's type.
BITMAPS_EXTENSION = 0x23852875


def bitmap_directory(image):
    """(file offset of the bitmap directory, i.e. of its first entry; the first 64 KiB of the file).
    AssertionError when the header has no bitmaps extension."""
    with open(image, "rb") as f:
        head = f.read(65536)
    (pos,) = struct.unpack_from(">I", head, 100)   # header_length
    while True:
        kind, length = struct.unpack_from(">II", head, pos)
        if kind == 0:
            raise AssertionError("%s: no bitmaps extension" % image)
        if kind == BITMAPS_EXTENSION:
            return struct.unpack_from(">Q", head, pos + 8 + 16)[0], head
        pos += 8 + (length + 7) // 8 * 8


def bitmap_entry(image, index=0):
    """File offset of directory entry `index` (entries are 24 bytes, extra data and name, padded to 8)."""
    entry, _ = bitmap_directory(image)
    with open(image, "rb") as f:
        for _ in range(index):
            f.seek(entry)
            e = f.read(24)
            (name_len,) = struct.unpack_from(">H", e, 18)
            (extra,) = struct.unpack_from(">I", e, 20)
            entry += (24 + extra + name_len + 7) // 8 * 8
    return entry


def file_contents(path):
    with open(path, "rb") as f:
        return f.read()


def poke(path, offset, fmt, value):
    """Overwrites the file at `offset` with `value` packed as struct format `fmt`."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


@contextlib.contextmanager
def qemu_nbd_serving(workdir, image, bitmaps, extra=()):
    """qemu-nbd -r serving `image` with `bitmaps` (-B each) on a unix socket in `workdir`; yields the
    URI once the server accepts (its socket file exists at bind, before listen). AssertionError with
    qemu-nbd's log when it does not start."""
    sock = os.path.join(workdir, "qemu-nbd.sock")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(sock)
    argv = ["qemu-nbd", "-r", "-f", "qcow2", "-k", sock] + list(extra)
    for b in bitmaps:
        argv += ["-B", b]
    log = os.path.join(workdir, "qemu-nbd.log")
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv + [image], stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.time() + 20
        while not unix_socket_accepts(sock):
            if proc.poll() is not None or time.time() > deadline:
                with open(log, errors="replace") as f:
                    raise AssertionError("qemu-nbd did not start: %s" % f.read())
            time.sleep(0.05)
        yield "nbd+unix:///?socket=" + uri_quote_socket(sock)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def nbdinfo_map(uri, context):
    """`nbdinfo --map=CONTEXT` as merged (offset, length, dirty-or-hole bit set) runs."""
    p = run(["nbdinfo", "--json", "--map=" + context, uri], timeout=60)
    return merged_runs([(e["offset"], e["length"], e["type"] & 1 == 1) for e in json.loads(p.stdout)])


def qemu_nbd_dirty_map(workdir, image, name):
    """Bitmap `name` as qemu-nbd -B NAME serves it to nbdinfo: merged (offset, length, dirty) runs."""
    with qemu_nbd_serving(workdir, image, [name]) as uri:
        return nbdinfo_map(uri, "qemu:dirty-bitmap:" + name)
