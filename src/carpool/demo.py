"""``make demo``: the guide's database server (scenario A), narrated.

db1 and db2 run PostgreSQL on the HAST resource ``pgdata`` behind a CARP VIP,
with the guide's devd rule and db-failover.sh. A client commits transactions
through the VIP; db1 crashes; db2 takes over; db1 comes back, resyncs, and a
planned failback returns the database to it. Every step is timed, and every
transaction the client saw committed is checked in the table. The lab is torn
down at the end, also on failure.
"""

from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.table import Table

from carpool.errors import CarpoolError
from carpool.lab import Lab
from carpool.lab.services import BIN, carp_state
from carpool.scenarios.database import VIP, DatabaseScenario, tools_missing

console = Console(highlight=False, width=None if sys.stdout.isatty() else 110)


class Narrator:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, text: str) -> None:
        console.print(f"[dim]{time.monotonic() - self.started:6.1f} s[/dim]  {text}")

    def step(self, text: str) -> None:
        console.print(f"\n[bold cyan]== {text}[/bold cyan]")


def where(scenario: DatabaseScenario) -> Table:
    table = Table(title="what runs where", title_justify="left")
    for column in ("node", "CARP (vhid 1)", "HAST pgdata", "PostgreSQL"):
        table.add_column(column)
    for name, node in scenario.db.items():
        hast = scenario.hast(node)
        postgres = "running" if scenario.postgres_running(node) else "-"
        table.add_row(name, carp_state(node) or "down",
                      f"{hast.get('role', 'down')} {hast.get('status', '')}",
                      postgres)  # fmt: skip
    return table


def run_demo() -> bool:
    narrate = Narrator()
    with Lab() as lab:
        scenario = DatabaseScenario(lab, narrate)
        try:
            narrate.step("bringing up the guide's database pair")
            scenario.bring_up()
            console.print(where(scenario))
            db1 = scenario.db["db1"]
            status = db1.run([str(BIN / "carpool"), "status", "--run-dir", str(db1.dir)]).stdout
            console.print("[bold]db1# carpool status[/bold]")
            console.print(status.rstrip())
            narrate.step("a client writes through the VIP")
            scenario.start_client()
            scenario.wait_for_commits(50)
            narrate(f"{len(scenario.committed())} transactions committed so far")
            narrate.step("db1 crashes")
            outage = scenario.crash("db1")
            scenario.wait_for_commits(30)
            after_crash = scenario.verify()
            narrate(f"verified: {after_crash.present} of {after_crash.committed} committed "
                    "transactions are in the table")  # fmt: skip
            console.print(where(scenario))
            narrate.step("db1 comes back")
            scenario.recover("db1")
            resynced = scenario.hast(scenario.db["db2"]).get("sync_bytes_sent", 0)
            narrate.step("planned failback to db1")
            failback = scenario.failback("db1")
            scenario.wait_for_commits(30)
            client = scenario.stop_client()
            final = scenario.verify()
            console.print(where(scenario))
        finally:
            scenario.stop_client()
        narrate.step("summary")
        summary = Table(show_header=False)
        summary.add_row("database unavailable after db1's crash", f"{outage:.1f} s")
        summary.add_row("resync when db1 returned", f"{resynced / 1048576:.1f} MiB")
        summary.add_row("planned failback", f"{failback:.1f} s")
        summary.add_row("transactions committed by the client", str(client.get("committed")))
        summary.add_row("longest wait for a commit", f"{client.get('longest_gap_s')} s")
        summary.add_row("committed transactions missing", str(len(final.missing)))
        console.print(summary)
        ok = after_crash.ok and final.ok
        verdict = "[bold green]no committed transaction lost[/bold green]" if ok else (
            "[bold red]committed transactions are missing[/bold red]")  # fmt: skip
        console.print(verdict)
        narrate("tearing the lab down")
    console.print(f"done: the lab is gone (the VIP {VIP} only ever existed inside it)")
    return ok


def main() -> int:
    if os.geteuid() != 0:
        print("demo: run as root (the lab uses network namespaces)", file=sys.stderr)
        return 1
    missing = tools_missing()
    if missing:
        print(f"demo: {', '.join(missing)} missing: run `make setup`", file=sys.stderr)
        return 1
    try:
        return 0 if run_demo() else 1
    except (CarpoolError, AssertionError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
