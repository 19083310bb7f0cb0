"""``carpool supervise``: what systemd does for a carpool daemon, for hosts and labs without it.

It starts the daemon, passes SIGTERM, SIGINT and SIGHUP on, and whenever the daemon
ends — cleanly, with an error, or SIGKILLed — runs the stop-post command (carpd's is
``carpctl cleanup``, which removes the virtual addresses a killed daemon would leave
beside the new master). With ``--restart on-failure`` it starts the daemon again,
like systemd's ``Restart=on-failure``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import subprocess
import sys
import time
from types import FrameType

log = logging.getLogger("carpool.supervise")

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("supervise", help="run a daemon with a stop-post command")
    parser.add_argument(
        "--exec-stop-post",
        action="append",
        default=[],
        metavar="CMD",
        help="command run after the daemon ends, however it ends (repeatable)",
    )
    parser.add_argument("--restart", choices=("no", "on-failure", "always"), default="no")
    parser.add_argument("--restart-sec", type=float, default=1.0)
    parser.add_argument("daemon", nargs=argparse.REMAINDER, metavar="-- DAEMON ARGS")


def run(arguments: argparse.Namespace) -> int:
    argv = list(arguments.daemon)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        print("carpool supervise: say which daemon to run after --", file=sys.stderr)
        return 2
    stopping = False
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    while True:
        child = subprocess.Popen(argv)
        print(f"supervise: started {shlex.join(argv)} as pid {child.pid}", flush=True)
        code = child.wait()
        how = f"killed by signal {-code}" if code < 0 else f"exited {code}"
        print(f"supervise: {argv[0]} {how}", flush=True)
        for command in arguments.exec_stop_post:
            result = subprocess.run(shlex.split(command), check=False)
            print(f"supervise: stop-post {command!r} exited {result.returncode}", flush=True)
        failed = code != 0 and code != -signal.SIGTERM
        again = arguments.restart == "always" or (arguments.restart == "on-failure" and failed)
        if stopping or not again:
            return 0 if code in (0, -signal.SIGTERM) else 1
        time.sleep(arguments.restart_sec)
