# qnbdtest.case: The test-case base class every interop test derives from, and the runner entry point.
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
from .libnbd import *  # noqa: F401,F403

# ---------------------------------------------------------------------------------------------
# Test-case base class
# ---------------------------------------------------------------------------------------------
class QnbdTestCase(unittest.TestCase):
    """Fresh work dir per test; servers started through start_server() are stopped at the end with
    SIGTERM and must exit 0 within a few seconds (graceful stop is part of every test)."""

    maxDiff = 4000

    def setUp(self):
        self.dir = new_workdir(self.id())
        if not KEEP_TMP:
            self.addCleanup(shutil.rmtree, self.dir, True)

    def image(self, size=DEFAULT_SIZE, regions=(), name="disk.img"):
        return make_image(os.path.join(self.dir, name), size, regions)

    def start_server(self, image=None, check_stop=True, **kw):
        if image is None:
            image = self.image()
        srv = Server(self.dir, image, **kw)
        self.addCleanup(self._stop_server, srv, check_stop)
        srv.start()
        return srv

    def _stop_server(self, srv, check):
        if srv.proc is None:
            return
        already = srv.returncode is not None
        rc = srv.stop(signal.SIGTERM, timeout=10)
        if check and not already:
            if srv.watchdog_fired:
                raise AssertionError("server watchdog fired (test exceeded %ss)" % TEST_TIMEOUT)
            if rc is None:
                raise AssertionError("server did not exit within 10 s of SIGTERM\n" +
                                     tail(srv.log()))
            if rc != 0:
                raise AssertionError("server exited %s after SIGTERM (expected 0)\n%s" % (
                    rc, tail(srv.log())))

    def start_config_server(self, config, check_stop=True, **kw):
        srv = ConfigServer(self.dir, config, **kw)
        self.addCleanup(self._stop_server, srv, check_stop)
        srv.start()
        return srv

    def connect(self, srv, strict=True, name=None, uri=None):
        h = nbd_connect(uri or srv.uri(name), strict=strict, name=self.id().split(".")[-1][:30])
        self.addCleanup(nbd_close, h)
        return h

    def raw(self, srv, timeout=10):
        c = RawClient(srv.address(), timeout=timeout)
        self.addCleanup(c.close)
        return c

    def assertNbdError(self, errnum, fn, *args, **kw):
        try:
            fn(*args, **kw)
        except nbd.Error as e:
            if e.errnum != errnum:
                raise AssertionError("expected %s, got errnum %s (%s)" % (
                    errno.errorcode.get(errnum, errnum), errno.errorcode.get(e.errnum, e.errnum),
                    e.string))
            return e
        raise AssertionError("expected %s, but the call succeeded" % errno.errorcode.get(errnum))

    def assertBytesEqual(self, got, want, what="data"):
        if bytes(got) == bytes(want):
            return
        if len(got) != len(want):
            raise AssertionError("%s: length %d != %d" % (what, len(got), len(want)))
        for i in range(len(got)):
            if got[i] != want[i]:
                raise AssertionError("%s differs first at byte %d: got %r want %r" % (
                    what, i, bytes(got[i:i + 8]), bytes(want[i:i + 8])))

    def assertZero(self, data, what="data"):
        if data.count(0) != len(data):
            i = next(i for i, b in enumerate(data) if b)
            raise AssertionError("%s not zero at byte %d (%r)" % (what, i, bytes(data[i:i + 8])))


def tail(text, n=30):
    return "\n".join(text.splitlines()[-n:])


def main():
    unittest.main(verbosity=2)
