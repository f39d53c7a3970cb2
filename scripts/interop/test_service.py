#!/usr/bin/python3
# qnbd under systemd, without systemd as init: socket activation through the real
# systemd-socket-activate and through libnbd's `[ qnbd serve IMAGE ]` syntax, Type=notify messages
# received on a notify socket of the test's own, journal priority prefixes, and the shipped units.

import os
import shutil
import socket
import subprocess

from qnbdtest import *


class Process:
    """A qnbd (or a launcher that execs it) with its stderr in a file, stopped at the end."""

    def __init__(self, test, argv, env=None):
        self.log_path = os.path.join(test.dir, "proc-%d.log" % len(os.listdir(test.dir)))
        self.log_file = open(self.log_path, "wb")
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=test.dir, env=full_env)
        test.addCleanup(self.kill)

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self, timeout=15):
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("no exit %ss after SIGTERM\n%s" % (timeout, self.log()))

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.log_file.close()


def start_activated(process, sock, expect):
    """systemd-socket-activate starts the server at the first connection: make one, then wait until
    the server says it took the sockets (so a server that ignored them fails here, not in a hang)."""
    wait_for(lambda: os.path.exists(sock), "systemd-socket-activate's socket")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock)
        wait_for(lambda: expect in process.log(), "the server to log '%s'" % expect)


def wait_for(predicate, what, timeout=20):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for " + what)
        time.sleep(0.02)


class NotifySocket:
    """The test's own NOTIFY_SOCKET: a unix datagram socket (a path, or abstract with '@')."""

    def __init__(self, test, abstract=False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = "qnbd-notify-%d-%d" % (os.getpid(), random.randrange(1 << 30))
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.address = os.path.join(test.dir, "notify.sock")
            self.sock.bind(self.address)
        self.sock.settimeout(15)
        test.addCleanup(self.sock.close)

    def receive(self):
        """One message as {KEY: value}."""
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n") if line)


class SocketActivationTests(QnbdTestCase):
    def test_systemd_socket_activate_unix(self):
        img = self.image(size=8 * MiB, regions=[(MiB, pattern_bytes(4, 64 * KiB))])
        sock = os.path.join(self.dir, "act.sock")
        p = Process(self, ["systemd-socket-activate", "-l", sock, QNBD, "serve", img])
        start_activated(p, sock, "listening on unix:" + sock)
        h = self.connect(None, uri="nbd+unix:///?socket=" + uri_quote_socket(sock))
        self.assertBytesEqual(h.pread(64 * KiB, MiB), pattern_bytes(4, 64 * KiB))
        h.pwrite(b"s" * 4096, 0)
        h.flush()
        nbd_close(h)
        self.assertEqual(read_file(img, 0, 4096), b"s" * 4096)
        log = p.log()
        self.assertIn("listening on unix:" + sock, log)
        self.assertNotIn("tcp:", log, "a socket-activated qnbd binds nothing of its own")
        self.assertEqual(p.stop(), 0, p.log())
        self.assertTrue(os.path.exists(sock), "the socket belongs to systemd; qnbd must not unlink it")

    def test_systemd_socket_activate_tcp_and_unix_with_names(self):
        img = self.image(size=4 * MiB, regions=[(0, pattern_bytes(5, 4096))])
        sock = os.path.join(self.dir, "act.sock")
        port = free_tcp_port()
        p = Process(self, ["systemd-socket-activate", "-l", sock, "-l", "127.0.0.1:%d" % port,
                           "-l", "[::1]:%d" % port, "--fdname=local:v4:v6", QNBD, "serve", img])
        start_activated(p, sock, "listening on tcp:[::1]")
        for uri in ("nbd+unix:///?socket=" + uri_quote_socket(sock), "nbd://127.0.0.1:%d/" % port,
                    "nbd://[::1]:%d/" % port):
            h = self.connect(None, uri=uri)
            self.assertBytesEqual(h.pread(4096, 0), pattern_bytes(5, 4096), uri)
            nbd_close(h)
        log = p.log()
        self.assertIn("listening on unix:%s (local)" % sock, log)
        self.assertIn("listening on tcp:127.0.0.1:%d (v4)" % port, log)
        self.assertIn("listening on tcp:[::1]:%d (v6)" % port, log)
        self.assertEqual(p.stop(), 0, p.log())

    def test_socket_activation_for_another_pid_is_ignored(self):
        img = self.image(size=MiB)
        sock = os.path.join(self.dir, "own.sock")
        srv = Server(self.dir, img, extra=[])
        srv.socket_path = sock
        env_backup = dict(os.environ)
        os.environ.update({"LISTEN_PID": "1", "LISTEN_FDS": "1"})
        try:
            srv.start()
        finally:
            os.environ.clear()
            os.environ.update(env_backup)
        self.addCleanup(srv.stop)
        h = self.connect(srv)
        self.assertEqual(h.get_size(), MiB)

    def test_libnbd_bracket_syntax(self):
        img = self.image(size=16 * MiB, regions=[(0, pattern_bytes(6, MiB)), (9 * MiB, pattern_bytes(7, 4096))])
        info = json.loads(run(["nbdinfo", "--json", "--", "[", QNBD, "serve", img, "]"], cwd=self.dir).stdout)
        self.assertEqual(info["exports"][0]["export-size"], 16 * MiB)
        out = os.path.join(self.dir, "out.img")
        run(["nbdcopy", "--", "[", QNBD, "serve", "-r", img, "]", out], cwd=self.dir)
        with open(img, "rb") as a, open(out, "rb") as b:
            self.assertBytesEqual(b.read(), a.read(), "nbdcopy through [ qnbd serve ]")


class NotifyTests(QnbdTestCase):
    def config(self, extra=""):
        img = self.image(size=MiB, name="a.img")
        self.image(size=2 * MiB, name="b.img")
        return write_config(os.path.join(self.dir, "q.conf"),
                            "[generic]\nallowlist = true\n[a]\nexportname = %s\n%s" % (img, extra))

    def run_notify_cycle(self, abstract):
        conf = self.config()
        notify = NotifySocket(self, abstract=abstract)
        sock = os.path.join(self.dir, "s.sock")
        p = Process(self, [QNBD, "serve", "-C", conf, "--socket", sock], env={"NOTIFY_SOCKET": notify.address})
        ready = notify.receive()
        self.assertEqual(ready.get("READY"), "1", ready)
        self.assertEqual(ready.get("MAINPID"), str(p.proc.pid))
        # READY=1 means serving: a client gets in at once.
        h = self.connect(None, uri="nbd+unix:///a?socket=" + uri_quote_socket(sock))
        self.assertEqual(h.get_size(), MiB)
        nbd_close(h)

        with open(conf, "a") as f:
            f.write("[b]\nexportname = b.img\n")
        p.proc.send_signal(signal.SIGHUP)
        reloading = notify.receive()
        self.assertEqual(reloading.get("RELOADING"), "1", reloading)
        self.assertTrue(reloading.get("MONOTONIC_USEC", "").isdigit(), reloading)
        self.assertEqual(notify.receive().get("READY"), "1")
        h = self.connect(None, uri="nbd+unix:///b?socket=" + uri_quote_socket(sock))
        self.assertEqual(h.get_size(), 2 * MiB)
        nbd_close(h)

        # A reload that fails still ends with READY=1, and the server is untouched.
        with open(conf, "a") as f:
            f.write("bogus = 1\n")
        p.proc.send_signal(signal.SIGHUP)
        self.assertEqual(notify.receive().get("RELOADING"), "1")
        self.assertEqual(notify.receive().get("READY"), "1")
        self.assertIn('reload failed, nothing changed: %s:7: unknown key "bogus" in export [b]' % conf, p.log())

        p.proc.send_signal(signal.SIGTERM)
        self.assertEqual(notify.receive().get("STOPPING"), "1")
        self.assertEqual(p.proc.wait(15), 0, p.log())

    def test_notify_path_socket(self):
        self.run_notify_cycle(abstract=False)

    def test_notify_abstract_socket(self):
        self.run_notify_cycle(abstract=True)


class JournalTests(QnbdTestCase):
    def test_priority_prefixes_only_when_stderr_is_the_journal_stream(self):
        img = self.image(size=MiB)
        sock = os.path.join(self.dir, "s.sock")
        log_path = os.path.join(self.dir, "journal.log")
        with open(log_path, "wb") as f:
            st = os.fstat(f.fileno())
            env = dict(os.environ, JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino))
            p = subprocess.Popen([QNBD, "serve", img, "--socket", sock], stderr=f, stdout=subprocess.DEVNULL,
                                 stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            self.addCleanup(lambda: p.poll() is None and p.kill())
            wait_for(lambda: unix_socket_accepts(sock), "the socket to accept")
            h = self.connect(None, uri="nbd+unix:///?socket=" + uri_quote_socket(sock))
            nbd_close(h)
            p.send_signal(signal.SIGTERM)
            self.assertEqual(p.wait(15), 0)
        lines = open(log_path).read().splitlines()
        self.assertTrue(lines)
        for line in lines:
            self.assertRegex(line, r"^<[0-7]>qnbd: ")
        self.assertTrue(any(l.startswith("<6>qnbd: listening on") for l in lines), lines)
        bad = subprocess.run([QNBD, "serve", os.path.join(self.dir, "missing.img"), "--socket", sock],
                             stderr=subprocess.PIPE, env=dict(os.environ, JOURNAL_STREAM="1:1"), text=True, timeout=30)
        self.assertEqual(bad.returncode, 1)
        self.assertTrue(bad.stderr.startswith("qnbd: "), "a stderr that is not the journal gets no prefix")


class LogTests(QnbdTestCase):
    def test_one_line_per_connection_open_and_close(self):
        srv = self.start_server(export_name="disk")
        h = self.connect(srv)
        h.pread(MiB, 0)
        h.pwrite(b"x" * 65536, 0)
        nbd_close(h)
        deadline = time.monotonic() + 10
        pattern = (r'connection (\d+) from unix closed: export "disk", [0-9.]+ s, '
                   r'(\d+) bytes received, (\d+) bytes sent')
        while not re.search(pattern, srv.log()) and time.monotonic() < deadline:
            time.sleep(0.02)
        m = re.search(pattern, srv.log())
        self.assertIsNotNone(m, srv.log())
        self.assertGreaterEqual(int(m.group(2)), 65536)
        self.assertGreaterEqual(int(m.group(3)), MiB)
        self.assertIn("connection %s from unix on unix:" % m.group(1), srv.log())

    def test_log_level(self):
        srv = self.start_server(extra=["--log-level", "warning"])
        h = self.connect(srv)
        nbd_close(h)
        srv.stop()
        self.assertNotIn("listening on", srv.log())
        self.assertNotIn("connection", srv.log())
        srv = self.start_server(extra=["-v"])
        srv.stop()
        self.assertIn("listening on", srv.log())
        p = run([QNBD, "serve", "--log-level", "loud", "x.img"], check=False)
        self.assertEqual(p.returncode, 64)
        self.assertIn("--log-level must be error, warning, info, debug or trace, not loud", p.stderr)


class UnitFileTests(QnbdTestCase):
    def test_shipped_units_verify(self):
        if not shutil.which("systemd-analyze"):
            self.skipTest("systemd-analyze not installed")
        units = os.path.join(self.dir, "units")
        os.makedirs(units)
        for name in ("qnbd.service", "qnbd.socket"):
            with open(os.path.join(REPO, "config", name)) as f:
                text = f.read()
            with open(os.path.join(units, name), "w") as f:
                f.write(text.replace("/usr/local/bin/qnbd", QNBD))
        p = run(["systemd-analyze", "verify", "--man=no", os.path.join(units, "qnbd.service"),
                 os.path.join(units, "qnbd.socket")], check=False)
        problems = [l for l in (p.stdout + p.stderr).splitlines() if "qnbd" in l]
        self.assertEqual(problems, [], p.stdout + p.stderr)
        self.assertEqual(p.returncode, 0, p.stdout + p.stderr)


if __name__ == "__main__":
    main()
