# qnbdtest.scratch: Scratch directories: one root per run, one folder per test.
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

# Scratch directories
# ---------------------------------------------------------------------------------------------
_tmp_root = None
_tmp_lock = threading.Lock()
_tmp_counter = 0


def tmp_root():
    global _tmp_root
    with _tmp_lock:
        if _tmp_root is None:
            base = os.environ.get("QNBD_TEST_TMPDIR")
            if base:
                os.makedirs(base, exist_ok=True)
                _tmp_root = tempfile.mkdtemp(prefix="py.", dir=base)
            else:
                _tmp_root = tempfile.mkdtemp(prefix="qnbd-interop.")
            if not KEEP_TMP:
                atexit.register(shutil.rmtree, _tmp_root, True)
        return _tmp_root


def new_workdir(tag="t"):
    """A fresh, short directory (unix socket paths must stay under 108 bytes)."""
    global _tmp_counter
    root = tmp_root()
    with _tmp_lock:
        _tmp_counter += 1
        n = _tmp_counter
    tag = re.sub(r"[^A-Za-z0-9]+", "_", tag.split(".")[-1])[:24]
    d = os.path.join(root, "%03d_%s" % (n, tag))
    os.makedirs(d)
    return d
