# nbdinfo (libnbd 1.14) against the server: --size, --list, --map, --can/--is, JSON output.
# Run alone: /usr/bin/python3 -m unittest -v scripts/interop/test_nbdinfo.py
import json
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qnbdtest as T  # noqa: E402
from qnbdtest import KiB, MiB  # noqa: E402

SIZE = 64 * MiB
NAME = "disk1"
DESC = "nbdinfo test export"
REGIONS = [(0, T.pattern_bytes(70, 192 * KiB)), (5 * MiB, T.pattern_bytes(71, 1 * MiB)),
           (40 * MiB + 64 * KiB, T.pattern_bytes(72, 64 * KiB))]


def nbdinfo(*args, check=True):
    return T.run(["nbdinfo"] + list(args), timeout=30, check=check)


class NbdinfoBase(T.QnbdTestCase):
    read_only = False
    tcp = False

    def setUp(self):
        super().setUp()
        self.img = self.image(SIZE, REGIONS)
        self.srv = self.start_server(self.img, export_name=NAME, description=DESC,
                                     read_only=self.read_only, tcp=self.tcp)
        self.uri = self.srv.uri()


class NbdinfoTests(NbdinfoBase):
    def test_size(self):
        self.assertEqual(nbdinfo("--size", self.uri).stdout, "%d\n" % SIZE)

    def test_json(self):
        info = json.loads(nbdinfo("--json", self.uri).stdout)
        self.assertEqual(info["protocol"], "newstyle-fixed")
        self.assertIs(info["TLS"], False)
        self.assertIs(info["structured"], True)
        self.assertEqual(len(info["exports"]), 1)
        e = info["exports"][0]
        want = {"export-name": NAME, "description": DESC, "export-size": SIZE,
                "is_read_only": False, "is_rotational": False,
                "can_cache": True, "can_df": True, "can_fast_zero": True, "can_flush": True,
                "can_fua": True, "can_multi_conn": True, "can_trim": True, "can_zero": True,
                "block_size_minimum": 1, "block_size_preferred": 4096,
                "block_size_maximum": 32 * MiB}
        got = {k: e.get(k) for k in want}
        self.assertEqual(got, want)
        self.assertIn("base:allocation", e["contexts"])
        self.assertNotIn("qemu:allocation-depth", e["contexts"])

    def test_list(self):
        info = json.loads(nbdinfo("--list", "--json", self.uri).stdout)
        self.assertEqual([(e["export-name"], e.get("description"), e.get("export-size"))
                          for e in info["exports"]], [(NAME, DESC, SIZE)])
        text = nbdinfo("--list", self.uri).stdout
        self.assertIn('export="%s":' % NAME, text)
        self.assertIn("description: %s" % DESC, text)

    def test_can_and_is_queries(self):
        # exit status: 0 = true, 2 = false, anything else = error
        expect = {"connect": 0, "read": 0, "write": 0, "flush": 0, "fua": 0, "trim": 0,
                  "zero": 0, "fast-zero": 0, "df": 0, "multi-conn": 0, "cache": 0,
                  "structured-reply": 0}
        got = {k: nbdinfo("--can", k, self.uri, check=False).returncode for k in expect}
        self.assertEqual(got, expect)
        self.assertEqual(nbdinfo("--is", "read-only", self.uri, check=False).returncode, 2)
        self.assertEqual(nbdinfo("--is", "rotational", self.uri, check=False).returncode, 2)

    def test_map_matches_qemu_img_map(self):
        got = json.loads(nbdinfo("--map", "--json", self.uri).stdout)
        ext = T.merge_extents([(e["offset"], e["length"], e["type"]) for e in got])
        expected = T.file_map(self.img)
        self.assertEqual(ext, expected)
        self.assertEqual(ext[0], (0, 192 * KiB, 0))
        # --totals: bytes per type add up to the export size
        tot = json.loads(nbdinfo("--map", "--totals", "--json", self.uri).stdout)
        by_type = {t["type"]: t["size"] for t in tot}
        self.assertEqual(sum(by_type.values()), SIZE)
        self.assertEqual(by_type.get(0), 192 * KiB + 1 * MiB + 64 * KiB)

    def test_map_allocation_depth_not_offered_on_raw(self):
        p = nbdinfo("--map=qemu:allocation-depth", self.uri, check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("does not support", p.stderr)

    def test_unknown_export_name_fails(self):
        p = nbdinfo("--size", self.srv.uri("no-such-export"), check=False)
        self.assertEqual(p.returncode, 1, p.stdout + p.stderr)
        self.assertTrue(self.srv.alive())


class NbdinfoReadOnlyTests(NbdinfoBase):
    read_only = True

    def test_read_only_queries(self):
        expect = {"connect": 0, "read": 0, "write": 2, "flush": 0, "trim": 2, "zero": 2,
                  "fast-zero": 2, "df": 0, "multi-conn": 0, "cache": 0}
        got = {k: nbdinfo("--can", k, self.uri, check=False).returncode for k in expect}
        self.assertEqual(got, expect)
        self.assertEqual(nbdinfo("--is", "read-only", self.uri, check=False).returncode, 0)
        e = json.loads(nbdinfo("--json", self.uri).stdout)["exports"][0]
        self.assertIs(e["is_read_only"], True)
        self.assertEqual(e["export-size"], SIZE)


class NbdinfoTcpTests(NbdinfoBase):
    tcp = True

    def test_tcp_size_and_map(self):
        self.assertTrue(self.uri.startswith("nbd://127.0.0.1:"))
        self.assertEqual(nbdinfo("--size", self.uri).stdout, "%d\n" % SIZE)
        got = json.loads(nbdinfo("--map", "--json", self.uri).stdout)
        ext = T.merge_extents([(e["offset"], e["length"], e["type"]) for e in got])
        self.assertEqual(ext, T.file_map(self.img))


if __name__ == "__main__":
    unittest.main(verbosity=2)
