"""``make soak``: scenario A again and again, db1 crashing at a random moment.

Each round builds a fresh lab, lets the client commit for a random 0.2-8 s,
crashes db1, checks every acknowledged transaction on db2, brings db1 back,
fails back and checks again. One line per round, then the figures; exit 1 if
any committed transaction went missing (or a round failed).

usage: python -m carpool.scenarios.soak [--rounds 20] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
import traceback

from carpool.lab import Lab
from carpool.scenarios.database import DatabaseScenario, tools_missing


def one_round(rng: random.Random) -> dict[str, float | int]:
    with Lab() as lab:
        scenario = DatabaseScenario(lab)
        try:
            scenario.bring_up()
            scenario.start_client()
            scenario.wait_for_commits(5)
            crash_after = rng.uniform(0.2, 8.0)
            time.sleep(crash_after)
            outage = scenario.crash("db1")
            scenario.wait_for_commits(20)
            after_crash = scenario.verify()
            scenario.recover("db1")
            failback = scenario.failback("db1")
            scenario.wait_for_commits(20)
            client = scenario.stop_client()
            final = scenario.verify()
        finally:
            scenario.stop_client()
    return {
        "crash_after_s": round(crash_after, 2),
        "outage_s": round(outage, 2),
        "failback_s": round(failback, 2),
        "committed": final.committed,
        "missing_after_crash": len(after_crash.missing),
        "missing": len(final.missing),
        "longest_gap_s": float(client.get("longest_gap_s", 0.0)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="soak", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seed", type=int, default=None)
    arguments = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("soak: run as root (the lab uses network namespaces)", file=sys.stderr)
        return 1
    if tools_missing():
        print(f"soak: {', '.join(tools_missing())} missing: run `make setup`", file=sys.stderr)
        return 1
    seed = arguments.seed if arguments.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)
    print(f"soak: {arguments.rounds} rounds, seed {seed}", flush=True)
    results = []
    failures = 0
    for number in range(1, arguments.rounds + 1):
        try:
            result = one_round(rng)
        except Exception as error:  # a round that breaks is a finding, not the end
            failures += 1
            print(f"round {number}: FAILED: {error}", flush=True)
            traceback.print_exc()
            continue
        results.append(result)
        print(f"round {number}: " + json.dumps(result), flush=True)
    lost = sum(int(r["missing"]) + int(r["missing_after_crash"]) for r in results)
    summary = {
        "rounds": arguments.rounds,
        "failed_rounds": failures,
        "committed_transactions": sum(int(r["committed"]) for r in results),
        "committed_transactions_lost": lost,
    }
    for key in ("outage_s", "failback_s"):
        values = [float(r[key]) for r in results]
        if values:
            summary[f"{key}_median"] = round(statistics.median(values), 2)
            summary[f"{key}_max"] = round(max(values), 2)
    print(json.dumps(summary), flush=True)
    return 0 if lost == 0 and failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
