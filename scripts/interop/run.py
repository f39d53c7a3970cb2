#!/usr/bin/python3
# Runs the qnbd interop suite: discovers scripts/interop/test_*.py, prints one line per test case
# (PASS/FAIL), the details of failures, and finally exactly one line "N passed, N failed".
# Exit status 0 only if nothing failed.
#
#   /usr/bin/python3 scripts/interop/run.py                 # all tests, server from $QNBD
#   /usr/bin/python3 scripts/interop/run.py -k handshake    # only test ids containing "handshake"
#   /usr/bin/python3 scripts/interop/run.py test_cli.py     # only these files
#   /usr/bin/python3 scripts/interop/run.py --list          # list test ids
#   /usr/bin/python3 scripts/interop/run.py --not-run "why" # report every test as failed (not run)
#
# Environment: QNBD (server binary or a stand-in from standins/), QNBD_TEST_TMPDIR, QNBD_KEEP_TMP=1,
# QNBD_TEST_TIMEOUT (per-server watchdog, s), QNBD_CASE_TIMEOUT (per-test watchdog, s; default 300),
# QNBD_SUMMARY_FILE (also write the summary line there; used by scripts/test).
import argparse
import os
import sys
import threading
import time
import traceback
import unittest

sys.dont_write_bytecode = True
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import qnbdtest  # noqa: E402

CASE_TIMEOUT = float(os.environ.get("QNBD_CASE_TIMEOUT", "300"))


def iter_tests(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from iter_tests(t)
        else:
            yield t


def short_id(test):
    return test.id()


class LineResult(unittest.TestResult):
    """One line per test case; subtest failures make their test fail once."""

    def __init__(self, out):
        super().__init__()
        self.out = out
        self.passed = 0
        self.failed_ids = []
        self.details = []
        self._cur = None

    def startTest(self, test):
        super().startTest(test)
        self._cur = {"ok": True, "t0": time.monotonic(), "status": "PASS"}
        self._watch = threading.Timer(CASE_TIMEOUT, self._case_timeout, args=(test,))
        self._watch.daemon = True
        self._watch.start()

    def _case_timeout(self, test):
        self.out.write("!! %s exceeded %ss: killing its servers\n" % (short_id(test), CASE_TIMEOUT))
        self.out.flush()
        qnbdtest.kill_leftover_servers()

    def _fail(self, test, err, status):
        if self._cur is None or test is None or getattr(test, "_is_holder", False):
            # class/module fixture errors: count them as one failed case each
            name = str(test)
            self.failed_ids.append(name)
            self.out.write("%-5s %s\n" % (status, name))
            self.details.append((name, self._exc_info_to_string(err, test)))
            return
        self._cur["ok"] = False
        self._cur["status"] = status
        self.details.append((short_id(test), self._exc_info_to_string(err, test)))

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._fail(test, err, "FAIL")

    def addError(self, test, err):
        super().addError(test, err)
        if isinstance(test, unittest.suite._ErrorHolder):
            test._is_holder = True
            cur, self._cur = self._cur, None
            self._fail(test, err, "ERROR")
            self._cur = cur
            return
        self._fail(test, err, "ERROR")

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            self._cur["ok"] = False
            self._cur["status"] = "FAIL"
            self.details.append((subtest.id(), self._exc_info_to_string(err, test)))

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._cur["ok"] = False
        self._cur["status"] = "SKIP"
        self.details.append((short_id(test), "skipped (counted as failed): %s\n" % reason))

    def addUnexpectedSuccess(self, test):
        super().addUnexpectedSuccess(test)
        self._cur["ok"] = False
        self._cur["status"] = "FAIL"

    def stopTest(self, test):
        super().stopTest(test)
        self._watch.cancel()
        dt = time.monotonic() - self._cur["t0"]
        if self._cur["ok"]:
            self.passed += 1
        else:
            self.failed_ids.append(short_id(test))
        self.out.write("%-5s %s (%.1fs)\n" % (self._cur["status"], short_id(test), dt))
        self.out.flush()
        self._cur = None


def load(files, pattern):
    loader = unittest.TestLoader()
    if files:
        suite = unittest.TestSuite()
        for f in files:
            name = os.path.splitext(os.path.basename(f))[0]
            suite.addTests(loader.loadTestsFromName(name))
    else:
        suite = loader.discover(HERE, pattern="test_*.py", top_level_dir=HERE)
    if pattern:
        keep = unittest.TestSuite()
        for t in iter_tests(suite):
            if any(p in t.id() for p in pattern):
                keep.addTest(t)
        suite = keep
    return suite


def write_summary(out, passed, failed):
    line = "%d passed, %d failed\n" % (passed, failed)
    path = os.environ.get("QNBD_SUMMARY_FILE")
    if path:
        with open(path, "w") as f:
            f.write(line)
    out.write(line)
    out.flush()


def main():
    ap = argparse.ArgumentParser(description="qnbd interop suite")
    ap.add_argument("files", nargs="*", help="test files (default: all test_*.py here)")
    ap.add_argument("-k", action="append", default=[], help="only test ids containing this")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--not-run", metavar="REASON")
    ap.add_argument("-x", "--failfast", action="store_true")
    a = ap.parse_args()
    out = sys.stdout
    suite = load(a.files, a.k)
    tests = list(iter_tests(suite))
    if a.list:
        for t in tests:
            print(t.id())
        print("%d tests" % len(tests))
        return 0
    if a.not_run:
        for t in tests:
            out.write("NOTRUN %s\n" % t.id())
        out.write("interop suite not run: %s\n" % a.not_run)
        write_summary(out, 0, len(tests))
        return 1

    out.write("interop: server %s, %d tests, scratch %s\n" % (qnbdtest.QNBD, len(tests),
                                                              qnbdtest.tmp_root()))
    out.flush()
    result = LineResult(out)
    result.failfast = a.failfast
    t0 = time.monotonic()
    try:
        suite.run(result)
    except KeyboardInterrupt:
        out.write("interrupted\n")
    finally:
        qnbdtest.kill_leftover_servers()
    failed = len(result.failed_ids)
    not_run = len(tests) - result.testsRun
    if not_run > 0 and (a.failfast or failed):
        failed += not_run if a.failfast else 0
    if result.details:
        out.write("\n==================== failure details ====================\n")
        for name, text in result.details:
            out.write("---- %s\n%s\n" % (name, text.rstrip()))
        out.write("\nfailed tests:\n")
        for name in result.failed_ids:
            out.write("  %s\n" % name)
    out.write("interop suite took %.0fs\n" % (time.monotonic() - t0))
    write_summary(out, result.passed, failed)
    return 0 if failed == 0 and result.passed > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
