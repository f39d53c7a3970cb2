# qnbdtest.settings: Where the server binary and scratch files are, bounded waits, sizes.
# Part of the qnbdtest package (see __init__.py); run with /usr/bin/python3.

import atexit
import contextlib
import errno
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

try:
    import nbd  # python3-libnbd, only for /usr/bin/python3 on Debian
except ImportError:  # pragma: no cover - reported by the tests that need it
    nbd = None

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # scripts/interop

REPO = os.path.dirname(os.path.dirname(HERE))
QNBD = os.environ.get("QNBD") or os.path.join(REPO, ".build", "release", "qnbd")
if os.sep in QNBD:
    QNBD = os.path.abspath(QNBD)     # servers run with their scratch dir as cwd
TEST_TIMEOUT = float(os.environ.get("QNBD_TEST_TIMEOUT", "180"))
KEEP_TMP = os.environ.get("QNBD_KEEP_TMP") == "1"

KiB = 1024
MiB = 1024 * 1024
GiB = 1024 * MiB
DEFAULT_SIZE = 64 * MiB
