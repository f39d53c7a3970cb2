# A client that sends thousands of 1 MiB READs and never reads a reply must not grow the server
# without bound, and is cut off once its replies have sat unread for --send-timeout seconds, while a
# well-behaved libnbd client on the same server keeps reading and writing.
# Run alone: QNBD_SKIP_KERNEL=1 scripts/test --interop-only test_slowreader.py
import os
import select
import struct
import sys
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from qnbdtest import *  # noqa: E402,F401,F403
import qnbdtest as T  # noqa: E402

SEND_TIMEOUT = 1          # seconds; small so the test is quick
STALLED_READS = 4000      # ~4 GiB of replies asked for
# What the server may hold for the stalled connection: its 64 MiB in-flight bound plus slack for
# socket buffers, allocator caching and the good client's traffic.
RSS_GROWTH_LIMIT = 160 * T.MiB
# Upper bound only, so a loaded machine cannot make the test flaky; the server closes after ~1 s.
CLOSE_DEADLINE = 60


def proc_rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for pid %d" % pid)


class SlowReaderTests(T.QnbdTestCase):
    def test_stalled_reader_is_cut_off_and_memory_stays_bounded(self):
        img = self.image(size=64 * T.MiB, regions=[(0, T.pattern_bytes(7, 8 * T.MiB))])
        srv = self.start_server(img, extra=["--send-timeout", str(SEND_TIMEOUT)])
        pid = srv.proc.pid
        good = self.connect(srv)
        good.pwrite(b"\x5a" * 65536, 32 * T.MiB)
        rss_before = proc_rss(pid)

        bad = self.raw(srv, timeout=CLOSE_DEADLINE)
        bad.negotiate(structured=False)
        requests = b"".join(struct.pack(">IHHQQI", T.REQUEST_MAGIC, 0, T.CMD_READ, i + 1,
                                        (i % 56) * T.MiB, T.MiB) for i in range(STALLED_READS))
        # The server stops reading requests once its in-flight bound is reached, so sending may block
        # until the connection is closed; a thread keeps the test going meanwhile.
        def flood():
            try:
                bad.sock.sendall(requests)
            except OSError:
                pass    # the server hung up mid-flood: expected
        sender = threading.Thread(target=flood, daemon=True)
        sender.start()

        # Watch the peer-close flag without reading a byte, checking the good client and the server's
        # memory every round.
        poller = select.poll()
        poller.register(bad.sock.fileno(), select.POLLRDHUP)
        peak = rss_before
        closed = False
        rounds = 0
        while not closed and rounds < CLOSE_DEADLINE * 4:
            closed = bool(poller.poll(250))
            rounds += 1
            peak = max(peak, proc_rss(pid))
            self.assertEqual(good.pread(65536, 32 * T.MiB), b"\x5a" * 65536)
        self.assertTrue(closed, "the stalled connection was not closed within %d s" % CLOSE_DEADLINE)
        self.assertLess(peak - rss_before, RSS_GROWTH_LIMIT,
                        "server RSS grew by %d MiB for one stalled reader" % ((peak - rss_before) >> 20))
        sender.join(CLOSE_DEADLINE)
        self.assertFalse(sender.is_alive(), "the flood never ended after the server hung up")

        # The good client keeps working after the other connection is gone.
        good.pwrite(b"\xa5" * 4096, 0)
        self.assertEqual(good.pread(4096, 0), b"\xa5" * 4096)
        self.assertIn("closing", T.tail(srv.log(), 50))
        self.assertRegex(srv.log(), r"read none of \d+ queued reply bytes")


if __name__ == "__main__":
    unittest.main()
