# qnbdtest.images: Test images: patterned raw files, qemu-img map and allocation views.
# Part of the qnbdtest package (see __init__.py); run with /usr/bin/python3.

import atexit
import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

try:
    import nbd  # python3-libnbd, only for /usr/bin/python3 on Debian
except ImportError:  # pragma: no cover - reported by the tests that need it
    nbd = None

from .settings import *  # noqa: F401,F403
from .wire import *  # noqa: F401,F403
from .scratch import *  # noqa: F401,F403
from .processes import *  # noqa: F401,F403

# Images
# ---------------------------------------------------------------------------------------------
def pattern_bytes(seed, length):
    """Deterministic, recognisable, non-repeating data for region checks."""
    rnd = random.Random(seed)
    return rnd.randbytes(length)


def make_image(path, size=DEFAULT_SIZE, regions=()):
    """Sparse file of `size` bytes; `regions` is a list of (offset, bytes) written into it."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in regions:
            f.seek(off)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path


def read_file(path, offset, length):
    with open(path, "rb") as f:
        return os.pread(f.fileno(), length, offset)


def allocated_bytes(path):
    return os.stat(path).st_blocks * 512


def file_map(path):
    """Allocation of a raw file as [(offset, length, flags)] with NBD base:allocation flags
    (hole = 3, data = 0), from `qemu-img map --output=json -f raw` (qemu is the referee)."""
    out = run(["qemu-img", "map", "--output=json", "-f", "raw", path], timeout=60).stdout
    return merge_extents([(e["start"], e["length"], qemu_map_flags(e)) for e in json.loads(out)])


def qemu_map_flags(e):
    flags = 0
    if not e.get("data", False):
        flags |= STATE_HOLE
    if e.get("zero", False):
        flags |= STATE_ZERO
    return flags


def merge_extents(extents):
    """Merge adjacent extents with equal flags; input [(offset, length, flags)] in order."""
    out = []
    for off, length, flags in extents:
        if length == 0:
            continue
        if out and out[-1][2] == flags and out[-1][0] + out[-1][1] == off:
            o, l, f = out[-1]
            out[-1] = (o, l + length, f)
        else:
            out.append((off, length, flags))
    return out


def flags_at(extents, offset):
    for off, length, flags in extents:
        if off <= offset < off + length:
            return flags, off + length
    raise KeyError(offset)


def merged_runs(runs):
    """(start, length, dirty) runs with neighbours of one kind joined."""
    out = []
    for start, length, dirty in runs:
        if out and out[-1][2] == dirty and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, dirty)
        else:
            out.append((start, length, dirty))
    return out
