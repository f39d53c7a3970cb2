#!/usr/bin/python3
# Access control and privileges: nbd-server's per-export authfile over TCP on 127.0.0.1 and ::1 (a
# refused client is told ERR_POLICY in the handshake and logged with its address), and user/group:
# the process runs as the configured user once its sockets are bound, and images it may not open as
# that user stay closed to it. Needs root for the privilege part (skipped otherwise).

import os
import shutil
import tempfile

from qnbdtest import *


def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class AuthfileTests(QnbdTestCase):
    def serve(self, allow_text):
        a = self.image(size=MiB, regions=[(0, b"A" * 512)], name="a.img")
        b = self.image(size=MiB, name="b.img")
        allow = os.path.join(self.dir, "allow")
        if allow_text is not None:
            with open(allow, "w") as f:
                f.write(allow_text)
        conf = write_config(os.path.join(self.dir, "q.conf"),
                            "[generic]\nallowlist = true\n[a]\nexportname = %s\nauthfile = %s\n[b]\nexportname = %s\n"
                            % (a, allow, b))
        self.port = free_tcp_port()
        return self.start_config_server(conf, tcp=True, port=self.port, extra=["--bind", "::1"])

    def uri(self, host, name):
        return "nbd://%s:%d/%s" % ("[%s]" % host if ":" in host else host, self.port, name)

    def list_names(self, host):
        out = run(["nbdinfo", "--list", "--json", self.uri(host, "")]).stdout
        return [e["export-name"] for e in json.loads(out)["exports"]]

    def go(self, host, name):
        c = RawClient((host, self.port))
        self.addCleanup(c.close)
        c.start()
        return c.option(OPT_GO, info_payload(name, ()))[-1]

    def test_ipv4_allowed_ipv6_refused(self):
        if not ipv6_loopback():
            self.skipTest("no IPv6 loopback")
        srv = self.serve("# only the IPv4 loopback\n127.0.0.0/8\n")
        h = self.connect(None, uri=self.uri("127.0.0.1", "a"))
        self.assertEqual(h.pread(512, 0), b"A" * 512)
        nbd_close(h)
        rtype, text = self.go("::1", "a")
        self.assertEqual(rtype, REP_ERR_POLICY, rep_name(rtype))
        self.assertEqual(text, b'access to export "a" is denied for this address')
        with self.assertRaises(nbd.Error):
            nbd_connect(self.uri("::1", "a"))
        # The export without an authfile stays open to ::1, and LIST shows ::1 only what it may use.
        h = self.connect(None, uri=self.uri("::1", "b"))
        self.assertEqual(h.get_size(), MiB)
        nbd_close(h)
        self.assertEqual(self.list_names("::1"), ["b"])
        self.assertEqual(self.list_names("127.0.0.1"), ["a", "b"])
        self.assertRegex(srv.log(), r'connection \d+ from \[::1\]:\d+: refused export\(s\) "a" by their authfile')

    def test_ipv6_allowed_ipv4_refused(self):
        if not ipv6_loopback():
            self.skipTest("no IPv6 loopback")
        self.serve("::1/128\n10.0.0.0/8\n")
        h = self.connect(None, uri=self.uri("::1", "a"))
        self.assertEqual(h.pread(512, 0), b"A" * 512)
        nbd_close(h)
        rtype, _ = self.go("127.0.0.1", "a")
        self.assertEqual(rtype, REP_ERR_POLICY, rep_name(rtype))
        # INFO is refused the same way, and so is the old EXPORT_NAME (which can only close).
        c = RawClient(("127.0.0.1", self.port))
        self.addCleanup(c.close)
        c.start()
        self.assertEqual(c.option(OPT_INFO, info_payload("a", ()))[-1][0], REP_ERR_POLICY)
        c.send_option(OPT_EXPORT_NAME, b"a")
        closed, data = c.read_until_close()
        self.assertTrue(closed)
        self.assertEqual(data, b"")

    def test_empty_authfile_allows_nobody_missing_allows_everyone(self):
        self.serve("")
        self.assertEqual(self.go("127.0.0.1", "a")[0], REP_ERR_POLICY)
        self.assertEqual(self.go("127.0.0.1", "b")[0], REP_ACK)

    def test_missing_authfile_allows_everyone(self):
        self.serve(None)
        self.assertEqual(self.go("127.0.0.1", "a")[0], REP_ACK)

    def test_authfile_is_reread_on_sighup(self):
        srv = self.serve("10.0.0.1\n")
        self.assertEqual(self.go("127.0.0.1", "a")[0], REP_ERR_POLICY)
        with open(os.path.join(self.dir, "allow"), "w") as f:
            f.write("127.0.0.1\n")
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload done" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertEqual(self.go("127.0.0.1", "a")[0], REP_ACK)

    def test_bad_authfile_line_stops_startup(self):
        a = self.image(size=MiB, name="a.img")
        allow = os.path.join(self.dir, "allow")
        with open(allow, "w") as f:
            f.write("127.0.0.1\nlocalhost\n")
        conf = write_config(os.path.join(self.dir, "q.conf"), "[generic]\n[a]\nexportname = %s\nauthfile = %s\n" % (a, allow))
        p = run([QNBD, "serve", "-C", conf, "--socket", os.path.join(self.dir, "s.sock")], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn('qnbd: %s:2: "localhost" is not an IP address or CIDR network' % allow, p.stderr)


@unittest.skipUnless(os.geteuid() == 0, "needs root to drop privileges")
class PrivilegeTests(QnbdTestCase):
    def setUp(self):
        super().setUp()
        # Images in a directory "nobody" can reach (the scratch tree is root's, mode 0700).
        self.shared = tempfile.mkdtemp(prefix="qnbd-nobody.")
        self.addCleanup(shutil.rmtree, self.shared, True)
        os.chmod(self.shared, 0o755)

    def test_runs_as_nobody_and_cannot_open_root_files(self):
        import pwd
        nobody = pwd.getpwnam("nobody")
        img = make_image(os.path.join(self.shared, "mine.img"), MiB, [(0, b"N" * 512)])
        os.chown(img, nobody.pw_uid, nobody.pw_gid)
        secret = make_image(os.path.join(self.shared, "root-only.img"), MiB)
        os.chmod(secret, 0o600)
        conf = write_config(os.path.join(self.shared, "q.conf"),
                            "[generic]\nuser = nobody\ngroup = nogroup\n[mine]\nexportname = %s\n" % img)
        srv = self.start_config_server(conf, socket_path=os.path.join(self.shared, "s.sock"))
        with open("/proc/%d/status" % srv.proc.pid) as f:
            status = {l.split(":")[0]: l.split()[1:] for l in f}
        self.assertEqual(int(status["Uid"][0]), nobody.pw_uid)
        self.assertEqual(int(status["Uid"][3]), nobody.pw_uid, "filesystem uid too")
        self.assertEqual(int(status["Gid"][0]), nobody.pw_gid)
        self.assertEqual(status["Groups"], [str(nobody.pw_gid)], "root's supplementary groups are gone")
        h = self.connect(srv, name="mine")
        self.assertEqual(h.pread(512, 0), b"N" * 512)
        h.pwrite(b"w" * 512, 512)
        h.flush()
        nbd_close(h)
        # The root-only image is out of reach after the drop: adding it on reload fails by name...
        with open(conf, "a") as f:
            f.write("[secret]\nexportname = %s\n" % secret)
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "reload done" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertIn('reload: export "secret" not added: cannot open %s: Permission denied' % secret, srv.log())
        # ...and serving it from the start fails before any client could connect.
        p = run([QNBD, "serve", "-C", conf, "--socket", os.path.join(self.shared, "t.sock")], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn("running as uid %d" % nobody.pw_uid, p.stderr)
        self.assertIn("cannot open %s: Permission denied" % secret, p.stderr)

    def test_unknown_user_stops_startup(self):
        img = make_image(os.path.join(self.shared, "a.img"), MiB)
        conf = write_config(os.path.join(self.shared, "q.conf"), "[generic]\nuser = no-such-user-qnbd\n[a]\nexportname = %s\n" % img)
        p = run([QNBD, "serve", "-C", conf, "--socket", os.path.join(self.shared, "s.sock")], check=False)
        self.assertEqual(p.returncode, 1)
        self.assertIn('user "no-such-user-qnbd" does not exist', p.stderr)


if __name__ == "__main__":
    main()
