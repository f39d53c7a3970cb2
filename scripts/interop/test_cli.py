# Command line and process behaviour of `qnbd serve`: start-up errors, busy socket/port, pid file,
# connection cap, persistence across clients, graceful SIGTERM/SIGINT with writes in flight.
# Run alone: /usr/bin/python3 -m unittest -v scripts/interop/test_cli.py
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qnbdtest as T  # noqa: E402
from qnbdtest import KiB, MiB, nbd  # noqa: E402


def run_qnbd(args, timeout=15):
    """Run qnbd expecting it to exit by itself (start-up failure)."""
    try:
        return subprocess.run([T.QNBD] + args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout, text=True, cwd=T.tmp_root())
    except subprocess.TimeoutExpired:
        raise AssertionError("qnbd %r kept running for %ss (expected a start-up error)" % (
            args, timeout))


def error_lines(p):
    return [l for l in p.stderr.splitlines() if l.strip()]


class CliErrorTests(T.QnbdTestCase):
    def assertOneLineError(self, p, what, subject=None):
        """Non-zero exit; stderr is log lines ("qnbd: " prefix, so no usage dump or trace) whose
        last line is the error and names `subject` (path, port, option)."""
        self.assertNotEqual(p.returncode, 0, "%s: exit status 0" % what)
        lines = error_lines(p)
        self.assertTrue(lines, "%s: no error message" % what)
        bad = [l for l in lines if not l.startswith("qnbd: ")]
        self.assertEqual(bad, [], "%s: expected a one-line 'qnbd: ' error, got:\n%s" % (
            what, p.stderr))
        if subject is not None:
            self.assertIn(subject, lines[-1], "%s: the error line should name %r" % (what, subject))

    def test_missing_image(self):
        sock = os.path.join(self.dir, "s")
        pid = os.path.join(self.dir, "pid")
        missing = os.path.join(self.dir, "no-such.img")
        p = run_qnbd(["serve", missing, "--socket", sock, "--pid-file", pid])
        self.assertOneLineError(p, "missing image", "no-such.img")
        self.assertFalse(os.path.exists(pid), "pid file written for a server that never started")
        self.assertFalse(os.path.exists(sock))

    def test_bad_option_one_line_error(self):
        img = self.image(1 * MiB)
        p = run_qnbd(["serve", img, "--socket", os.path.join(self.dir, "s"), "--no-such-option"])
        self.assertOneLineError(p, "unknown option", "--no-such-option")

    def test_bad_option_values_fail(self):
        img = self.image(1 * MiB)
        sock = os.path.join(self.dir, "s")
        tcp = ["--bind", "127.0.0.1"]
        for i, args in enumerate([["serve", img, "--port", "notaport"] + tcp,
                                  ["serve", img, "--port", "70000"] + tcp,
                                  ["serve", img, "--max-connections", "many", "--socket", sock],
                                  ["serve", img, "-f", "vmdk", "--socket", sock],
                                  ["serve", "--socket", sock],
                                  ["no-such-subcommand", img, "--socket", sock]]):
            with self.subTest(args=args[2:]):
                pid = os.path.join(self.dir, "pid%d" % i)
                p = run_qnbd(args + ["--pid-file", pid])
                self.assertNotEqual(p.returncode, 0, "accepted %r" % args)
                self.assertTrue(error_lines(p), "no error message for %r" % args)
                self.assertFalse(os.path.exists(pid))

    def test_foreign_formats_refused_without_format(self):
        # A VHD, VHDX, VMDK, VDI or Parallels file served with the format detected would go out as the
        # container's raw bytes; qnbd names the format and the two ways out instead. `-f raw` serves it.
        for fmt in ("vpc", "vhdx", "vmdk", "vdi", "parallels"):
            with self.subTest(fmt=fmt):
                img = os.path.join(self.dir, "disk." + fmt)
                T.run(["qemu-img", "create", "-q", "-f", fmt, img, "16M"], timeout=60)
                sock = os.path.join(self.dir, "s-" + fmt)
                p = run_qnbd(["serve", "-r", img, "--socket", sock])
                self.assertOneLineError(p, fmt + " image", img)
                for needed in (fmt, "-f raw", "qemu-img convert"):
                    self.assertIn(needed, error_lines(p)[-1])
                self.assertFalse(os.path.exists(sock))
                srv = self.start_server(img, read_only=True, extra=["-f", "raw"], socket_path=sock)
                self.assertEqual(T.run(["nbdinfo", "--size", srv.uri()], timeout=60).stdout.strip(), str(os.path.getsize(img)))
                self.assertEqual(srv.stop(), 0)

    def test_raw_size_not_a_multiple_of_512(self):
        # qemu-img info and qemu-nbd both see whole 512-byte sectors (the tail reads as zeros), and so
        # do `qnbd info` and `qnbd serve`.
        img = self.image(1000, [(0, b"\xab" * 1000)])
        want = json.loads(T.run(["qemu-img", "info", "--output=json", "-f", "raw", img], timeout=60).stdout)
        info = json.loads(T.run([T.QNBD, "info", "--json", img], timeout=60).stdout)
        self.assertEqual(info["virtual-size"], want["virtual-size"])
        srv = self.start_server(img)
        self.assertEqual(int(T.run(["nbdinfo", "--size", srv.uri()], timeout=60).stdout.strip()), want["virtual-size"])
        h = self.connect(srv)
        self.assertEqual(h.pread(1024, 0), b"\xab" * 1000 + b"\0" * 24)

    def test_busy_unix_socket(self):
        img = self.image(4 * MiB, [(0, b"first")])
        srv = self.start_server(img)
        p = run_qnbd(["serve", self.image(4 * MiB, name="other.img"), "--socket", srv.socket_path,
                      "--pid-file", os.path.join(self.dir, "other.pid")])
        self.assertOneLineError(p, "busy unix socket", srv.socket_path)
        # the first server still owns its socket and serves
        self.assertTrue(srv.alive())
        h = self.connect(srv)
        self.assertEqual(h.pread(5, 0), b"first")

    def test_busy_tcp_port(self):
        img = self.image(4 * MiB)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as blocker:
            blocker.bind(("127.0.0.1", 0))
            blocker.listen(1)
            port = blocker.getsockname()[1]
            p = run_qnbd(["serve", img, "--bind", "127.0.0.1", "--port", str(port),
                          "--pid-file", os.path.join(self.dir, "pid")])
            self.assertOneLineError(p, "busy TCP port", str(port))
            self.assertFalse(os.path.exists(os.path.join(self.dir, "pid")))
        # and a port held by another qnbd
        srv = self.start_server(img, tcp=True)
        p = run_qnbd(["serve", img, "--bind", "127.0.0.1", "--port", str(srv.port),
                      "--pid-file", os.path.join(self.dir, "pid2")])
        self.assertNotEqual(p.returncode, 0)
        self.assertTrue(srv.alive())


class CliLifecycleTests(T.QnbdTestCase):
    def test_pid_file_and_socket_lifecycle(self):
        srv = self.start_server(self.image(4 * MiB))
        with open(srv.pid_file) as f:
            self.assertEqual(f.read().strip(), str(srv.proc.pid))
        self.assertTrue(os.path.exists(srv.socket_path))
        self.assertEqual(srv.stop(signal.SIGTERM), 0)
        self.assertFalse(os.path.exists(srv.pid_file), "pid file left behind")
        self.assertFalse(os.path.exists(srv.socket_path), "unix socket left behind")

    def test_sigint_graceful(self):
        img = self.image(4 * MiB)
        srv = self.start_server(img)
        h = self.connect(srv)
        h.pwrite(b"\x42" * 65536, 0)
        self.assertEqual(srv.stop(signal.SIGINT), 0)
        self.assertEqual(T.read_file(img, 0, 65536), b"\x42" * 65536)
        self.assertFalse(os.path.exists(srv.socket_path))

    def test_tcp_port_zero_and_log_lines(self):
        srv = self.start_server(self.image(4 * MiB), tcp=True)
        port = T.listening_tcp_port(srv.proc.pid)
        self.assertTrue(port and port != 10809, "port 0 should pick a free port, got %r" % port)
        h = self.connect(srv)
        self.assertEqual(h.get_size(), 4 * MiB)
        log = srv.log()
        lines = [l for l in log.splitlines() if "listening on" in l]
        self.assertTrue(lines, "no 'listening on' line in:\n" + log)
        self.assertTrue(any(str(port) in l for l in lines), "port %d not in %r" % (port, lines))
        bad = [l for l in log.splitlines() if l.strip() and not l.startswith("qnbd: ")]
        self.assertEqual(bad, [], "log lines without the 'qnbd: ' prefix")

    def test_accepts_documented_options(self):
        img = self.image(4 * MiB, [(0, b"opts")])
        srv = self.start_server(img, export_name="e1", description="d1", tcp=True,
                                extra=["-f", "raw", "--threads", "4", "-v", "-v",
                                       "--max-connections", "8"])
        h = self.connect(srv)
        self.assertEqual(h.pread(4, 0), b"opts")
        self.assertEqual(h.get_export_name(), "e1")

    def test_serves_new_clients_after_others_leave(self):
        img = self.image(8 * MiB)
        srv = self.start_server(img)
        h1 = T.nbd_connect(srv.uri())
        h1.pwrite(b"\x61" * 4096, 4096)
        h1.shutdown()
        del h1
        # a client that vanishes mid-handshake, and one that vanishes with a request in flight
        c = T.RawClient(srv.address())
        c.start()
        c.send_option(T.OPT_GO, struct.pack(">I", 0))
        c.close()
        c = T.RawClient(srv.address())
        c.negotiate()
        c.send_request(T.CMD_READ, 0, 1 * MiB)
        c.send_request(T.CMD_WRITE, 0, 8192, payload=b"\x62" * 4096)   # half a payload
        c.close()
        time.sleep(0.2)
        self.assertTrue(srv.alive(), "server exited after clients left")
        for i in range(3):
            h = self.connect(srv)
            self.assertEqual(h.pread(4096, 4096), b"\x61" * 4096)
            h.shutdown()

    def test_max_connections(self):
        img = self.image(8 * MiB)
        srv = self.start_server(img, extra=["--max-connections", "2"])
        h1 = self.connect(srv)
        h2 = self.connect(srv)
        extra = T.RawClient(srv.address())
        self.addCleanup(extra.close)
        closed, _ = extra.read_until_close(5)
        self.assertTrue(closed, "third connection was not closed with --max-connections 2")
        # the existing connections are unaffected
        h1.pwrite(b"\x01" * 65536, 0)
        h2.pwrite(b"\x02" * 65536, 65536)
        self.assertEqual(h2.pread(65536, 0), b"\x01" * 65536)
        self.assertEqual(h1.pread(65536, 65536), b"\x02" * 65536)
        # a slot frees up when a client leaves
        h1.shutdown()
        deadline = time.monotonic() + 5
        while True:
            try:
                h3 = T.nbd_connect(srv.uri())
                break
            except nbd.Error:
                if time.monotonic() > deadline:
                    raise AssertionError("no new connection accepted after a client left")
                time.sleep(0.1)
        self.addCleanup(T.nbd_close, h3)
        self.assertEqual(h3.pread(65536, 65536), b"\x02" * 65536)

    def test_sigterm_completes_in_flight_writes(self):
        img = self.image(32 * MiB)
        srv = self.start_server(img)
        c = self.raw(srv, timeout=30)
        c.negotiate()
        n, size = 160, 64 * KiB
        rnd = random.Random(8)
        writes = [(i * 128 * KiB + rnd.randrange(0, 4096), rnd.randbytes(size)) for i in range(n)]
        replies = {}
        reader_err = []

        def reader():
            try:
                for _ in range(n):
                    rep = c.read_reply(0)
                    replies[rep.cookie] = rep.error
            except Exception as e:  # noqa: BLE001
                reader_err.append(e)

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        stream = b"".join(struct.pack(">IHHQQI", T.REQUEST_MAGIC, T.CMD_FLAG_FUA, T.CMD_WRITE,
                                      i + 1, off, size) + data
                          for i, (off, data) in enumerate(writes))
        c.send(stream)              # every request is now with the server (or its socket buffer)
        done_before = len(replies)
        os.kill(srv.proc.pid, signal.SIGTERM)
        t.join(60)
        self.assertFalse(t.is_alive(), "replies did not arrive")
        self.assertLess(done_before, n, "all writes finished before SIGTERM; nothing was in flight")
        if reader_err:
            raise AssertionError("after %d of %d replies: %s" % (len(replies), n, reader_err[0]))
        self.assertEqual(sorted(replies), list(range(1, n + 1)))
        self.assertEqual({e for e in replies.values()}, {0}, "write errors after SIGTERM")
        self.assertTrue(c.read_until_close(10)[0], "server did not close the connection")
        try:
            rc = srv.proc.wait(10)
        except subprocess.TimeoutExpired:
            rc = None
        self.assertEqual(rc, 0, "exit status after SIGTERM:\n" + T.tail(srv.log()))
        for off, data in writes:
            self.assertEqual(T.read_file(img, off, size), data, "write at %d lost" % off)


if __name__ == "__main__":
    unittest.main(verbosity=2)
