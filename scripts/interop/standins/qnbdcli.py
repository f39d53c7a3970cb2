# Parser for the qnbd command line (see cli-spec) shared by the stand-in shims in this directory.
import argparse
import os
import socket
import sys


def parse(prog, argv):
    p = argparse.ArgumentParser(prog=prog)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("image")
    s.add_argument("--socket")
    s.add_argument("--bind", action="append")
    s.add_argument("-p", "--port", type=int, default=10809)
    s.add_argument("-x", "--export-name", default="")
    s.add_argument("-D", "--description")
    s.add_argument("-r", "--read-only", action="store_true")
    s.add_argument("-f", "--format", choices=["raw", "qcow2"])
    s.add_argument("--max-connections", type=int, default=128)
    s.add_argument("--pid-file")
    s.add_argument("-v", "--verbose", action="count", default=0)
    s.add_argument("--threads", type=int, default=16)
    a = p.parse_args(argv)
    if not os.path.exists(a.image):
        sys.exit("%s: cannot open %s: No such file or directory" % (prog, a.image))
    if a.bind and len(a.bind) > 1:
        sys.exit("%s: stand-in supports one --bind only" % prog)
    a.bind = a.bind[0] if a.bind else "0.0.0.0"
    if a.socket is None and a.port == 0:
        # the real server binds port 0 itself; here pick a free port and announce it
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.bind((a.bind, 0))
            a.port = t.getsockname()[1]
    return a


def announce(prog, a):
    where = a.socket if a.socket else "%s:%d" % (a.bind, a.port)
    print("%s: listening on %s" % (prog, where), file=sys.stderr, flush=True)
