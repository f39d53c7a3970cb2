# qnbdtest.launcher: Starting and stopping `qnbd serve` (or a stand-in) with a watchdog, ports and logs.
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

# Server control
# ---------------------------------------------------------------------------------------------
_live_servers = set()


def kill_leftover_servers():
    for s in list(_live_servers):
        with contextlib.suppress(Exception):
            s.proc.kill()
            s.proc.wait(5)


atexit.register(kill_leftover_servers)


class ServerStartError(AssertionError):
    pass


def loops_arguments(extra):
    """QNBD_LOOPS=N runs every launched server with --loops N (unless the test sets --loops itself)."""
    loops = os.environ.get("QNBD_LOOPS")
    if not loops or any(str(a).startswith("--loops") for a in extra):
        return []
    return ["--loops", loops]


class Server:
    """One `qnbd serve IMAGE ...` process on a unix socket (default) or TCP 127.0.0.1:0."""

    def __init__(self, workdir, image, tcp=False, export_name=None, description=None,
                 read_only=False, extra=(), socket_path=None, pid_file=None, port=0,
                 bind="127.0.0.1"):
        self.workdir = workdir
        self.image = image
        self.tcp = tcp
        self.export_name = export_name if export_name is not None else ""
        self.description = description
        self.read_only = read_only
        self.socket_path = socket_path or (None if tcp else os.path.join(workdir, "nbd.sock"))
        self.pid_file = pid_file or os.path.join(workdir, "qnbd.pid")
        self.log_path = os.path.join(workdir, "server-%d.log" % id(self))
        self.requested_port = port
        self.bind = bind
        self.port = None
        self.extra = list(extra)
        self.proc = None
        self.returncode = None
        self._watchdog = None
        self.watchdog_fired = False

    def argv(self):
        a = [QNBD, "serve", self.image]
        if self.tcp:
            a += ["--bind", self.bind, "--port", str(self.requested_port)]
        else:
            a += ["--socket", self.socket_path]
        a += ["--pid-file", self.pid_file]
        if self.export_name:
            a += ["-x", self.export_name]
        if self.description is not None:
            a += ["-D", self.description]
        if self.read_only:
            a += ["-r"]
        return a + aio_args() + loops_arguments(self.extra) + self.extra

    def start(self, wait=True, timeout=20):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pid_file)   # a stale one from an earlier server in this directory
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     cwd=self.workdir)
        _live_servers.add(self)
        self._watchdog = threading.Timer(TEST_TIMEOUT, self._fire_watchdog)
        self._watchdog.daemon = True
        self._watchdog.start()
        if wait:
            self.wait_ready(timeout)
        return self

    def _fire_watchdog(self):
        self.watchdog_fired = True
        with contextlib.suppress(Exception):
            self.proc.kill()

    def wait_ready(self, timeout=20):
        """Readiness = the pid file exists and holds a pid (cli-spec: written once bound)."""
        deadline = time.monotonic() + timeout
        last, since = None, 0.0
        while True:
            rc = self.proc.poll()
            if rc is not None:
                self._finish(rc)
                raise ServerStartError("server exited with %d before it was ready: %s\n%s" % (
                    rc, " ".join(self.argv()), self.log()))
            txt = None
            with contextlib.suppress(OSError):
                with open(self.pid_file) as f:
                    txt = f.read()
            now = time.monotonic()
            if txt != last:
                last, since = txt, now
            if txt and txt.strip().isdigit() and (txt.endswith("\n") or now - since > 0.05):
                break
            if now > deadline:
                self.kill()
                raise ServerStartError("server not ready after %ss (no pid file %s)\n%s" % (
                    timeout, self.pid_file, self.log()))
            time.sleep(0.01)
        if self.tcp:
            self.port = self._find_port(deadline)
        elif not os.path.exists(self.socket_path):
            raise ServerStartError("pid file written but socket %s missing\n%s" % (
                self.socket_path, self.log()))

    def _find_port(self, deadline):
        while True:
            port = listening_tcp_port(self.proc.pid)
            if port is None:
                m = None
                for line in self.log().splitlines():
                    if "listening on" in line:
                        nums = re.findall(r"[:\s](\d{2,5})\b", line.split("listening on", 1)[1])
                        if nums:
                            m = int(nums[-1])
                if m:
                    port = m
            if port:
                return port
            if time.monotonic() > deadline:
                raise ServerStartError("cannot find the TCP port of the server\n" + self.log())
            time.sleep(0.02)

    # -- addresses
    def uri(self, name=None):
        name = self.export_name if name is None else name
        if self.tcp:
            return "nbd://127.0.0.1:%d/%s" % (self.port, name)
        return "nbd+unix:///%s?socket=%s" % (name, uri_quote_socket(self.socket_path))

    def address(self):
        return ("127.0.0.1", self.port) if self.tcp else self.socket_path

    def loop_count(self):
        """The event loops this server runs: its --loops, else QNBD_LOOPS, else one per online CPU."""
        args = self.argv()
        for i, a in enumerate(args):
            if a == "--loops" and i + 1 < len(args):
                return int(args[i + 1])
            if str(a).startswith("--loops="):
                return int(a.split("=", 1)[1])
        return min(os.cpu_count() or 1, 64)

    def warm_every_loop(self):
        """Holds one connection per loop open at once (a new connection goes to the least-loaded loop),
        reads from each, then closes them. A loop's first connection makes libuv open that loop's spare
        /dev/null (its EMFILE reserve) for good, so an fd baseline taken after this does not count it
        as a leak later."""
        handles = []
        try:
            for _ in range(self.loop_count()):
                h = nbd.NBD()
                h.connect_uri(self.uri())
                h.pread(512, 0)
                handles.append(h)
        finally:
            for h in handles:
                with contextlib.suppress(Exception):
                    h.shutdown()
            handles.clear()   # the last reference closes each handle's socket

    # -- lifecycle
    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log(self):
        with contextlib.suppress(OSError):
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        return ""

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Send `sig`, wait up to `timeout` s; returns the exit code (None if it had to be killed)."""
        if self.proc is None:
            return None
        if self.returncode is not None or self.proc.poll() is not None:
            return self._finish(self.proc.wait())
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self._finish(None)
            return None
        return self._finish(rc)

    def kill(self):
        with contextlib.suppress(Exception):
            self.proc.kill()
            self.proc.wait(5)
        self._finish(self.proc.returncode)

    def _finish(self, rc):
        if self._watchdog:
            self._watchdog.cancel()
        _live_servers.discard(self)
        if self.returncode is None:
            self.returncode = rc
        with contextlib.suppress(Exception):
            self._log.close()
        return self.returncode


class ConfigServer(Server):
    """`qnbd serve --config FILE` on a unix socket (default) or TCP 127.0.0.1:0 given on the command
    line, so the file itself needs no test-specific listen address."""

    def __init__(self, workdir, config, tcp=False, extra=(), **kw):
        super().__init__(workdir, None, tcp=tcp, extra=extra, **kw)
        self.config = config

    def argv(self):
        a = [QNBD, "serve", "--config", self.config, "--pid-file", self.pid_file]
        if self.tcp:
            a += ["--bind", self.bind, "--port", str(self.requested_port)]
        elif self.socket_path:
            a += ["--socket", self.socket_path]
        return a + aio_args() + loops_arguments(self.extra) + self.extra


def aio_args():
    """QNBD_AIO=threads|io_uring forces `--aio` on every server (scripts/test's threads pass)."""
    mode = os.environ.get("QNBD_AIO")
    return ["--aio", mode] if mode else []


def write_config(path, text):
    with open(path, "w") as f:
        f.write(text)
    return path


def listening_tcp_port(pid):
    """The TCP port a process listens on, from /proc (independent of the log format)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir("/proc/%d/fd" % pid):
            with contextlib.suppress(OSError):
                link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            with open(table) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    if parts[3] == "0A" and parts[9] in inodes:
                        return int(parts[1].rsplit(":", 1)[1], 16)
    return None


def server_fd_count(pid):
    """How many fds `pid` holds open, or None once it is gone; for checks that fds return to a
    baseline. Pipes to an llvm-symbolizer child are left out: a sanitizer runtime (ThreadSanitizer
    checking a suppression, say) starts one the first time it symbolizes and keeps two pipes to it
    for the life of the process, which are the runtime's, not qnbd's. Only pipes whose inode the
    symbolizer itself holds are left out, so a pipe qnbd leaks still counts."""
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        return None
    theirs = symbolizer_pipes(pid)
    if not theirs:
        return len(fds)
    count = 0
    for fd in fds:
        try:
            link = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue  # closed since the listing
        if link not in theirs:
            count += 1
    return count


def symbolizer_pipes(pid):
    """The "pipe:[inode]" links open in llvm-symbolizer children of `pid`. A child shows up in the
    children file of the thread that forked it, so every thread's file is read."""
    children = set()
    with contextlib.suppress(OSError):
        for task in os.listdir("/proc/%d/task" % pid):
            with contextlib.suppress(OSError):
                with open("/proc/%d/task/%s/children" % (pid, task)) as f:
                    children.update(int(c) for c in f.read().split())
    pipes = set()
    for child in children:
        with contextlib.suppress(OSError):
            with open("/proc/%d/comm" % child) as f:
                comm = f.read().strip()
            # comm is cut at 15 bytes, exactly "llvm-symbolizer"; a versioned binary
            # (llvm-symbolizer-16) keeps that prefix in both comm and exe.
            exe = ""
            with contextlib.suppress(OSError):
                exe = os.path.basename(os.readlink("/proc/%d/exe" % child))
            if not (comm.startswith("llvm-symbolizer") or exe.startswith("llvm-symbolizer")):
                continue
            for fd in os.listdir("/proc/%d/fd" % child):
                with contextlib.suppress(OSError):
                    link = os.readlink("/proc/%d/fd/%s" % (child, fd))
                    if link.startswith("pipe:["):
                        pipes.add(link)
    return pipes


def free_tcp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
