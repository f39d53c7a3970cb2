#!/usr/bin/python3
# `qnbd serve --config FILE`: nbd-server's config format with many exports in one process, checked
# with real clients (nbdinfo --list, nbdcopy, libnbd), nbd-server's own example configs, the shipped
# config/qnbd.conf, and the exact FILE:LINE messages for bad input.

import os
import shutil
import subprocess
import tempfile

from qnbdtest import *


def qnbd(*args, check=False, timeout=30):
    return run([QNBD] + list(args), check=check, timeout=timeout)


class ConfigFileTests(QnbdTestCase):
    def raw_and_qcow2(self):
        raw = self.image(size=8 * MiB, regions=[(0, pattern_bytes(1, 64 * KiB)), (5 * MiB, pattern_bytes(2, 4096))],
                         name="raw.img")
        qcow = os.path.join(self.dir, "vm.qcow2")
        run(["qemu-img", "create", "-q", "-f", "qcow2", qcow, "16M"])
        run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 256k", qcow])
        return raw, qcow

    def test_list_and_copy_raw_and_qcow2_exports(self):
        raw, qcow = self.raw_and_qcow2()
        conf = write_config(os.path.join(self.dir, "q.conf"), """[generic]
    allowlist = true
[raw]
    exportname = raw.img
    description = the raw one
[vm]
    exportname = %s
    format = qcow2
    readonly = true
    description = the qcow2 one
""" % qcow)
        srv = self.start_config_server(conf)
        out = run(["nbdinfo", "--list", "--json", srv.uri("")]).stdout
        exports = {e["export-name"]: e for e in json.loads(out)["exports"]}
        self.assertEqual(sorted(exports), ["raw", "vm"])
        self.assertEqual(exports["raw"]["description"], "the raw one")
        self.assertEqual(exports["vm"]["description"], "the qcow2 one")
        self.assertEqual(exports["raw"]["export-size"], 8 * MiB)
        self.assertEqual(exports["vm"]["export-size"], 16 * MiB)
        self.assertFalse(exports["raw"]["is_read_only"])
        self.assertTrue(exports["vm"]["is_read_only"])

        out_raw = os.path.join(self.dir, "out-raw.img")
        out_vm = os.path.join(self.dir, "out-vm.img")
        run(["nbdcopy", srv.uri("raw"), out_raw])
        run(["nbdcopy", srv.uri("vm"), out_vm])
        with open(raw, "rb") as a, open(out_raw, "rb") as b:
            self.assertBytesEqual(b.read(), a.read(), "raw export copy")
        ref = os.path.join(self.dir, "ref.img")
        run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", qcow, ref])
        with open(ref, "rb") as a, open(out_vm, "rb") as b:
            self.assertBytesEqual(b.read(), a.read(), "qcow2 export copy")
        # Writes go to the writable export only.
        src = self.image(size=8 * MiB, regions=[(MiB, pattern_bytes(3, MiB))], name="src.img")
        run(["nbdcopy", src, srv.uri("raw")])
        with open(src, "rb") as a, open(raw, "rb") as b:
            self.assertBytesEqual(b.read(), a.read(), "raw export after nbdcopy into it")
        h = self.connect(srv, name="vm")
        self.assertNbdError(errno.EPERM, h.pwrite, b"x" * 512, 0)

    def test_allowlist_false_refuses_list_but_serves(self):
        raw = self.image(size=MiB, name="a.img")
        conf = write_config(os.path.join(self.dir, "q.conf"), "[generic]\n[a]\nexportname = %s\n" % raw)
        srv = self.start_config_server(conf)
        c = self.raw(srv)
        c.start()
        rtype, text = c.option(OPT_LIST)[-1]
        self.assertEqual(rtype, REP_ERR_POLICY, rep_name(rtype))
        self.assertIn(b"does not list", text)
        h = self.connect(srv, name="a")
        self.assertEqual(h.get_size(), MiB)

    def test_shipped_example_config_serves_as_it_is(self):
        shipped = os.path.join(REPO, "config", "qnbd.conf")
        conf = os.path.join(self.dir, "qnbd.conf")
        shutil.copyfile(shipped, conf)
        self.image(size=4 * MiB, name="disk.img")
        run(["qemu-img", "create", "-q", "-f", "qcow2", os.path.join(self.dir, "vm.qcow2"), "8M"])
        check = qnbd("serve", "-C", conf, "--check-config", check=True).stdout
        self.assertIn('export "disk"', check)
        self.assertIn('export "vm"', check)
        self.assertIn("loops: %d (one per online CPU)" % min(os.cpu_count(), 64), check)
        srv = self.start_config_server(conf, tcp=True)
        out = run(["nbdinfo", "--list", "--json", srv.uri("")]).stdout
        names = [e["export-name"] for e in json.loads(out)["exports"]]
        self.assertEqual(names, ["disk", "vm"])
        h = self.connect(srv, name="vm")
        self.assertEqual(h.get_size(), 8 * MiB)
        self.assertTrue(h.is_read_only())

    def test_readme_example_parses(self):
        with open(os.path.join(REPO, "README.md")) as f:
            readme = f.read()
        block = readme.split("```ini\n", 1)[1].split("```", 1)[0]
        conf = write_config(os.path.join(self.dir, "readme.conf"), block)
        out = qnbd("serve", "-C", conf, "--check-config", check=True).stdout
        self.assertIn('export "disk": /var/lib/qnbd/disk.img', out)
        self.assertIn("authfile /etc/qnbd/disk.allow", out)
        self.assertIn('export "vm": /var/lib/qnbd/vm.qcow2, format detected, readonly', out)

    def test_nbd_server_man_page_examples(self):
        # The two examples of nbd-server(5), as written there; only the image and authfile paths
        # point into the test's directory (their /export and /etc/nbd-server do not exist here).
        # The image sits in a directory the nbd user can reach (the scratch tree is root's, 0700).
        shared = tempfile.mkdtemp(prefix="qnbd-nbduser.")
        self.addCleanup(shutil.rmtree, shared, True)
        os.chmod(shared, 0o755)
        img = make_image(os.path.join(shared, "blkdev"), 2 * MiB, [(0, pattern_bytes(9, 4096))])
        allow = os.path.join(shared, "allow")
        with open(allow, "w") as f:
            f.write("127.0.0.1\n192.168.0.0/8\n192.168.1.1\n")
        simple = write_config(os.path.join(self.dir, "simple.conf"),
                              "[generic]\n[export]\n    exportname = %s\n" % img)
        srv = self.start_config_server(simple)
        h = self.connect(srv, name="export")
        self.assertBytesEqual(h.pread(4096, 0), pattern_bytes(9, 4096))
        nbd_close(h)
        srv.stop()

        secure = write_config(os.path.join(self.dir, "secure.conf"), """[generic]
    user = nbd
    group = nbd
[export]
    exportname = %s
    authfile = %s
""" % (img, allow))
        os.chown(img, pwd_uid("nbd"), grp_gid("nbd"))
        srv = self.start_config_server(secure, tcp=True)
        h = self.connect(srv, name="export")
        self.assertBytesEqual(h.pread(4096, 0), pattern_bytes(9, 4096))
        h.pwrite(b"w" * 4096, 8192)
        h.flush()
        self.assertEqual(read_file(img, 8192, 4096), b"w" * 4096)
        with open("/proc/%d/status" % srv.proc.pid) as f:
            uid_line = [l for l in f if l.startswith("Uid:")][0].split()
        self.assertEqual(int(uid_line[1]), pwd_uid("nbd"))

    def test_debian_default_config_parses(self):
        # Debian's /etc/nbd-server/config, unchanged: user, group and includedir are understood; it
        # defines no export of its own, which qnbd (like nbd-server) refuses to serve.
        if not os.path.exists("/etc/nbd-server/config"):
            self.skipTest("nbd-server's package config is not installed")
        p = qnbd("serve", "-C", "/etc/nbd-server/config", "--check-config")
        conf_d = [f for f in os.listdir("/etc/nbd-server/conf.d") if f.endswith(".conf")] \
            if os.path.isdir("/etc/nbd-server/conf.d") else []
        if conf_d:
            self.assertEqual(p.returncode, 0, p.stderr)
        else:
            self.assertEqual(p.returncode, 1)
            self.assertEqual(p.stderr.strip(), "qnbd: /etc/nbd-server/config: no exports; add a section such as "
                             "[disk] with exportname = /path/to/image")

    def test_bad_config_stops_with_file_line_and_key(self):
        img = self.image(size=MiB, name="a.img")
        cases = [
            ("[generic]\n[a]\nexportname = %s\ncopyonwrite = true\n" % img,
             ':4: key "copyonwrite" (nbd-server: writes go to a diff file dropped at disconnect) is not '
             'implemented by qnbd; set it to false or remove the line'),
            ("[generic]\n[a]\nexportname = %s\nprerun = /bin/true\n" % img,
             ':4: key "prerun" (nbd-server: a command run before serving a client) is not implemented by qnbd; remove the line'),
            ("[generic]\n[a]\nexprotname = %s\n" % img, ':3: unknown key "exprotname" in export [a]; did you mean "exportname"?'),
            ("[generic]\nport = 10809\nport = 10810\n[a]\nexportname = %s\n" % img,
             ':3: key "port" is set twice in [generic] (first at line 2); keep one'),
            ("[generic]\n[a]\nexportname = %s\nreadonly = yes\n" % img, ':4: key "readonly" must be true or false, not "yes"'),
        ]
        for text, want in cases:
            conf = write_config(os.path.join(self.dir, "bad.conf"), text)
            p = qnbd("serve", "-C", conf, "--socket", os.path.join(self.dir, "s.sock"))
            self.assertEqual(p.returncode, 1, p.stderr)
            self.assertEqual(p.stderr.strip(), "qnbd: " + conf + want)
            self.assertFalse(os.path.exists(os.path.join(self.dir, "s.sock")))

    def test_same_image_twice_needs_both_readonly(self):
        img = self.image(size=MiB, name="a.img")
        link = os.path.join(self.dir, "link.img")
        os.symlink(img, link)
        conf = write_config(os.path.join(self.dir, "q.conf"),
                            "[generic]\n[one]\nexportname = %s\n[two]\nexportname = %s\nreadonly = true\n" % (img, link))
        p = qnbd("serve", "-C", conf, "--socket", os.path.join(self.dir, "s.sock"))
        self.assertEqual(p.returncode, 1)
        self.assertIn('exports "one" (%s:2) and "two" (%s:4) both open %s; one image can back several '
                      'exports only if all of them are readonly' % (conf, conf, link), p.stderr)
        write_config(conf, "[generic]\nallowlist = true\n[one]\nexportname = %s\nreadonly = true\n"
                           "[two]\nexportname = %s\nreadonly = true\n" % (img, link))
        srv = self.start_config_server(conf)
        for name in ("one", "two"):
            h = self.connect(srv, name=name)
            self.assertEqual(h.get_size(), MiB)

    def test_per_export_options_conflict_with_config(self):
        conf = write_config(os.path.join(self.dir, "q.conf"), "[generic]\n[a]\nexportname = /x\n")
        p = qnbd("serve", "-C", conf, "-r")
        self.assertEqual(p.returncode, 64, p.stderr)
        self.assertIn("--read-only sets one export; with --config set it in the export's section", p.stderr)
        p = qnbd("serve", "-C", conf, "disk.img")
        self.assertNotEqual(p.returncode, 0)

    def test_maxconnections_per_export_and_server_wide(self):
        a = self.image(size=MiB, name="a.img")
        b = self.image(size=MiB, name="b.img")
        conf = write_config(os.path.join(self.dir, "q.conf"), "[generic]\nmaxconnections = 3\n"
                            "[a]\nexportname = %s\nmaxconnections = 1\n[b]\nexportname = %s\n" % (a, b))
        srv = self.start_config_server(conf)
        h1 = self.connect(srv, name="a")
        # The second client of "a" is told no in the handshake.
        c = self.raw(srv)
        c.start()
        rtype, text = c.option(OPT_GO, info_payload("a", ()))[-1]
        self.assertEqual(rtype, REP_ERR_POLICY, rep_name(rtype))
        self.assertEqual(text, b'export "a" has 1 connections already (maxconnections)')
        c.close()
        # "b" has no limit of its own, but the server's 3 apply: h1 + h2 + h3, the 4th is closed.
        h2 = self.connect(srv, name="b")
        h3 = self.connect(srv, name="b")
        with self.assertRaises(nbd.Error):
            self.connect(srv, name="b")
        nbd_close(h1)
        h4 = None
        for _ in range(100):   # the server sees h1's close a moment later
            try:
                h4 = self.connect(srv, name="a")
                break
            except nbd.Error:
                time.sleep(0.05)
        self.assertIsNotNone(h4)
        self.assertEqual(h4.get_size(), MiB)


def pwd_uid(name):
    import pwd
    return pwd.getpwnam(name).pw_uid


def grp_gid(name):
    import grp
    return grp.getgrnam(name).gr_gid


if __name__ == "__main__":
    main()
