# qnbdtest.processes: Subprocesses with timeouts whose failures carry their output.
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

# Subprocesses
# ---------------------------------------------------------------------------------------------
def run(cmd, timeout=120, check=True, input=None, env=None, cwd=None):
    """Run a command, capture text output; on failure raise AssertionError with the output."""
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL if input is None else None, input=input,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout,
                           text=True, env=env, cwd=cwd or tmp_root())
    except subprocess.TimeoutExpired as e:
        raise AssertionError("timed out after %ss: %s\n%s%s" % (timeout, " ".join(cmd),
                             as_text(e.stdout), as_text(e.stderr)))
    if check and p.returncode != 0:
        raise AssertionError("exit %d: %s\nstdout:\n%s\nstderr:\n%s" % (
            p.returncode, " ".join(cmd), p.stdout[-4000:], p.stderr[-4000:]))
    return p


def as_text(b):
    """Captured output as str, whether the subprocess gave bytes, str or nothing."""
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def unix_socket_accepts(path):
    """True once a server listens on the unix socket at `path`: the file appears at bind(), before
    listen(), so its existence alone races with a client's connect (ECONNREFUSED)."""
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as s:
        try:
            s.connect(path)
            return True
        except OSError:
            return False


def uri_quote_socket(path):
    return path.replace("%", "%25").replace("&", "%26").replace("?", "%3F")
