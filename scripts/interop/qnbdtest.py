# Shared helpers for the qnbd interop suite (stdlib + python3-libnbd; run with /usr/bin/python3).
#
#   QNBD=path                server binary speaking the qnbd CLI (default: <repo>/.build/release/qnbd);
#                            scripts/interop/standins/qnbd-qemu-nbd and qnbd-nbdkit translate that CLI
#                            to qemu-nbd / nbdkit so the suite can be checked against known servers.
#   QNBD_TEST_TMPDIR=dir     put scratch files there (default: a fresh mktemp dir, removed at exit)
#   QNBD_KEEP_TMP=1          keep the scratch files (and server logs) for debugging
#   QNBD_TEST_TIMEOUT=secs   per-server watchdog: SIGKILL a server still running after this (default 180)
#
# Everything here is bounded in time: sockets have timeouts, subprocesses have timeouts, and every
# server has a watchdog so that a hung server turns a blocked libnbd call into an error, not a hang.

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

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
QNBD = os.environ.get("QNBD") or os.path.join(REPO, ".build", "release", "qnbd")
if os.sep in QNBD:
    QNBD = os.path.abspath(QNBD)     # servers run with their scratch dir as cwd
TEST_TIMEOUT = float(os.environ.get("QNBD_TEST_TIMEOUT", "180"))
KEEP_TMP = os.environ.get("QNBD_KEEP_TMP") == "1"

KiB = 1024
MiB = 1024 * 1024
GiB = 1024 * MiB
DEFAULT_SIZE = 64 * MiB

# ---------------------------------------------------------------------------------------------
# Protocol constants (NetworkBlockDevice/nbd doc/proto.md, extension-ext-header branch)
# ---------------------------------------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
EXT_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXT_REPLY_MAGIC = 0x6E8A278C

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
FLAG_C_FIXED_NEWSTYLE = 1
FLAG_C_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR | 1
REP_ERR_POLICY = REP_ERR | 2
REP_ERR_INVALID = REP_ERR | 3
REP_ERR_PLATFORM = REP_ERR | 4
REP_ERR_TLS_REQD = REP_ERR | 5
REP_ERR_UNKNOWN = REP_ERR | 6
REP_ERR_SHUTDOWN = REP_ERR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_ERR | 8
REP_ERR_TOO_BIG = REP_ERR | 9
REP_NAMES = {
    REP_ACK: "ACK", REP_SERVER: "SERVER", REP_INFO: "INFO", REP_META_CONTEXT: "META_CONTEXT",
    REP_ERR_UNSUP: "ERR_UNSUP", REP_ERR_POLICY: "ERR_POLICY", REP_ERR_INVALID: "ERR_INVALID",
    REP_ERR_PLATFORM: "ERR_PLATFORM", REP_ERR_TLS_REQD: "ERR_TLS_REQD", REP_ERR_UNKNOWN: "ERR_UNKNOWN",
    REP_ERR_SHUTDOWN: "ERR_SHUTDOWN", REP_ERR_BLOCK_SIZE_REQD: "ERR_BLOCK_SIZE_REQD",
    REP_ERR_TOO_BIG: "ERR_TOO_BIG",
}

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11

# What cli-spec.md promises for a raw export.
RW_FLAGS_SR = (TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES
               | TF_SEND_DF | TF_CAN_MULTI_CONN | TF_SEND_CACHE | TF_SEND_FAST_ZERO)   # 0x0ded
RW_FLAGS_NOSR = RW_FLAGS_SR & ~TF_SEND_DF   # proto.md: DF MUST be clear without structured replies
RO_FLAGS_SR = (TF_HAS_FLAGS | TF_READ_ONLY | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_DF
               | TF_CAN_MULTI_CONN | TF_SEND_CACHE)                                   # 0x058f
RO_FLAGS_NOSR = RO_FLAGS_SR & ~TF_SEND_DF

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR = 32769
REPLY_TYPE_ERROR_OFFSET = 32770

NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

STATE_HOLE = 1
STATE_ZERO = 2

MAX_PAYLOAD = 32 * MiB
MAX_OPTION_PAYLOAD = 64 * KiB

# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
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
                             _s(e.stdout), _s(e.stderr)))
    if check and p.returncode != 0:
        raise AssertionError("exit %d: %s\nstdout:\n%s\nstderr:\n%s" % (
            p.returncode, " ".join(cmd), p.stdout[-4000:], p.stderr[-4000:]))
    return p


def _s(b):
    if b is None:
        return ""
    return b.decode(errors="replace") if isinstance(b, bytes) else b


def uri_quote_socket(path):
    return path.replace("%", "%25").replace("&", "%26").replace("?", "%3F")


# ---------------------------------------------------------------------------------------------
# Server control
# ---------------------------------------------------------------------------------------------
_live_servers = set()


def _kill_leftovers():
    for s in list(_live_servers):
        with contextlib.suppress(Exception):
            s.proc.kill()
            s.proc.wait(5)


atexit.register(_kill_leftovers)


class ServerStartError(AssertionError):
    pass


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
        return a + self.extra

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
        return a + self.extra


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


def free_tcp_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Raw NBD client (hand-rolled; no libnbd) for handshake and malformed-input tests
# ---------------------------------------------------------------------------------------------
class ProtocolError(AssertionError):
    pass


class Reply:
    def __init__(self, cookie, error=0, data=b"", chunks=None, offset=None):
        self.cookie = cookie
        self.error = error
        self.data = data
        self.chunks = chunks or []   # [(flags, type, payload)]
        self.offset = offset

    def __repr__(self):
        return "Reply(cookie=%r, error=%r, len=%d, chunks=%r)" % (
            self.cookie, self.error, len(self.data), [(f, t, len(p)) for f, t, p in self.chunks])


class RawClient:
    def __init__(self, address, timeout=10):
        if isinstance(address, tuple):
            self.sock = socket.create_connection(address, timeout=timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(address)
        self.sock.settimeout(timeout)
        self.structured = False
        self.extended = False
        self.cookie = 0x1000
        self.size = None
        self.tflags = None
        self.meta = {}

    def close(self):
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    # -- bytes
    def send(self, data):
        self.sock.sendall(data)

    def recv_exact(self, n):
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise ProtocolError("connection closed after %d of %d bytes" % (len(buf), n))
            buf += chunk
        return bytes(buf)

    def wait_closed(self, timeout=5):
        """True if the server closes the connection within `timeout` s (bytes before EOF are
        discarded); False if it is still open."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.sock.settimeout(left)
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
        except socket.timeout:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(10)

    def read_until_close(self, timeout=5):
        """-> (closed, bytes received before EOF or timeout)."""
        deadline = time.monotonic() + timeout
        data = bytearray()
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False, bytes(data)
                self.sock.settimeout(left)
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True, bytes(data)
                data += chunk
        except socket.timeout:
            return False, bytes(data)
        except (ConnectionResetError, BrokenPipeError):
            return True, bytes(data)
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(10)

    # -- handshake
    def read_greeting(self):
        g = self.recv_exact(18)
        magic, opt, flags = struct.unpack(">QQH", g)
        if magic != NBDMAGIC or opt != IHAVEOPT:
            raise ProtocolError("bad greeting %r" % g)
        self.handshake_flags = flags
        return flags

    def send_client_flags(self, flags=FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        self.client_flags = flags
        self.send(struct.pack(">I", flags))

    def start(self, flags=FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
        self.read_greeting()
        self.send_client_flags(flags)
        return self

    def send_option(self, opt, data=b"", length=None):
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data) if length is None else length) + data)

    def read_option_reply(self):
        magic, opt, rtype, length = struct.unpack(">QIII", self.recv_exact(20))
        if magic != OPT_REPLY_MAGIC:
            raise ProtocolError("bad option reply magic %#x" % magic)
        if length > 16 * MiB:
            raise ProtocolError("absurd option reply length %d" % length)
        return opt, rtype, self.recv_exact(length)

    def option(self, opt, data=b"", length=None):
        """Send an option; collect replies until ACK or an error. Returns [(type, payload)] and
        checks every reply echoes the option number."""
        self.send_option(opt, data, length)
        replies = []
        while True:
            ropt, rtype, payload = self.read_option_reply()
            if ropt != opt:
                raise ProtocolError("reply for option %d while waiting for %d" % (ropt, opt))
            replies.append((rtype, payload))
            if rtype == REP_ACK or rtype & REP_ERR:
                return replies
            if len(replies) > 10000:
                raise ProtocolError("too many option replies")

    def option_final(self, opt, data=b""):
        return self.option(opt, data)[-1][0]

    def structured_reply(self):
        r = self.option(OPT_STRUCTURED_REPLY)
        if r[-1][0] == REP_ACK:
            self.structured = True
        return r[-1][0]

    def extended_headers(self):
        r = self.option(OPT_EXTENDED_HEADERS)
        if r[-1][0] == REP_ACK:
            self.extended = True
            self.structured = True
        return r[-1][0]

    def set_meta(self, queries, name=""):
        r = self.option(OPT_SET_META_CONTEXT, meta_payload(name, queries))
        if r[-1][0] != REP_ACK:
            raise ProtocolError("SET_META_CONTEXT failed: %s" % rep_name(r[-1][0]))
        for rtype, payload in r[:-1]:
            if rtype == REP_META_CONTEXT:
                cid = struct.unpack(">I", payload[:4])[0]
                self.meta[payload[4:].decode()] = cid
        return self.meta

    def go(self, name="", infos=(INFO_BLOCK_SIZE,), opt=OPT_GO):
        r = self.option(opt, info_payload(name, infos))
        if r[-1][0] != REP_ACK:
            raise ProtocolError("%s failed: %s" % ("GO" if opt == OPT_GO else "INFO",
                                                    rep_name(r[-1][0])))
        infos = parse_infos(r[:-1])
        if opt == OPT_GO:
            self.size, self.tflags = infos[INFO_EXPORT]
        return infos

    def export_name(self, name=""):
        self.send_option(OPT_EXPORT_NAME, name.encode())
        zeroes = not (self.client_flags & FLAG_C_NO_ZEROES)
        data = self.recv_exact(10 + (124 if zeroes else 0))
        self.size, self.tflags = struct.unpack(">QH", data[:10])
        return data

    def negotiate(self, name="", structured=True, extended=False, meta=()):
        self.start()
        if extended:
            if self.extended_headers() != REP_ACK:
                raise ProtocolError("EXTENDED_HEADERS not accepted")
        elif structured:
            if self.structured_reply() != REP_ACK:
                raise ProtocolError("STRUCTURED_REPLY not accepted")
        if meta:
            self.set_meta(meta, name)
        self.go(name)
        return self

    # -- transmission
    def next_cookie(self):
        self.cookie += 1
        return self.cookie

    def send_request(self, cmd, offset=0, length=0, flags=0, payload=b"", cookie=None,
                     magic=None):
        cookie = self.next_cookie() if cookie is None else cookie
        if self.extended:
            hdr = struct.pack(">IHHQQQ", EXT_REQUEST_MAGIC if magic is None else magic, flags, cmd,
                              cookie, offset, length)
        else:
            hdr = struct.pack(">IHHQQI", REQUEST_MAGIC if magic is None else magic, flags, cmd,
                              cookie, offset, length)
        self.send(hdr + payload)
        return cookie

    def read_reply(self, read_length=0, cookie=None):
        """Read one complete reply (simple, or all structured/extended chunks up to DONE).
        For a READ, `read_length` tells how much data a simple reply carries; structured
        OFFSET_DATA/HOLE chunks are assembled into .data (relative to .offset of the first)."""
        first = self.recv_exact(4)
        magic = struct.unpack(">I", first)[0]
        if magic == SIMPLE_REPLY_MAGIC:
            if self.extended:
                raise ProtocolError("simple reply after extended headers were negotiated")
            err, ck = struct.unpack(">IQ", self.recv_exact(12))
            data = self.recv_exact(read_length) if (err == 0 and read_length) else b""
            rep = Reply(ck, err, data)
            rep.kind = "simple"
        elif magic in (STRUCTURED_REPLY_MAGIC, EXT_REPLY_MAGIC):
            if magic == STRUCTURED_REPLY_MAGIC and self.extended:
                raise ProtocolError("compact structured reply after extended headers")
            if magic == EXT_REPLY_MAGIC and not self.extended:
                raise ProtocolError("extended reply without extended headers")
            if magic == STRUCTURED_REPLY_MAGIC and not self.structured:
                raise ProtocolError("structured reply without structured replies")
            rep = Reply(None)
            rep.kind = "extended" if magic == EXT_REPLY_MAGIC else "structured"
            rep.header_offsets = []
            while True:
                if magic == EXT_REPLY_MAGIC:
                    flags, rtype, ck, hoff, length = struct.unpack(">HHQQQ", self.recv_exact(28))
                    rep.header_offsets.append(hoff)
                else:
                    flags, rtype, ck, length = struct.unpack(">HHQI", self.recv_exact(16))
                if length > 64 * MiB:
                    raise ProtocolError("absurd chunk length %d" % length)
                payload = self.recv_exact(length)
                if rep.cookie is None:
                    rep.cookie = ck
                elif rep.cookie != ck:
                    raise ProtocolError("chunks of different cookies interleaved")
                rep.chunks.append((flags, rtype, payload))
                if rtype in (REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET):
                    rep.error = struct.unpack(">I", payload[:4])[0]
                if flags & REPLY_FLAG_DONE:
                    break
                m = struct.unpack(">I", self.recv_exact(4))[0]
                if m != magic:
                    raise ProtocolError("bad chunk magic %#x" % m)
        else:
            raise ProtocolError("bad reply magic %#x" % magic)
        if cookie is not None and rep.cookie != cookie:
            raise ProtocolError("reply cookie %#x, expected %#x" % (rep.cookie, cookie))
        return rep

    def read(self, offset, length, flags=0):
        ck = self.send_request(CMD_READ, offset, length, flags)
        rep = self.read_reply(length, ck)
        if rep.kind != "simple" and rep.error == 0:
            rep.data = assemble_read(rep.chunks, offset, length)
        return rep

    def write(self, offset, data, flags=0):
        if self.extended:
            flags |= CMD_FLAG_PAYLOAD_LEN
        ck = self.send_request(CMD_WRITE, offset, len(data), flags, data)
        return self.read_reply(0, ck)

    def command(self, cmd, offset=0, length=0, flags=0):
        ck = self.send_request(cmd, offset, length, flags)
        return self.read_reply(0, ck)

    def disconnect(self):
        self.send_request(CMD_DISC)


def rep_name(t):
    return REP_NAMES.get(t, "%#x" % t)


def info_payload(name, infos):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + \
        b"".join(struct.pack(">H", i) for i in infos)


def meta_payload(name, queries):
    n = name.encode()
    out = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        qb = q.encode()
        out += struct.pack(">I", len(qb)) + qb
    return out


def parse_infos(replies):
    """[(REP_INFO, payload)] -> {INFO_EXPORT: (size, flags), INFO_NAME: str, ...}; duplicates and
    malformed payloads raise."""
    out = {}
    for rtype, payload in replies:
        if rtype != REP_INFO:
            raise ProtocolError("unexpected reply %s before ACK" % rep_name(rtype))
        itype = struct.unpack(">H", payload[:2])[0]
        body = payload[2:]
        if itype in out:
            raise ProtocolError("duplicate info %d" % itype)
        if itype == INFO_EXPORT:
            if len(body) != 10:
                raise ProtocolError("INFO_EXPORT length %d" % len(payload))
            out[itype] = struct.unpack(">QH", body)
        elif itype in (INFO_NAME, INFO_DESCRIPTION):
            out[itype] = body.decode()
        elif itype == INFO_BLOCK_SIZE:
            if len(body) != 12:
                raise ProtocolError("INFO_BLOCK_SIZE length %d" % len(payload))
            out[itype] = struct.unpack(">III", body)
        else:
            out[itype] = body
    return out


def assemble_read(chunks, offset, length):
    """Assemble structured READ chunks; every byte must be covered exactly once."""
    buf = bytearray(length)
    spans = []
    for flags, rtype, payload in chunks:
        if rtype == REPLY_TYPE_OFFSET_DATA:
            off = struct.unpack(">Q", payload[:8])[0]
            data = payload[8:]
            if not data:
                raise ProtocolError("empty OFFSET_DATA chunk")
            rel = off - offset
            if rel < 0 or rel + len(data) > length:
                raise ProtocolError("OFFSET_DATA outside the request")
            buf[rel:rel + len(data)] = data
            spans.append((rel, len(data)))
        elif rtype == REPLY_TYPE_OFFSET_HOLE:
            off, size = struct.unpack(">QI", payload)
            rel = off - offset
            if rel < 0 or rel + size > length or size == 0:
                raise ProtocolError("OFFSET_HOLE outside the request")
            spans.append((rel, size))
        elif rtype == REPLY_TYPE_NONE:
            if payload:
                raise ProtocolError("NONE chunk with payload")
        else:
            raise ProtocolError("unexpected chunk type %d in READ reply" % rtype)
    spans.sort()
    pos = 0
    for rel, n in spans:
        if rel != pos:
            raise ProtocolError("READ chunks overlap or leave a gap at %d" % (offset + pos))
        pos += n
    if pos != length:
        raise ProtocolError("READ chunks cover %d of %d bytes" % (pos, length))
    return bytes(buf)


def parse_block_status(chunks, extended):
    """-> {context_id: [(length, flags), ...]}"""
    out = {}
    for flags, rtype, payload in chunks:
        if rtype == REPLY_TYPE_BLOCK_STATUS and not extended:
            cid = struct.unpack(">I", payload[:4])[0]
            if (len(payload) - 4) % 8 or len(payload) == 4:
                raise ProtocolError("bad BLOCK_STATUS chunk length %d" % len(payload))
            ext = [struct.unpack(">II", payload[i:i + 8]) for i in range(4, len(payload), 8)]
        elif rtype == REPLY_TYPE_BLOCK_STATUS_EXT and extended:
            cid, count = struct.unpack(">II", payload[:8])
            if len(payload) != 8 + 16 * count or count == 0:
                raise ProtocolError("bad BLOCK_STATUS_EXT chunk: count %d length %d" % (
                    count, len(payload)))
            ext = [struct.unpack(">QQ", payload[i:i + 16]) for i in range(8, len(payload), 16)]
        elif rtype == REPLY_TYPE_NONE:
            continue
        else:
            raise ProtocolError("unexpected chunk type %d in BLOCK_STATUS reply" % rtype)
        if cid in out:
            raise ProtocolError("two status chunks for context %d" % cid)
        out[cid] = ext
    return out


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
