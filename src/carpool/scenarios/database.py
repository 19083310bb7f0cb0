"""The guide's "Complete HA Example: Database Server", in a lab.

Two nodes, db1 and db2, share the guide's hast.conf resource ``pgdata``
(replication fullsync) over their sync link and a CARP virtual IP on the LAN.
devd follows CARP with the guide's rule and runs the guide's ``db-failover.sh``
(its PostgreSQL lines written for Debian's packages), which makes the node
HAST primary, checks and mounts ``/dev/hast/pgdata`` and starts PostgreSQL.
A client commits numbered transactions through the VIP and keeps a log of the
ones PostgreSQL acknowledged.

:class:`DatabaseScenario` holds the steps; ``make demo`` narrates them, the
end-to-end test and ``make soak`` assert on them: after a crash of the primary
and after a planned failback, every acknowledged transaction is in the table.

Each db node has its own mount namespace with private ``/dev/hast``,
``/run/postgresql`` and ``/var/lib/postgresql``, so the guide's absolute paths
work in both nodes at once and nothing of the host is touched.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from carpool.errors import CarpoolError
from carpool.lab import Lab, LabProcess, Node
from carpool.lab.services import BIN, carp_state, daemon_status, wait_until, write_file

VIP = "10.0.0.100"
RESOURCE = "pgdata"
DISK_SIZE = 320 * 1024 * 1024
DEVICE = f"/dev/hast/{RESOURCE}"

HAST_CONF = """\
# The guide's /etc/hast.conf; `local` is a file in each node's directory.
resource pgdata {{
	on db1 {{
		local {db1}/pgdata.img
		remote 192.168.255.2
	}}
	on db2 {{
		local {db2}/pgdata.img
		remote 192.168.255.1
	}}
	replication fullsync
}}
"""

# preempt stays off: a node that comes back must not take the VIP (and the HAST
# primary role) before it has resynced; failback is an operator's decision.
RC_CONF = """\
ifconfig_em0="inet 10.0.0.{n} netmask 255.255.255.0"
ifconfig_em0_alias0="vhid 1 advskew {skew} pass secretpass alias 10.0.0.100/32"
net.inet.carp.preempt=0
"""

DEVD_CONF = """\
notify 100 {{
	match "system" "IFNET";
	match "subsystem" "carp0";
	match "type" "LINK_UP";
	action "{script} master";
}};
notify 100 {{
	match "system" "IFNET";
	match "subsystem" "carp0";
	match "type" "LINK_DOWN";
	action "{script} slave";
}};
"""

# The guide's db-failover.sh; the PostgreSQL lines are Debian's (pg_ctl of the
# packaged major version, the data directory under /var/lib/postgresql).
FAILOVER_SCRIPT = """\
#!/bin/sh
PGBIN=/usr/lib/postgresql/{version}/bin
PGDATA=/var/lib/postgresql/{version}/main
case "$1" in
master)
	logger "DB failover: becoming master"
	hastctl role primary pgdata
	sleep 3
	fsck -y /dev/hast/pgdata
	mount /dev/hast/pgdata $PGDATA
	runuser -u postgres -- $PGBIN/pg_ctl -D $PGDATA -l /run/postgresql/server.log -w -t 120 start
	;;
slave)
	logger "DB failover: becoming slave"
	runuser -u postgres -- $PGBIN/pg_ctl -D $PGDATA -m fast -w -t 60 stop
	sleep 2
	umount -f $PGDATA
	hastctl role secondary pgdata
	;;
esac
"""

POSTGRESQL_CONF = """
listen_addresses = '*'
unix_socket_directories = '/run/postgresql'
max_connections = 20
shared_buffers = 16MB
fsync = on
synchronous_commit = on
full_page_writes = on
"""


def postgresql_version() -> str:
    """The packaged PostgreSQL major version (Debian 12: 15)."""
    root = Path("/usr/lib/postgresql")
    versions = sorted((p.name for p in root.glob("*") if (p / "bin" / "pg_ctl").exists()),
                      key=lambda v: int(v) if v.isdigit() else 0)  # fmt: skip
    if not versions:
        raise CarpoolError("PostgreSQL is not installed: run `make setup`")
    return versions[-1]


@dataclass
class Verification:
    committed: int  #: transactions the client saw acknowledged
    present: int  #: of those, found in the table
    missing: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing


Narrate = Callable[[str], None]


class DatabaseScenario:
    def __init__(self, lab: Lab, narrate: Narrate | None = None) -> None:
        self.lab = lab
        self.narrate: Narrate = narrate or (lambda text: None)
        self.version = postgresql_version()
        self.pgdata = f"/var/lib/postgresql/{self.version}/main"
        self.db: dict[str, Node] = {}
        self.client: Node | None = None
        self.client_process: LabProcess | None = None
        self.committed_log: Path | None = None
        self.timeline: list[tuple[float, str]] = []
        self.started = time.monotonic()

    # -- helpers ----------------------------------------------------------------------------

    def note(self, text: str) -> None:
        self.timeline.append((time.monotonic() - self.started, text))
        self.narrate(text)

    def environment(self, node: Node) -> dict[str, str]:
        return {
            "CARPOOL_RUN_DIR": str(node.dir),
            "CARPOOL_HAST_CONF": str(node.dir / "hast.conf"),
            "PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin",
        }

    def run(self, node: Node, command: list[str] | str, **options: Any) -> str:
        return node.run(command, env=self.environment(node), **options).stdout

    def hast(self, node: Node) -> dict[str, Any]:
        result = node.run([str(BIN / "hastctl"), "-j", "status", RESOURCE], check=False,
                          env=self.environment(node))  # fmt: skip
        if result.returncode != 0:
            return {}
        return dict(json.loads(result.stdout)[0])

    def sql(self, query: str, timeout: float = 30.0) -> str:
        assert self.client is not None
        return self.client.run(["psql", "-h", VIP, "-U", "postgres", "-At", "-c", query],
                               timeout=timeout).stdout  # fmt: skip

    def database_answers(self) -> bool:
        assert self.client is not None
        result = self.client.run(["psql", "-h", VIP, "-U", "postgres", "-At", "-c",
                                  "SELECT 1"], check=False, timeout=10)  # fmt: skip
        return result.returncode == 0 and result.stdout.strip() == "1"

    def postgres_running(self, node: Node) -> bool:
        """pg_ctl status on the node's own data directory (its own mount namespace)."""
        pg_ctl = f"/usr/lib/postgresql/{self.version}/bin/pg_ctl"
        result = node.run(["runuser", "-u", "postgres", "--", pg_ctl, "status", "-D",
                           self.pgdata], check=False)  # fmt: skip
        return result.returncode == 0

    # -- building ---------------------------------------------------------------------------

    def build(self) -> None:
        lab = self.lab
        lab.network("lan")
        lab.network("sync")
        for name in ("db1", "db2"):
            node = lab.node(name, mount_namespace=True)
            lab.attach(node, "lan", ifname="em0")
            lab.attach(node, "sync", ifname="em1")
            self.db[name] = node
        self.client = lab.node("client")
        lab.attach(self.client, "lan", ifname="em0", host=10)
        text = HAST_CONF.format(db1=self.db["db1"].dir, db2=self.db["db2"].dir)
        script_text = FAILOVER_SCRIPT.format(version=self.version)
        for number, node in enumerate(self.db.values(), start=1):
            write_file(node, "hast.conf", text)
            write_file(node, "rc.conf", RC_CONF.format(n=number, skew=0 if number == 1 else 100))
            script = write_file(node, "db-failover.sh", script_text)
            script.chmod(0o755)
            write_file(node, "devd.conf", DEVD_CONF.format(script=script))
            with open(node.dir / "pgdata.img", "wb") as image:
                image.truncate(DISK_SIZE)
            self.run(node, [str(BIN / "hastctl"), "create", RESOURCE])
            self.private_mounts(node)
        self.note("built db1 and db2 (LAN 10.0.0.0/24, sync 192.168.255.0/24) and a client")

    def private_mounts(self, node: Node) -> None:
        """/dev/hast, /run/postgresql and /var/lib/postgresql of this node only."""
        Path("/dev/hast").mkdir(exist_ok=True)  # the mount point; stays empty on the host
        script = (
            "mount -t tmpfs -o mode=755 tmpfs /dev/hast && "
            "mount -t tmpfs -o mode=2775 tmpfs /run/postgresql && "
            "chown postgres:postgres /run/postgresql && "
            "mount -t tmpfs -o mode=755 tmpfs /var/lib/postgresql && "
            f"mkdir -p {self.pgdata} && chown -R postgres:postgres /var/lib/postgresql && "
            f"chmod 700 {self.pgdata}"
        )
        node.run(["sh", "-c", script])

    def start_hastd(self, node: Node) -> None:
        node.spawn([str(BIN / "hastd"), "-c", str(node.dir / "hast.conf"), "--run-dir",
                    str(node.dir), "--dev-dir", "/dev/hast"], name="hastd",
                   env=self.environment(node))  # fmt: skip
        wait_until(lambda: daemon_status(node, "hastd") is not None, 20, f"hastd on {node.name}")

    def start_automation(self, node: Node) -> None:
        """devd (the guide's rule) and then carpd (the guide's CARP lines)."""
        node.spawn([str(BIN / "devd"), "-f", str(node.dir / "devd.conf"), "--run-dir",
                    str(node.dir), "--timeout", "180"], name="devd",
                   env=self.environment(node))  # fmt: skip
        wait_until(lambda: daemon_status(node, "devd") is not None, 20, f"devd on {node.name}")
        conf = node.dir / "rc.conf"
        cleanup = f"{BIN / 'carpctl'} -f {conf} cleanup"
        node.spawn([str(BIN / "carpool"), "supervise", "--exec-stop-post", cleanup, "--",
                    str(BIN / "carpd"), "-f", str(conf), "--run-dir", str(node.dir)],
                   name="carpd", env=self.environment(node))  # fmt: skip

    def initialize_database(self) -> None:
        """Once: a filesystem on pgdata, a PostgreSQL cluster in it, the ledger table."""
        db1, db2 = self.db["db1"], self.db["db2"]
        hastctl = str(BIN / "hastctl")
        self.run(db2, [hastctl, "role", "secondary", RESOURCE])
        self.run(db1, [hastctl, "role", "primary", RESOURCE])
        wait_until(lambda: self.hast(db1).get("status") == "complete", 30, "pgdata complete")
        pgbin = f"/usr/lib/postgresql/{self.version}/bin"
        steps = [
            f"mkfs.ext4 -q {DEVICE}",
            f"mount {DEVICE} {self.pgdata}",
            f"chown postgres:postgres {self.pgdata} && chmod 700 {self.pgdata}",
            f"rmdir {self.pgdata}/lost+found",
            f"runuser -u postgres -- {pgbin}/initdb -D {self.pgdata} -A trust -U postgres "
            "--no-instructions >/dev/null",
            f"cat >> {self.pgdata}/postgresql.conf <<'EOF'{POSTGRESQL_CONF}EOF",
            f"echo 'host all all 10.0.0.0/24 trust' >> {self.pgdata}/pg_hba.conf",
            f"runuser -u postgres -- {pgbin}/pg_ctl -D {self.pgdata} -l "
            "/run/postgresql/server.log -w start >/dev/null",
            f"runuser -u postgres -- {pgbin}/psql -h /run/postgresql -c "
            "'CREATE TABLE ledger (n bigint PRIMARY KEY, at timestamptz DEFAULT now())' "
            ">/dev/null",
            f"runuser -u postgres -- {pgbin}/pg_ctl -D {self.pgdata} -m fast -w stop >/dev/null",
            f"umount {self.pgdata}",
        ]
        for step in steps:
            self.run(db1, ["sh", "-c", step], timeout=120)
        self.run(db1, [hastctl, "role", "secondary", RESOURCE])
        self.note(f"pgdata: ext4 and a PostgreSQL {self.version} cluster, replicated to db2")

    def bring_up(self) -> None:
        """The pair as it runs in production: db1 MASTER with the database, db2 BACKUP."""
        self.build()
        for node in self.db.values():
            self.start_hastd(node)
        self.initialize_database()
        db1, db2 = self.db["db1"], self.db["db2"]
        self.start_automation(db1)
        wait_until(lambda: carp_state(db1) == "MASTER", 30, "db1 MASTER")
        self.start_automation(db2)
        wait_until(lambda: carp_state(db2) == "BACKUP", 30, "db2 BACKUP")
        wait_until(self.database_answers, 90, "PostgreSQL behind the VIP")
        self.note("db1 is CARP MASTER and HAST primary; PostgreSQL answers on 10.0.0.100")

    # -- the client -------------------------------------------------------------------------

    def start_client(self) -> None:
        assert self.client is not None
        self.committed_log = self.client.dir / "committed.log"
        self.client_process = self.client.spawn(
            [sys.executable, "-m", "carpool.scenarios.dbclient", "--host", VIP, "--log",
             str(self.committed_log)], name="dbclient",
        )  # fmt: skip
        self.note("the client commits a transaction every 20 ms through the VIP")

    def committed(self) -> list[int]:
        if self.committed_log is None or not self.committed_log.exists():
            return []
        text = self.committed_log.read_text()
        return [int(line) for line in text.splitlines() if line.strip()]

    def wait_for_commits(self, more: int, timeout: float = 120.0) -> None:
        target = len(self.committed()) + more
        wait_until(lambda: len(self.committed()) >= target, timeout,
                   f"{more} more committed transactions")  # fmt: skip

    def stop_client(self) -> dict[str, Any]:
        process = self.client_process
        if process is None:
            return {}
        process.terminate(timeout=30)
        self.client_process = None
        lines = [line for line in process.output().splitlines() if line.startswith("{")]
        return dict(json.loads(lines[-1])) if lines else {}

    def verify(self) -> Verification:
        """Every transaction the client saw committed is in the table."""
        committed = self.committed()
        rows = {int(x) for x in self.sql("SELECT n FROM ledger", timeout=60).split()}
        missing = [n for n in committed if n not in rows]
        return Verification(len(committed), len(committed) - len(missing), missing)

    # -- faults and operations ------------------------------------------------------------

    def crash(self, name: str = "db1") -> float:
        """The node dies; returns the seconds until the database answered again."""
        node = self.db[name]
        other = self.db["db2" if name == "db1" else "db1"]
        started = time.monotonic()
        self.lab.crash(node)
        self.note(f"{name} crashed: links down, every process killed")
        wait_until(lambda: carp_state(other) == "MASTER", 30, f"{other.name} MASTER")
        self.note(f"{other.name} is CARP MASTER; devd runs db-failover.sh master")
        wait_until(lambda: self.hast(other).get("role") == "primary", 60,
                   f"{other.name} HAST primary")  # fmt: skip
        wait_until(self.database_answers, 180, "PostgreSQL on the survivor")
        outage = time.monotonic() - started
        self.note(f"{other.name}: HAST primary, fsck, mounted, PostgreSQL up "
                  f"{outage:.1f} s after the crash")  # fmt: skip
        return outage

    def recover(self, name: str = "db1") -> None:
        """The crashed node reboots and rejoins as HAST secondary and CARP BACKUP."""
        node = self.db[name]
        primary = self.db["db2" if name == "db1" else "db1"]
        node.reboot()
        for ifname in ("em0", "em1"):
            self.lab.link_up(node, ifname)
        self.private_mounts(node)
        self.start_hastd(node)
        self.run(node, [str(BIN / "hastctl"), "role", "secondary", RESOURCE])
        self.note(f"{name} rebooted: hastd up, role secondary")
        wait_until(lambda: self.hast(primary).get("status") == "complete"
                   and not self.hast(primary).get("resyncing"), 180,
                   "the resync to finish")  # fmt: skip
        sent = self.hast(primary).get("sync_bytes_sent", 0)
        self.note(f"{primary.name} resynced {name}: {sent / 1048576:.1f} MiB of dirty extents")
        self.start_automation(node)
        wait_until(lambda: carp_state(node) == "BACKUP", 30, f"{name} BACKUP")
        self.note(f"{name} is CARP BACKUP (no preemption): the pair is whole again")

    def failback(self, to: str = "db1") -> float:
        """Planned: the serving node stops the database and becomes HAST secondary
        (db-failover.sh slave), then hands the VIP over; the other takes everything."""
        node = self.db[to]
        serving = self.db["db2" if to == "db1" else "db1"]
        started = time.monotonic()
        self.run(serving, [str(serving.dir / "db-failover.sh"), "slave"], timeout=120,
                 check=False)  # fmt: skip
        self.note(f"{serving.name}: db-failover.sh slave (PostgreSQL stopped, HAST secondary)")
        self.run(serving, [str(BIN / "carpctl"), "em0", "vhid", "1", "state", "backup"])
        wait_until(lambda: carp_state(node) == "MASTER", 30, f"{to} MASTER")
        self.note(f"{serving.name} handed the VIP over: {to} is CARP MASTER")
        wait_until(self.database_answers, 180, f"PostgreSQL on {to}")
        seconds = time.monotonic() - started
        self.note(f"{to} serves the database again, {seconds:.1f} s after the handover began")
        return seconds


def tools_missing() -> list[str]:
    tools = ("nbdfuse", "losetup", "mkfs.ext4", "fsck", "psql", "runuser")
    return [tool for tool in tools if shutil.which(tool) is None]
