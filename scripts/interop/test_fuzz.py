# A short libFuzzer run of each harness in scripts/fuzz/ (handshake: NBD handshake, request
# validation and reply encoding; qcow2: header parsing and the read/block-status engine over hostile
# images; qcow2-write: hostile images opened writable, with every host write checked for where it
# lands; qcow2-bitmaps: hostile bitmap directories and tables loaded, marked and stored at close, with
# every store write checked and the stored bits read back). Each test builds its harness (cached in
# .build-fuzz) and fuzzes it for FUZZ_SECONDS (default 20) from the committed seed corpus; any crash,
# sanitizer report, leak, timeout or OOM fails the test and names the crashing input. The test is skipped (the runner counts a skip as a failure) only when
# the toolchain has no libFuzzer runtime (scripts/fuzz/run exits 3).
#
# Run alone: /usr/bin/python3 -m unittest -v scripts/interop/test_fuzz.py
import os
import subprocess
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
RUN = os.path.join(HERE, "..", "fuzz", "run")
SECONDS = int(os.environ.get("FUZZ_SECONDS", "20"))


class FuzzTests(unittest.TestCase):
    def fuzz(self, harness):
        p = subprocess.run([RUN, "--seconds", str(SECONDS), harness], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=SECONDS + 600)
        if p.returncode == 3:
            self.skipTest("libFuzzer runtime unavailable: " + p.stdout.strip().splitlines()[0])
        lines = p.stdout.strip().splitlines()
        self.assertEqual(p.returncode, 0, p.stdout[-4000:])
        self.assertEqual(lines[-1], "1 passed, 0 failed", p.stdout[-4000:])

    def test_fuzz_handshake(self):
        self.fuzz("handshake")

    def test_fuzz_qcow2(self):
        self.fuzz("qcow2")

    def test_fuzz_qcow2_write(self):
        self.fuzz("qcow2-write")

    def test_fuzz_qcow2_bitmaps(self):
        self.fuzz("qcow2-bitmaps")


if __name__ == "__main__":
    unittest.main()
