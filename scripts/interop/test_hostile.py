# Bounded CI runs of the hostile-client tools: scripts/fuzz-net (~20 s of malformed traffic from 8
# concurrent connections next to a verifying libnbd client) and scripts/soak (~30 s, 64 clients
# mixing every command on a qcow2 image). The long runs: scripts/fuzz-net --seconds 60,
# scripts/soak --seconds 120.
import io
import os
import unittest
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader

SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(name):
    loader = SourceFileLoader(name.replace("-", "_"), os.path.join(SCRIPTS, name))
    spec = spec_from_loader(loader.name, loader)
    mod = module_from_spec(spec)
    loader.exec_module(mod)
    return mod


class HostileTests(unittest.TestCase):
    def report(self, res, log):
        self.assertEqual(res["failed"], [], "\n".join(res["problems"]) + "\n--- run log ---\n" +
                         log.getvalue()[-6000:])

    def test_fuzz_net_qcow2(self):
        fuzz = load("fuzz-net")
        log = io.StringIO()
        res = fuzz.run_fuzz(seconds=20, seed=1, fmt="qcow2", out=log)
        self.report(res, log)
        self.assertGreater(res["cases"], 100)

    def test_soak_qcow2(self):
        soak = load("soak")
        log = io.StringIO()
        res = soak.run_soak(seconds=30, clients=64, fmt="qcow2", out=log)
        self.report(res, log)
        self.assertGreater(res["total_ops"], 1000)


if __name__ == "__main__":
    unittest.main()
