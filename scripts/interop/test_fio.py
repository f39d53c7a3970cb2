# fio's nbd engine with crc32c verification: two jobs = two connections, 4k random writes at iodepth 16
# over two 32 MiB halves, then read-back verification. Run alone:
#   /usr/bin/python3 -m unittest -v scripts/interop/test_fio.py
import json
import os
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import qnbdtest as T  # noqa: E402
from qnbdtest import MiB  # noqa: E402

JOB = """[global]
ioengine=nbd
uri={uri}
rw={rw}
bs={bs}
iodepth={iodepth}
verify=crc32c
verify_fatal=1
verify_state_save=0
do_verify=1
{extra}
[job0]
offset=0
size=32m
[job1]
offset=32m
size=32m
"""


class FioTests(T.QnbdTestCase):
    tcp = False

    def fio(self, srv, **kw):
        params = dict(uri=srv.uri(), rw="randwrite", bs="4k", iodepth=16, extra="")
        params.update(kw)
        job = os.path.join(self.dir, "job.fio")
        with open(job, "w") as f:
            f.write(JOB.format(**params))
        p = T.run(["fio", "--output-format=json", job], timeout=240, check=False, cwd=self.dir)
        self.assertEqual(p.returncode, 0, "fio failed:\n%s\n%s" % (p.stdout[-3000:], p.stderr[-3000:]))
        start = p.stdout.index("{")
        res = json.loads(p.stdout[start:])
        jobs = res["jobs"]
        self.assertEqual(len(jobs), 2)
        for j in jobs:
            self.assertEqual(j["error"], 0, "%s: err=%d" % (j["jobname"], j["error"]))
            self.assertEqual(j["write"]["io_bytes"], 32 * MiB, j["jobname"])
            # the verify phase reads everything back
            self.assertEqual(j["read"]["io_bytes"], 32 * MiB, j["jobname"])
        return res

    def test_randwrite_verify_two_connections(self):
        img = self.image(64 * MiB)
        srv = self.start_server(img)
        self.fio(srv)
        # both halves really hold fio's data now
        for off in (0, 32 * MiB):
            data = T.read_file(img, off, 32 * MiB)
            self.assertGreater(len(data) - data.count(0), 16 * MiB)

    def test_write_with_flushes_verify_tcp(self):
        img = self.image(64 * MiB)
        srv = self.start_server(img, tcp=True)
        self.fio(srv, rw="write", bs="128k", iodepth=8, extra="fsync=16")
        for off in (0, 32 * MiB):
            data = T.read_file(img, off, 32 * MiB)
            self.assertGreater(len(data) - data.count(0), 16 * MiB)


if __name__ == "__main__":
    unittest.main(verbosity=2)
