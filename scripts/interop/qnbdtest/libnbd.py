# qnbdtest.libnbd: python3-libnbd helpers: connect, block status maps, aio waits.
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
from .images import *  # noqa: F401,F403
from .launcher import *  # noqa: F401,F403
from .client import *  # noqa: F401,F403

# ---------------------------------------------------------------------------------------------
# libnbd helpers
# ---------------------------------------------------------------------------------------------
def nbd_connect(uri, strict=True, name="qnbdtest"):
    if nbd is None:
        raise unittest.SkipTest("python3-libnbd not importable (use /usr/bin/python3)")
    h = nbd.NBD()
    h.set_handle_name(name)
    if not strict:
        h.set_strict_mode(0)
    h.add_meta_context("base:allocation")
    h.connect_uri(uri)
    return h


def nbd_close(h):
    with contextlib.suppress(Exception):
        if h.aio_is_ready() or h.aio_is_processing():
            h.shutdown()
    with contextlib.suppress(Exception):
        h.close()


def block_status_map(h, offset=0, length=None, context="base:allocation", flags=0):
    """Walk BLOCK_STATUS over [offset, offset+length); returns merged [(offset, length, flags)].
    The server may answer with a prefix; the walk continues from where the answer ended."""
    size = h.get_size()
    end = size if length is None else offset + length
    out = []
    pos = offset
    guard = 0
    while pos < end:
        got = []

        def cb(metacontext, off, entries, err):
            if metacontext == context:
                got.append((off, list(entries)))
            return 0

        h.block_status(min(end - pos, 1 << 30), pos, cb, flags)
        if len(got) != 1:
            raise AssertionError("expected one %s status chunk, got %d" % (context, len(got)))
        off, entries = got[0]
        if off != pos or not entries or len(entries) % 2:
            raise AssertionError("bad extents %r at %d" % (entries[:8], off))
        for i in range(0, len(entries), 2):
            l, f = entries[i], entries[i + 1]
            if l == 0:
                raise AssertionError("zero-length extent at %d" % pos)
            l = min(l, end - pos)
            if l <= 0:
                break
            out.append((pos, l, f))
            pos += l
        guard += 1
        if guard > 100000:
            raise AssertionError("block status walk does not progress")
    return merge_extents(out)


def wait_aio(h, cookies, timeout=60):
    """Poll a libnbd handle until every cookie has completed; returns when done, raises nbd.Error
    on the first failed command and AssertionError on timeout."""
    deadline = time.monotonic() + timeout
    pending = list(cookies)
    while pending:
        still = []
        for c in pending:
            if not h.aio_command_completed(c):
                still.append(c)
        pending = still
        if not pending:
            break
        if time.monotonic() > deadline:
            raise AssertionError("%d aio commands still pending after %ss" % (len(pending), timeout))
        h.poll(200)
