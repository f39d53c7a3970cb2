# A bounded run of scripts/powercut (the long one: scripts/powercut --images 2000): crash images built
# from qnbd's recorded host writes at every sync point pass `qemu-img check` and keep every write a
# completed FLUSH or FUA write promised; and the checker, fed the same log with one sync's guarantee
# broken, reports both corruption and lost data (so a missing sync or a misordered write would fail).
import os
import re
import subprocess
import sys
import unittest

import qnbdtest as T

POWERCUT = os.path.join(T.REPO, "scripts", "powercut")


class PowerCutRun(unittest.TestCase):
    """One scripts/powercut run per class, made once in setUpClass: IMAGES crash images, SEED, and
    EXTRA arguments (the parameters the subclasses set)."""
    IMAGES = 0
    SEED = 0
    EXTRA = ()

    @classmethod
    def setUpClass(cls):
        if T.nbd is None:
            raise unittest.SkipTest("python3-libnbd not importable (use /usr/bin/python3)")
        run = subprocess.run([sys.executable, POWERCUT, "--images", str(cls.IMAGES), "--seed", str(cls.SEED)] + list(cls.EXTRA),
                             capture_output=True, text=True, timeout=600)
        cls.rc, cls.out = run.returncode, run.stdout + run.stderr

    def number(self, pattern):
        m = re.search(pattern, self.out)
        self.assertIsNotNone(m, "no %r in the output:\n%s" % (pattern, self.out))
        return [int(g, 0) for g in m.groups()]


class PowerCutTests(PowerCutRun):
    IMAGES = 150
    SEED = 11
    EXTRA = ("--self-test",)

    def test_workload_covers_allocation_growth_discard_and_reuse(self):
        self.assertGreater(self.number(r"L1 table updates \(new L2 tables linked\): (\d+)")[0], 0)
        offset0, clusters0, offset1, clusters1, blocks0, blocks1 = self.number(
            r"refcount table: offset (0x[0-9a-f]+), (\d+) cluster\(s\) -> offset (0x[0-9a-f]+), (\d+) cluster\(s\); "
            r"refcount blocks (\d+) -> (\d+)")
        self.assertGreater(clusters1, clusters0, "the refcount table must have grown")
        self.assertGreater(blocks1, blocks0, "refcount blocks must have been allocated")
        punched, reused = self.number(r"clusters punched after trims: (\d+); reused by later writes: (\d+)")
        self.assertGreater(punched, 0)
        self.assertGreater(reused, 0)
        self.assertNotIn("PROBLEM:", self.out)

    def test_every_crash_image_is_consistent_and_keeps_promised_data(self):
        syncs, points, images, failures = self.number(
            r"sync points: (\d+); crash points: (\d+); crash images checked: (\d+); failures: (\d+)")
        self.assertGreater(syncs, 50, self.out)
        self.assertEqual(images, 150)
        self.assertEqual(failures, 0, self.out)
        self.assertEqual(self.rc, 0, self.out)

    def test_checker_catches_a_broken_sync(self):
        broken, caught, corrupt, lost = self.number(
            r"self-test: (\d+) images with one sync's writes dropped; caught (\d+) \((\d+) corrupt, (\d+) lost data\)")
        self.assertGreater(broken, 0)
        self.assertGreater(corrupt, 0, "dropping a sync's writes must show as corruption somewhere:\n" + self.out)
        self.assertGreater(lost, 0, "dropping a sync's writes must show as lost data somewhere:\n" + self.out)


class PowerCutBitmapTests(PowerCutRun):
    """The same on an image with persistent bitmaps: every crash image keeps the disabled bitmap as it
    was and has the enabled one in use, or consistent and covering every request; the clean stop
    stores it (the bitmap store at close is in the log, so it is replayed and cut like the rest)."""
    IMAGES = 60
    SEED = 13
    EXTRA = ("--bitmaps",)

    def test_bitmaps_in_use_or_consistent_in_every_crash_image(self):
        self.assertIn("bitmaps: stored at the clean stop", self.out)
        m = re.search(r"crash images checked: (\d+); failures: (\d+)", self.out)
        self.assertIsNotNone(m, self.out)
        self.assertEqual(int(m.group(1)), self.IMAGES)
        self.assertEqual(int(m.group(2)), 0, self.out)
        self.assertNotIn("PROBLEM:", self.out)
        self.assertEqual(self.rc, 0, self.out)


if __name__ == "__main__":
    unittest.main()
