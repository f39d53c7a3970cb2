# TLS interop: libnbd (nbdinfo, nbdcopy), qemu-img and qemu-io against `qnbd serve --tls ...`, X.509
# and PSK credentials made at test time with certtool and psktool; refusals (wrong CA, expired server
# certificate, wrong PSK, DN not allowed), TLS-required and TLS-only exports against plaintext clients,
# STARTTLS followed by injected plaintext, and clients that stall after STARTTLS.
# Run alone: /usr/bin/python3 -m unittest -v scripts/interop/test_tls.py   (QNBD=... to pick the server)
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qnbdtest import *  # noqa: E402,F401,F403
import qnbdtest as T  # noqa: E402

HAVE_TOOLS = all(shutil.which(t) for t in ("certtool", "psktool", "nbdinfo"))
DATA = T.pattern_bytes(9, 1 * MiB)
# RFC 4514 order, as gnutls_x509_crt_get_dn3 prints it (and certtool -i shows it as Subject).
CLIENT_DN = "CN=qnbd test client,O=qnbd tests"


class Credentials:
    """Everything made once per run in one directory:
    x509/          the server's ca-cert.pem, server-cert.pem, server-key.pem (0600)
    x509-expired/  the same CA, a server certificate that expired in 2020
    client/        ca-cert.pem, client-cert.pem, client-key.pem (libnbd's and qemu's client layout)
    client-noauth/ only ca-cert.pem (a client without a certificate)
    other-ca/      ca-cert.pem of a CA nobody trusts
    psk/keys.psk   alice and bob;  wrong-psk/keys.psk   alice with another key"""

    _made = None

    @classmethod
    def get(cls):
        if cls._made is None:
            cls._made = cls(T.new_workdir("tls_credentials"))
        return cls._made

    def __init__(self, root):
        self.root = root
        log = os.path.join(root, "certtool.log")

        def run(cmd):
            with open(log, "ab") as f:
                subprocess.run(cmd, shell=True, check=True, stdout=f, stderr=f, timeout=60)

        def template(name, lines):
            path = os.path.join(root, name + ".tmpl")
            with open(path, "w") as f:
                f.write("\n".join(lines) + "\n")
            return path

        def key(path):
            run("certtool --generate-privkey --key-type=ecdsa --outfile %s" % path)

        for d in ("x509", "x509-expired", "client", "client-noauth", "other-ca", "psk", "wrong-psk", "ca"):
            os.makedirs(os.path.join(root, d))
        self.x509 = os.path.join(root, "x509")
        self.expired = os.path.join(root, "x509-expired")
        self.client = os.path.join(root, "client")
        self.client_noauth = os.path.join(root, "client-noauth")
        self.other_ca = os.path.join(root, "other-ca")
        self.psk_dir = os.path.join(root, "psk")
        self.psk = os.path.join(self.psk_dir, "keys.psk")
        self.wrong_psk_dir = os.path.join(root, "wrong-psk")
        self.wrong_psk = os.path.join(self.wrong_psk_dir, "keys.psk")
        ca_key = os.path.join(root, "ca", "ca-key.pem")
        ca = os.path.join(self.x509, "ca-cert.pem")
        key(ca_key)
        run("certtool --generate-self-signed --load-privkey %s --template %s --outfile %s" % (
            ca_key, template("ca", ["cn = qnbd interop CA", "ca", "cert_signing_key", "expiration_days = 30"]), ca))
        for d in (self.expired, self.client, self.client_noauth):
            shutil.copy(ca, os.path.join(d, "ca-cert.pem"))
        other_key = os.path.join(root, "other-ca", "ca-key.pem")
        key(other_key)
        run("certtool --generate-self-signed --load-privkey %s --template %s --outfile %s" % (
            other_key, template("other", ["cn = untrusted CA", "ca", "cert_signing_key", "expiration_days = 30"]),
            os.path.join(self.other_ca, "ca-cert.pem")))
        server = ["cn = localhost", "dns_name = localhost", "ip_address = 127.0.0.1", "tls_www_server",
                  "signing_key", "encryption_key"]
        past = ['activation_date = "2019-01-01 00:00:00 UTC"', 'expiration_date = "2020-01-01 00:00:00 UTC"']
        for d, extra, name in ((self.x509, ["expiration_days = 30"], "server"), (self.expired, past, "expired")):
            key(os.path.join(d, "server-key.pem"))
            run("certtool --generate-certificate --load-privkey %s --load-ca-certificate %s --load-ca-privkey %s "
                "--template %s --outfile %s" % (os.path.join(d, "server-key.pem"), ca, ca_key,
                                                template(name, server + extra), os.path.join(d, "server-cert.pem")))
            os.chmod(os.path.join(d, "server-key.pem"), 0o600)
        key(os.path.join(self.client, "client-key.pem"))
        run("certtool --generate-certificate --load-privkey %s --load-ca-certificate %s --load-ca-privkey %s "
            "--template %s --outfile %s" % (
                os.path.join(self.client, "client-key.pem"), ca, ca_key,
                template("client", ["cn = qnbd test client", "organization = qnbd tests", "tls_www_client",
                                    "signing_key", "expiration_days = 30"]),
                os.path.join(self.client, "client-cert.pem")))
        run("psktool -u alice -p %s && psktool -u bob -p %s" % (self.psk, self.psk))
        run("psktool -u alice -p %s" % self.wrong_psk)
        os.chmod(self.psk, 0o600)
        os.chmod(self.wrong_psk, 0o600)


def q(path):
    return T.uri_quote_socket(path)


def cpu_has_aes():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith(("flags", "Features")):
                return "aes" in line.split(":", 1)[1].split()
    return False


@unittest.skipUnless(HAVE_TOOLS, "certtool, psktool and nbdinfo are needed")
class TLSBase(T.QnbdTestCase):
    tcp = True

    def setUp(self):
        super().setUp()
        self.cred = Credentials.get()
        self.img = self.image(regions=[(0, DATA)])

    def serve(self, *flags, tcp=None, **kw):
        return self.start_server(self.img, tcp=self.tcp if tcp is None else tcp, extra=list(flags), **kw)

    def x509_uri(self, srv, certs=None, name=""):
        certs = certs or self.cred.client_noauth
        if srv.tcp:
            return "nbds://127.0.0.1:%d/%s?tls-certificates=%s" % (srv.port, name, certs)
        return "nbds+unix:///%s?socket=%s&tls-certificates=%s" % (name, q(srv.socket_path), certs)

    def psk_uri(self, srv, user="alice", psk_file=None, name=""):
        psk_file = psk_file or self.cred.psk
        if srv.tcp:
            return "nbds://%s@127.0.0.1:%d/%s?tls-psk-file=%s" % (user, srv.port, name, psk_file)
        return "nbds+unix://%s@/%s?socket=%s&tls-psk-file=%s" % (user, name, q(srv.socket_path), psk_file)

    def nbdinfo(self, uri, check=True):
        return T.run(["nbdinfo", uri], timeout=60, check=check)

    def assertRefused(self, uri):
        r = self.nbdinfo(uri, check=False)
        self.assertNotEqual(r.returncode, 0, "nbdinfo %s should have failed:\n%s" % (uri, r.stdout))
        return r

    def tls_client(self, srv, raw):
        """Wraps a RawClient's socket (right after the STARTTLS ACK) in TLS, X.509, trusting our CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(os.path.join(self.cred.x509, "ca-cert.pem"))
        raw.sock = ctx.wrap_socket(raw.sock, server_hostname="localhost")
        return raw


class TLSX509Test(TLSBase):
    def test_nbdinfo_over_tcp_and_unix(self):
        srv = self.serve("--tls-certificates", self.cred.x509)
        out = T.as_text(self.nbdinfo(self.x509_uri(srv)).stdout)
        self.assertIn("with TLS", out)
        self.assertIn("export-size: %d" % T.DEFAULT_SIZE, out)
        unix = self.serve("--tls-certificates", self.cred.x509, tcp=False, socket_path=os.path.join(self.dir, "u.sock"),
                          pid_file=os.path.join(self.dir, "u.pid"))
        self.assertIn("with TLS", T.as_text(self.nbdinfo(self.x509_uri(unix)).stdout))
        # `on` (the default with credentials) still serves plaintext clients.
        self.assertIn("without TLS", T.as_text(self.nbdinfo(srv.uri()).stdout))

    def test_nbdcopy_in_and_out_with_data_verified(self):
        srv = self.serve("--tls", "require", "--tls-certificates", self.cred.x509)
        uri = self.x509_uri(srv)
        out = os.path.join(self.dir, "out.img")
        T.run(["nbdcopy", uri, out], timeout=120)
        self.assertEqual(T.read_file(out, 0, len(DATA)), DATA)
        self.assertEqual(os.path.getsize(out), T.DEFAULT_SIZE)
        new = T.pattern_bytes(77, 4 * MiB)
        src = T.make_image(os.path.join(self.dir, "src.img"), T.DEFAULT_SIZE, [(8 * MiB, new)])
        T.run(["nbdcopy", src, uri], timeout=120)
        self.assertEqual(T.read_file(self.img, 8 * MiB, len(new)), new)
        self.assertEqual(T.read_file(self.img, 0, len(DATA)), b"\0" * len(DATA), "the copy replaced the whole disk")
        back = os.path.join(self.dir, "back.img")
        T.run(["nbdcopy", uri, back], timeout=120)
        self.assertEqual(T.read_file(back, 8 * MiB, len(new)), new)

    def test_wrong_ca_is_refused(self):
        srv = self.serve("--tls-certificates", self.cred.x509)
        self.assertRefused(self.x509_uri(srv, certs=self.cred.other_ca))
        self.assertIn("with TLS", T.as_text(self.nbdinfo(self.x509_uri(srv)).stdout))

    def test_expired_server_certificate_is_refused(self):
        srv = self.serve("--tls-certificates", self.cred.expired)
        self.assertRefused(self.x509_uri(srv))

    def test_client_certificate_dn_must_be_in_the_authz_list(self):
        srv = self.serve("--tls", "require", "--tls-certificates", self.cred.x509, "--tls-authz", "CN=someone else")
        self.assertRefused(self.x509_uri(srv, certs=self.cred.client))
        self.assertIn("not in the allowed list", srv.log())
        ok = self.serve("--tls", "require", "--tls-certificates", self.cred.x509, "--tls-authz", CLIENT_DN,
                        pid_file=os.path.join(self.dir, "ok.pid"))
        self.assertIn("with TLS", T.as_text(self.nbdinfo(self.x509_uri(ok, certs=self.cred.client)).stdout))
        # --tls-authz implies --tls-verify-peer: no certificate, no entry.
        self.assertRefused(self.x509_uri(ok))

    def test_authz_file(self):
        listing = os.path.join(self.dir, "allowed")
        with open(listing, "w") as f:
            f.write("# allowed clients\nCN=nobody\n%s\n" % CLIENT_DN)
        srv = self.serve("--tls-certificates", self.cred.x509, "--tls-authz-file", listing)
        self.assertIn("with TLS", T.as_text(self.nbdinfo(self.x509_uri(srv, certs=self.cred.client)).stdout))

    def test_verify_peer_needs_a_client_certificate(self):
        srv = self.serve("--tls-certificates", self.cred.x509, "--tls-verify-peer")
        self.assertRefused(self.x509_uri(srv))
        self.assertIn("with TLS", T.as_text(self.nbdinfo(self.x509_uri(srv, certs=self.cred.client)).stdout))


class TLSPSKTest(TLSBase):
    def test_psk_nbdinfo(self):
        srv = self.serve("--tls", "require", "--tls-psk", self.cred.psk)
        self.assertIn("with TLS", T.as_text(self.nbdinfo(self.psk_uri(srv)).stdout))
        unix = self.serve("--tls-psk", self.cred.psk, tcp=False, socket_path=os.path.join(self.dir, "u.sock"),
                          pid_file=os.path.join(self.dir, "u.pid"))
        self.assertIn("with TLS", T.as_text(self.nbdinfo(self.psk_uri(unix, user="bob")).stdout))

    def negotiated(self, srv):
        m = re.search(r"TLS \((TLS[0-9.]+)\)-[^(]*-\(([A-Z0-9-]+)\)", srv.log())
        self.assertIsNotNone(m, "no TLS line in the server log:\n" + srv.log()[-2000:])
        return m.group(2)

    @unittest.skipUnless(cpu_has_aes(), "the CPU has no AES instructions: GnuTLS's order is kept")
    def test_psk_gets_aes_gcm_not_chacha20(self):
        # A SHA-256 PSK rules out AES-256-GCM-SHA384 in TLS 1.3, and the client's NORMAL order would
        # then pick CHACHA20-POLY1305, ten times slower than AES-128-GCM where AES-NI exists.
        srv = self.serve("--tls", "require", "--tls-psk", self.cred.psk, "-v")
        self.nbdinfo(self.psk_uri(srv))
        self.assertEqual(self.negotiated(srv), "AES-128-GCM")
        # An explicit priority string is used as given: the operator's order, not ours.
        own = self.serve("--tls", "require", "--tls-psk", self.cred.psk, "-v", "--tls-priority",
                         "NORMAL:-VERS-ALL:+VERS-TLS1.3:-AES-128-GCM:-AES-256-GCM:-AES-128-CCM:-AES-256-CCM")
        self.nbdinfo(self.psk_uri(own))
        self.assertEqual(self.negotiated(own), "CHACHA20-POLY1305")

    def test_wrong_psk_is_refused(self):
        srv = self.serve("--tls", "require", "--tls-psk", self.cred.psk)
        self.assertRefused(self.psk_uri(srv, psk_file=self.cred.wrong_psk))
        self.assertRefused(self.psk_uri(srv, user="mallory", psk_file=self.cred.wrong_psk))

    def test_psk_users_per_export(self):
        cfg = T.write_config(os.path.join(self.dir, "q.conf"), """
[generic]
tls-psk = %s
allowlist = true
[secret]
exportname = %s
tls-psk-users = alice
[open]
exportname = %s
""" % (self.cred.psk, self.img, self.image(name="open.img")))
        srv = self.start_config_server(cfg, tcp=True)
        self.assertIn("with TLS", T.as_text(self.nbdinfo(self.psk_uri(srv, user="alice", name="secret")).stdout))
        self.assertRefused(self.psk_uri(srv, user="bob", name="secret"))
        self.assertIn("with TLS", T.as_text(self.nbdinfo(self.psk_uri(srv, user="bob", name="open")).stdout))
        # In the clear the export is TLS-only.
        with self.raw(srv) as c:
            c.start()
            self.assertEqual(c.option(T.OPT_INFO, T.info_payload("secret", []))[-1][0], T.REP_ERR_TLS_REQD)


@unittest.skipUnless(shutil.which("qemu-img") and shutil.which("qemu-io"), "qemu-img and qemu-io are needed")
class TLSQemuTest(TLSBase):
    def opts(self, srv, creds_id="tls0"):
        return "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=%d,tls-creds=%s" % (srv.port, creds_id)

    def test_qemu_img_and_qemu_io_with_x509(self):
        srv = self.serve("--tls", "require", "--tls-certificates", self.cred.x509)
        obj = "tls-creds-x509,id=tls0,dir=%s,endpoint=client" % self.cred.client_noauth
        info = T.as_text(T.run(["qemu-img", "info", "--object", obj, "--image-opts", self.opts(srv)], timeout=60).stdout)
        self.assertIn(str(T.DEFAULT_SIZE), info)
        r = T.run(["qemu-io", "--object", obj, "--image-opts", self.opts(srv),
                   "-c", "write -P 0xab 4M 1M", "-c", "read -P 0xab 4M 1M", "-c", "read -P 0 5M 64k"], timeout=60)
        self.assertNotIn("Pattern verification failed", T.as_text(r.stdout))
        self.assertEqual(T.read_file(self.img, 4 * MiB, MiB), b"\xab" * MiB)

    def test_qemu_io_with_psk_and_refusals(self):
        srv = self.serve("--tls", "require", "--tls-psk", self.cred.psk)
        obj = "tls-creds-psk,id=tls0,dir=%s,username=alice,endpoint=client" % self.cred.psk_dir
        r = T.run(["qemu-io", "--object", obj, "--image-opts", self.opts(srv),
                   "-c", "write -P 0x5a 0 64k", "-c", "read -P 0x5a 0 64k"], timeout=60)
        self.assertNotIn("Pattern verification failed", T.as_text(r.stdout))
        self.assertEqual(T.read_file(self.img, 0, 64 * KiB), b"\x5a" * 64 * KiB)
        wrong = "tls-creds-psk,id=tls0,dir=%s,username=alice,endpoint=client" % self.cred.wrong_psk_dir
        r = T.run(["qemu-img", "info", "--object", wrong, "--image-opts", self.opts(srv)], timeout=60, check=False)
        self.assertNotEqual(r.returncode, 0)
        # A qemu without TLS against `require`.
        r = T.run(["qemu-img", "info", "nbd://127.0.0.1:%d" % srv.port], timeout=60, check=False)
        self.assertNotEqual(r.returncode, 0)

    def test_qemu_refuses_an_expired_server_certificate(self):
        srv = self.serve("--tls-certificates", self.cred.expired)
        obj = "tls-creds-x509,id=tls0,dir=%s,endpoint=client" % self.cred.client_noauth
        r = T.run(["qemu-img", "info", "--object", obj, "--image-opts", self.opts(srv)], timeout=60, check=False)
        self.assertNotEqual(r.returncode, 0)


class TLSHandshakeTest(TLSBase):
    """Raw-socket tests of the option haggling around STARTTLS."""

    def test_plaintext_client_against_require_gets_tls_reqd(self):
        srv = self.serve("--tls", "require", "--tls-certificates", self.cred.x509)
        with self.raw(srv) as c:
            c.start()
            for opt, payload in ((T.OPT_LIST, b""), (T.OPT_INFO, T.info_payload("", [])),
                                 (T.OPT_GO, T.info_payload("", [])), (T.OPT_STRUCTURED_REPLY, b""),
                                 (T.OPT_SET_META_CONTEXT, T.meta_payload("", ["base:allocation"])), (99, b"")):
                self.assertEqual(c.option(opt, payload)[-1][0], T.REP_ERR_TLS_REQD, "option %d" % opt)
            c.send_option(T.OPT_EXPORT_NAME, b"")
            closed, data = c.read_until_close(5)
            self.assertTrue(closed, "EXPORT_NAME before TLS must close")
            self.assertEqual(data, b"")
        r = self.nbdinfo(srv.uri(), check=False)
        self.assertNotEqual(r.returncode, 0)

    def test_off_refuses_starttls_and_on_without_credentials_stops_startup(self):
        srv = self.serve("--tls", "off", "--tls-certificates", self.cred.x509)
        with self.raw(srv) as c:
            c.start()
            self.assertEqual(c.option(T.OPT_STARTTLS)[-1][0], T.REP_ERR_POLICY)
        bad = T.Server(self.dir, self.img, extra=["--tls", "on"], socket_path=os.path.join(self.dir, "b.sock"),
                       pid_file=os.path.join(self.dir, "b.pid"))
        with self.assertRaises(T.ServerStartError) as e:
            bad.start()
        self.assertIn("--tls-certificates", str(e.exception))

    def test_missing_credentials_stop_startup_naming_the_file(self):
        empty = os.path.join(self.dir, "empty-pki")
        os.makedirs(empty)
        shutil.copy(os.path.join(self.cred.x509, "ca-cert.pem"), empty)
        bad = T.Server(self.dir, self.img, extra=["--tls-certificates", empty], socket_path=os.path.join(self.dir, "b.sock"))
        with self.assertRaises(T.ServerStartError) as e:
            bad.start()
        self.assertIn(os.path.join(empty, "server-cert.pem"), str(e.exception))
        missing = T.Server(self.dir, self.img, extra=["--tls-psk", os.path.join(self.dir, "nope.psk")],
                           socket_path=os.path.join(self.dir, "c.sock"))
        with self.assertRaises(T.ServerStartError) as e:
            missing.start()
        self.assertIn("nope.psk", str(e.exception))

    def test_loose_key_permissions_warn(self):
        loose = os.path.join(self.dir, "loose")
        shutil.copytree(self.cred.x509, loose)
        os.chmod(os.path.join(loose, "server-key.pem"), 0o644)
        srv = self.serve("--tls-certificates", loose)
        self.assertIn("server-key.pem", srv.log())
        self.assertIn("with TLS", T.as_text(self.nbdinfo(self.x509_uri(srv)).stdout))

    def test_starttls_then_tls_then_negotiation_starts_over(self):
        srv = self.serve("--tls-certificates", self.cred.x509)
        with self.raw(srv) as c:
            c.start()
            self.assertEqual(c.structured_reply(), T.REP_ACK)
            self.assertEqual(c.option(T.OPT_STARTTLS)[-1][0], T.REP_ACK)
            self.tls_client(srv, c)
            self.assertEqual(c.sock.version() in ("TLSv1.2", "TLSv1.3"), True)
            # Structured replies were forgotten: negotiating them again is not "already negotiated".
            self.assertEqual(c.structured_reply(), T.REP_ACK)
            self.assertEqual(c.option(T.OPT_STARTTLS)[-1][0], T.REP_ERR_INVALID)
            c.go("")
            self.assertEqual(c.read(0, 4096).data, DATA[:4096])
            c.disconnect()

    def test_plaintext_after_starttls_is_discarded_not_parsed(self):
        srv = self.serve("--tls-certificates", self.cred.x509)
        with self.raw(srv) as c:
            c.start()
            # STARTTLS and, in the same packet, an injected EXPORT_NAME and ABORT. Parsed, the first would
            # start transmission right after TLS and the second would end the connection.
            injected = struct.pack(">QII", T.IHAVEOPT, T.OPT_EXPORT_NAME, 0) + struct.pack(">QII", T.IHAVEOPT, T.OPT_ABORT, 0)
            c.send(struct.pack(">QII", T.IHAVEOPT, T.OPT_STARTTLS, 0) + injected)
            opt, rtype, payload = c.read_option_reply()
            self.assertEqual((opt, rtype), (T.OPT_STARTTLS, T.REP_ACK))
            self.tls_client(srv, c)
            # The server is still haggling and answers our own options, in order.
            r = c.option(T.OPT_LIST)
            self.assertEqual(r[-1][0], T.REP_ACK)
            self.assertEqual([p[4:].decode() for t, p in r if t == T.REP_SERVER], [""])
            c.go("")
            self.assertEqual(c.read(0, 4096).data, DATA[:4096])
            c.disconnect()
        self.assertNotIn("aborted", srv.log())

    def test_client_silent_after_starttls_is_cut_off_by_the_handshake_timeout(self):
        srv = self.serve("--tls-certificates", self.cred.x509, "--handshake-timeout", "1")
        with self.raw(srv) as c:
            c.start()
            self.assertEqual(c.option(T.OPT_STARTTLS)[-1][0], T.REP_ACK)
            started = time.monotonic()
            self.assertTrue(c.wait_closed(6), "a client silent after STARTTLS must be cut off")
            self.assertGreater(time.monotonic() - started, 0.5)
        with self.raw(srv) as c:
            c.start()
            self.assertEqual(c.option(T.OPT_STARTTLS)[-1][0], T.REP_ACK)
            # Half a ClientHello: a record header announcing 512 bytes, then nothing.
            c.send(b"\x16\x03\x01\x02\x00" + b"\x01\x00\x01\xfc\x03\x03")
            self.assertTrue(c.wait_closed(6), "a client stalled mid-TLS-handshake must be cut off")
        self.assertIn("handshake timed out", srv.log())
        # The server still serves.
        self.assertIn("with TLS", T.as_text(self.nbdinfo(self.x509_uri(srv)).stdout))

    def test_connection_cap_counts_tls_connections(self):
        srv = self.serve("--tls-certificates", self.cred.x509, "--max-connections", "1")
        with self.raw(srv) as c:
            c.start()
            self.assertEqual(c.option(T.OPT_STARTTLS)[-1][0], T.REP_ACK)
            self.tls_client(srv, c)
            self.assertEqual(c.option(T.OPT_LIST)[-1][0], T.REP_ACK)
            self.assertNotEqual(self.nbdinfo(self.x509_uri(srv), check=False).returncode, 0)
        deadline = time.monotonic() + 5
        while "closed" not in srv.log() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertIn("with TLS", T.as_text(self.nbdinfo(self.x509_uri(srv)).stdout))

    def test_selective_tls_export_is_hidden_and_refused_in_the_clear(self):
        cfg = T.write_config(os.path.join(self.dir, "q.conf"), """
[generic]
tls-certificates = %s
allowlist = true
[secret]
exportname = %s
tls = require
[open]
exportname = %s
""" % (self.cred.x509, self.img, self.image(name="open.img")))
        srv = self.start_config_server(cfg, tcp=True)
        with self.raw(srv) as c:
            c.start()
            r = c.option(T.OPT_LIST)
            self.assertEqual([p[4:].decode() for t, p in r if t == T.REP_SERVER], ["open"])
            self.assertEqual(c.option(T.OPT_INFO, T.info_payload("secret", []))[-1][0], T.REP_ERR_TLS_REQD)
            self.assertEqual(c.option(T.OPT_GO, T.info_payload("secret", []))[-1][0], T.REP_ERR_TLS_REQD)
            self.assertEqual(c.option(T.OPT_STARTTLS)[-1][0], T.REP_ACK)
            self.tls_client(srv, c)
            r = c.option(T.OPT_LIST)
            self.assertEqual([p[4:].decode() for t, p in r if t == T.REP_SERVER], ["secret", "open"])
            c.go("secret")
            self.assertEqual(c.read(0, 4096).data, DATA[:4096])
            c.disconnect()
        self.assertIn("with TLS", T.as_text(self.nbdinfo(self.x509_uri(srv, name="secret")).stdout))
        self.assertIn("without TLS", T.as_text(self.nbdinfo(srv.uri("open")).stdout))


if __name__ == "__main__":
    unittest.main()
