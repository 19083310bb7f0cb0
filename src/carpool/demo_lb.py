"""``make demo-lb``: the guide's HA load balancer pair (scenario B), narrated.

lb1 and lb2 run the guide's relayd.conf unchanged with carpd and pfsyncd in front
of three web servers. A client holds long-lived connections through the redirect
and runs an HTTPS request loop through the relay; lb1 crashes; lb2 takes the
addresses with the connection states pfsyncd gave it. The lab is torn down at the
end, also on failure.
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from rich.table import Table

from carpool.demo import Narrator, console
from carpool.errors import CarpoolError
from carpool.lab import Lab
from carpool.lab.services import BIN, carp_state
from carpool.scenarios.loadbalancer import LoadBalancerScenario


def where(scenario: LoadBalancerScenario) -> Table:
    table = Table(title="what runs where", title_justify="left")
    for column in ("node", "CARP vhid 1 / 2", "pfsync states", "relayd hosts up"):
        table.add_column(column)
    for name, node in scenario.lb.items():
        states = scenario.pfsync(node).get("states", "-")
        carp = f"{carp_state(node) or 'down'} / {carp_state(node, 'em1', 2) or 'down'}"
        table.add_row(name, carp, str(states), str(scenario.hosts_up(node) or "-"))
    return table


def run_demo() -> bool:
    narrate = Narrator()
    with Lab() as lab:
        scenario = LoadBalancerScenario(lab, narrate)
        try:
            narrate.step("bringing up the guide's load balancer pair")
            scenario.bring_up()
            console.print(where(scenario))
            lb1 = scenario.lb["lb1"]
            summary = lb1.run([str(BIN / "relayctl"), "--run-dir", str(lb1.dir), "show",
                               "summary"]).stdout  # fmt: skip
            console.print("[bold]lb1# relayctl show summary[/bold]")
            console.print(summary.rstrip())
            narrate.step("a client uses the service")
            scenario.start_client(long_lived=20)
            before = scenario.wait_for_traffic(keep_each=5, loop=20)
            narrate(f"{sum(before['keep_answers'])} answers on the long-lived connections, "
                    f"{before['loop_answers']} requests through the relay")  # fmt: skip
            narrate.step("lb1 crashes")
            takeover = scenario.crash("lb1")
            scenario.wait_for_traffic(keep_each=10, loop=20)
            final = scenario.stop_client()
            console.print(where(scenario))
        finally:
            scenario.stop_client()
        survivors = sum(1 for after, first in zip(final["keep_answers"], before["keep_answers"],
                                                  strict=True) if after > first)  # fmt: skip
        narrate.step("summary")
        table = Table(show_header=False)
        table.add_row("lb2 CARP MASTER after lb1's crash", f"{takeover:.1f} s")
        table.add_row("long-lived connections that carried on",
                      f"{survivors} of {len(final['keep_answers'])}")
        table.add_row("longest wait in the request loop", f"{final['loop_longest_gap_s']} s")
        table.add_row("requests answered", str(final["loop_answers"]))
        table.add_row("requests answered wrongly", str(len(final["wrong_answers"])))
        table.add_row("connection errors", str(len(final["keep_errors"])))
        console.print(table)
        ok = (survivors == len(final["keep_answers"]) and not final["wrong_answers"]
              and not final["keep_errors"])  # fmt: skip
        console.print("[bold green]every connection carried on, no request answered wrongly"
                      "[/bold green]" if ok else "[bold red]connections were lost[/bold red]")
        narrate("tearing the lab down")
    console.print("done: the lab is gone")
    return ok


def main() -> int:
    if os.geteuid() != 0:
        print("demo-lb: run as root (the lab uses network namespaces)", file=sys.stderr)
        return 1
    if shutil.which("openssl") is None:
        print("demo-lb: openssl missing: run `make setup`", file=sys.stderr)
        return 1
    started = time.monotonic()
    try:
        ok = run_demo()
    except (CarpoolError, AssertionError) as error:
        print(f"demo-lb: {error}", file=sys.stderr)
        return 1
    console.print(f"({time.monotonic() - started:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
