# qnbdtest: the shared helpers of the qnbd interop suite (stdlib + python3-libnbd; run with /usr/bin/python3).
#
#   QNBD=path                server binary speaking the qnbd CLI (default: <repo>/.build/release/qnbd);
#                            scripts/interop/standins/qnbd-qemu-nbd and qnbd-nbdkit translate that CLI
#                            to qemu-nbd / nbdkit so the suite can be checked against known servers.
#   QNBD_TEST_TMPDIR=dir     put scratch files there (default: a fresh mktemp dir, removed at exit)
#   QNBD_KEEP_TMP=1          keep the scratch files (and server logs) for debugging
#   QNBD_TEST_TIMEOUT=secs   per-server watchdog: SIGKILL a server still running after this (default 180)
#
# Everything here is bounded in time: sockets have timeouts, subprocesses have timeouts, and every
# server has a watchdog so that a hung server turns a blocked libnbd call into an error, not a hang.
#
# A package of parts, one idea each: settings (paths, env), wire (protocol constants), scratch (folders),
# processes (subprocesses), images (test images), launcher (servers), client (raw NBD client), libnbd
# (python3-libnbd helpers), case (QnbdTestCase), bitmaps (the qcow2 bitmap directory, qemu-nbd -B maps).
# `import qnbdtest as T` gives all of them, as the tests and scripts have always used it.

from .settings import *  # noqa: F401,F403
from .wire import *  # noqa: F401,F403
from .scratch import *  # noqa: F401,F403
from .processes import *  # noqa: F401,F403
from .images import *  # noqa: F401,F403
from .launcher import *  # noqa: F401,F403
from .client import *  # noqa: F401,F403
from .libnbd import *  # noqa: F401,F403
from .case import *  # noqa: F401,F403
from .bitmaps import *  # noqa: F401,F403
