"""The guide's "HA Load Balancer Pair", in a lab.

Two load balancers, lb1 and lb2, run the guide's relayd.conf unchanged (TLS relay
``www`` on 10.0.0.100:443, nftables redirect ``web_redirect`` on port 80, table
``webhosts`` of web1-3 at 10.0.0.10-12), carpd for the addresses they share, and
pfsyncd over their sync link. The client sits on its own network
(192.168.50.0/24) and reaches 10.0.0.100 through the pair's gateway address
192.168.50.254; the web servers answer through 10.0.0.100, so every redirected
connection crosses the master in both directions and lives in its conntrack table.

Both balancers forward with a strict stateful ruleset (new connections only from
the client side, ``ct state invalid drop``, ``nf_conntrack_tcp_loose=0``): a
connection survives the master's death only if pfsyncd gave the backup its state.
relayd listens on 10.0.0.100 on both nodes (``net.ipv4.ip_nonlocal_bind=1``, the
usual Linux setting for services on a VIP), so the backup serves the moment CARP
gives it the address.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from carpool.errors import CarpoolError
from carpool.lab import Lab, LabProcess, Node
from carpool.lab.services import BIN, carp_state, daemon_status, wait_until, write_file
from carpool.scenarios.database import Narrate

VIP = "10.0.0.100"
GATEWAY = "192.168.50.254"
KEY = "the pair's pfsync key: change it"
WEB = {"web1": 10, "web2": 11, "web3": 12}

# The guide's relayd.conf, as written.
RELAYD_CONF = """\
# Macros
ext_addr = "10.0.0.100"   # CARP virtual IP
web1 = "10.0.0.10"
web2 = "10.0.0.11"
web3 = "10.0.0.12"

# Health checks
http protocol "http_check" {
    match request header append "X-Forwarded-For" value "$REMOTE_ADDR"
    match request header append "X-Forwarded-Port" value "$REMOTE_PORT"
    match response header "Content-Type" value "text/html*"
}

# Backend table
table <webhosts> { $web1 $web2 $web3 }

# Relay
relay "www" {
    listen on $ext_addr port 443 tls
    protocol "http_check"
    forward to <webhosts> port 8080 mode loadbalance check http "/" code 200
}

# Redirect (layer 3)
redirect "web_redirect" {
    listen on $ext_addr port 80
    forward to <webhosts> port 8080 check http "/" code 200
}
"""

RC_CONF = """\
ifconfig_em0="inet 10.0.0.{n} netmask 255.255.255.0"
ifconfig_em0_alias0="vhid 1 advskew {skew} pass secretpass alias 10.0.0.100/32"
ifconfig_em1="inet 192.168.50.{n} netmask 255.255.255.0"
ifconfig_em1_alias0="vhid 2 advskew {skew} pass secretpass alias 192.168.50.254/32"
net.inet.carp.preempt=1
pfsync_enable="YES"
pfsync_syncdev="em2"
pfsync_syncpeer="192.168.255.{peer}"
pfsync_key="{key}"
"""

RULESET = """\
flush ruleset
table inet lbfilter {
  chain forward {
    type filter hook forward priority 0; policy drop;
    ct state invalid counter drop
    ct state established,related counter accept
    iifname "em1" oifname "em0" ct state new counter accept
  }
}
"""

SYSCTLS = ("net.ipv4.ip_forward=1", "net.netfilter.nf_conntrack_tcp_loose=0",
           "net.ipv4.ip_nonlocal_bind=1")  # fmt: skip


def make_certificate(directory: Path, name: str) -> None:
    """A self-signed certificate where relayd looks: NAME.crt and private/NAME.key."""
    (directory / "private").mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=IP:{name}",
         "-keyout", str(directory / "private" / f"{name}.key"),
         "-out", str(directory / f"{name}.crt")],
        check=True, capture_output=True,
    )  # fmt: skip


class LoadBalancerScenario:
    def __init__(self, lab: Lab, narrate: Narrate | None = None) -> None:
        self.lab = lab
        self.narrate: Narrate = narrate or (lambda text: None)
        self.lb: dict[str, Node] = {}
        self.web: dict[str, Node] = {}
        self.client: Node | None = None
        self.client_process: LabProcess | None = None
        self.status_path: Path | None = None
        self.started = time.monotonic()

    def note(self, text: str) -> None:
        self.narrate(text)

    def ctl(self, node: Node, program: str, *words: str) -> Any:
        result = node.run([str(BIN / program), "--run-dir", str(node.dir), *words],
                          check=False)  # fmt: skip
        if result.returncode != 0:
            return None
        return json.loads(result.stdout) if result.stdout.strip().startswith(("{", "[")) else (
            result.stdout)  # fmt: skip

    def pfsync(self, node: Node) -> dict[str, Any]:
        status = self.ctl(node, "pfsyncctl", "-j", "status")
        return status if isinstance(status, dict) else {}

    # -- building ---------------------------------------------------------------------------

    def build(self) -> None:
        lab = self.lab
        lab.network("lan")
        lab.network("wan", subnet4="192.168.50.0/24")
        lab.network("sync")
        ssl_dir = lab.directory / "ssl"
        make_certificate(ssl_dir, VIP)
        for number, name in ((1, "lb1"), (2, "lb2")):
            node = lab.node(name)
            lab.attach(node, "lan", ifname="em0", host=number)
            lab.attach(node, "wan", ifname="em1", host=number)
            lab.attach(node, "sync", ifname="em2", host=number)
            for setting in SYSCTLS:
                node.run(["sysctl", "-q", "-w", setting])
            node.run(["nft", "-f", "-"], input=RULESET)
            write_file(node, "rc.conf", RC_CONF.format(
                n=number, skew=0 if number == 1 else 100, peer=3 - number, key=KEY))  # fmt: skip
            write_file(node, "relayd.conf", RELAYD_CONF)
            self.lb[name] = node
        for name, host in WEB.items():
            node = lab.node(name)
            lab.attach(node, "lan", ifname="em0", host=host)
            node.run(["ip", "route", "add", "192.168.50.0/24", "via", VIP])
            process = node.spawn([sys.executable, "-m", "carpool.scenarios.web", "serve", name,
                                  "8080"], name="web")  # fmt: skip
            if not process.wait_for_output("listening", 20):
                raise CarpoolError(f"{name}: the web server did not start: {process.output()}")
            self.web[name] = node
        self.client = lab.node("client")
        lab.attach(self.client, "wan", ifname="em0", host=50)
        self.client.run(["ip", "route", "add", "10.0.0.0/24", "via", GATEWAY])
        self.note("built lb1 and lb2, web1-3 (10.0.0.10-12) and a client (192.168.50.50)")

    def start_daemons(self, node: Node) -> None:
        """pfsyncd first (it demotes CARP until its bulk update), then relayd and carpd."""
        conf = node.dir / "rc.conf"
        node.spawn([str(BIN / "pfsyncd"), "-f", str(conf), "--run-dir", str(node.dir)],
                   name="pfsyncd")  # fmt: skip
        wait_until(lambda: daemon_status(node, "pfsyncd") is not None, 20, "pfsyncd")
        node.spawn([str(BIN / "relayd"), "-f", str(node.dir / "relayd.conf"), "--run-dir",
                    str(node.dir), "--ssl-dir", str(self.lab.directory / "ssl")],
                   name="relayd")  # fmt: skip
        wait_until(lambda: daemon_status(node, "relayd") is not None, 20, "relayd")
        cleanup = f"{BIN / 'carpctl'} -f {conf} cleanup"
        node.spawn([str(BIN / "carpool"), "supervise", "--exec-stop-post", cleanup, "--",
                    str(BIN / "carpd"), "-f", str(conf), "--run-dir", str(node.dir)],
                   name="carpd")  # fmt: skip

    def hosts_up(self, node: Node) -> int:
        text = self.ctl(node, "relayctl", "show", "hosts")
        return text.count("\tup") if isinstance(text, str) else 0

    def bring_up(self) -> None:
        self.build()
        for node in self.lb.values():
            self.start_daemons(node)
        lb1, lb2 = self.lb["lb1"], self.lb["lb2"]
        for node in (lb1, lb2):
            wait_until(lambda node=node: self.hosts_up(node) >= 6, 60,  # type: ignore[misc]
                       f"relayd on {node.name} to see the web servers")  # fmt: skip
        wait_until(lambda: carp_state(lb1) == "MASTER" and carp_state(lb1, "em1", 2) == "MASTER",
                   90, "lb1 MASTER of both addresses")  # fmt: skip
        wait_until(lambda: carp_state(lb2) == "BACKUP", 60, "lb2 BACKUP")
        self.note("lb1 is CARP MASTER of 10.0.0.100 and 192.168.50.254; lb2 BACKUP; "
                  "pfsyncd in step on the sync link")  # fmt: skip

    # -- the client -------------------------------------------------------------------------

    def start_client(self, long_lived: int = 20) -> None:
        assert self.client is not None
        self.status_path = self.client.dir / "client.json"
        self.client_process = self.client.spawn(
            [sys.executable, "-m", "carpool.scenarios.web", "client", "--status",
             str(self.status_path), "--long-lived", str(long_lived)], name="webclient",
        )  # fmt: skip
        self.note(f"the client holds {long_lived} keep-alive connections through the redirect "
                  "and runs an HTTPS request loop through the relay")  # fmt: skip

    def client_status(self) -> dict[str, Any]:
        if self.status_path is None or not self.status_path.exists():
            return {}
        try:
            return dict(json.loads(self.status_path.read_text()))
        except ValueError:
            return {}

    def wait_for_traffic(self, keep_each: int = 5, loop: int = 20) -> dict[str, Any]:
        """Until every long-lived connection got ``keep_each`` more answers and the loop
        ``loop`` more."""
        start = self.client_status()
        keep0 = start.get("keep_answers", [])
        loop0 = start.get("loop_answers", 0)

        def enough() -> bool:
            now = self.client_status()
            keep = now.get("keep_answers", [])
            return (
                bool(keep) and len(keep) == len(keep0 or keep)
                and all(k - (keep0[i] if keep0 else 0) >= keep_each for i, k in enumerate(keep))
                and now.get("loop_answers", 0) - loop0 >= loop
            )  # fmt: skip

        wait_until(enough, 120, "traffic through the pair")
        return self.client_status()

    def stop_client(self) -> dict[str, Any]:
        process = self.client_process
        if process is not None:
            process.terminate(timeout=30)
            self.client_process = None
        return self.client_status()

    # -- the fault --------------------------------------------------------------------------

    def crash(self, name: str = "lb1") -> float:
        node = self.lb[name]
        other = self.lb["lb2" if name == "lb1" else "lb1"]
        states = self.pfsync(other).get("states", "?")
        self.note(f"{other.name} holds {states} states from pfsync")
        started = time.monotonic()
        self.lab.crash(node)
        self.note(f"{name} crashed: links down, every process killed")
        wait_until(lambda: carp_state(other) == "MASTER"
                   and carp_state(other, "em1", 2) == "MASTER", 30,
                   f"{other.name} MASTER")  # fmt: skip
        seconds = time.monotonic() - started
        self.note(f"{other.name} is CARP MASTER of both addresses {seconds:.1f} s after the crash")
        return seconds
