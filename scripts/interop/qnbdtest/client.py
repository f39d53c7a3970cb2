# qnbdtest.client: A hand-rolled NBD client (no libnbd) for byte-exact handshake and malformed-input tests.
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
