"""The database scenario's client: commits numbered transactions through the VIP.

Run inside the lab's client node::

    python -m carpool.scenarios.dbclient --host 10.0.0.100 --log committed.log

Each transaction inserts one row ``n``; only once PostgreSQL has acknowledged the
COMMIT is ``n`` appended to the log (and the log fsynced). A lost connection is
retried until SIGTERM; the longest stretch without a commit is the outage. On
exit one JSON line: committed, failed attempts, outage seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from types import FrameType


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dbclient")
    parser.add_argument("--host", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--interval", type=float, default=0.02)
    arguments = parser.parse_args(argv)
    import psycopg  # the client's own dependency, loaded only here

    running = True

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    log = os.open(arguments.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    number = int(time.time() * 1000)  # unique across restarts of the client
    committed = failed = 0
    last_commit = time.monotonic()
    longest_gap = 0.0
    connection: psycopg.Connection[tuple[object, ...]] | None = None
    while running:
        try:
            if connection is None:
                connection = psycopg.connect(
                    host=arguments.host, user="postgres", dbname="postgres",
                    connect_timeout=2, autocommit=True,
                )  # fmt: skip
            number += 1
            connection.execute("INSERT INTO ledger (n) VALUES (%s)", (number,))
        except psycopg.Error:
            failed += 1
            if connection is not None:
                connection.close()
                connection = None
            time.sleep(0.2)
            continue
        now = time.monotonic()
        longest_gap = max(longest_gap, now - last_commit)
        last_commit = now
        os.write(log, f"{number}\n".encode())
        os.fsync(log)
        committed += 1
        time.sleep(arguments.interval)
    if connection is not None:
        connection.close()
    os.close(log)
    summary = {"committed": committed, "failed_attempts": failed,
               "longest_gap_s": round(longest_gap, 2)}  # fmt: skip
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
