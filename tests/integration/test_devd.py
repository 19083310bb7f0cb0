"""devd and ifstated on the real kernel, driven by carpd's events and netlink links."""

from __future__ import annotations

from pathlib import Path

from carpool.lab import Lab, Node
from carpool.lab.registry import namespace_pids
from carpool.lab.services import (
    BIN,
    carpctl,
    daemon_status,
    seed_lan,
    start_carpd,
    start_devd,
    start_ifstated,
    wait_carp_state,
    wait_until,
    write_file,
)

CARP = """\
ifconfig_em0="inet 10.0.0.{n} netmask 255.255.255.0"
ifconfig_em0_alias0="vhid 1 advskew {skew} pass secretpass alias 10.0.0.100/32"
net.inet.carp.preempt=1
"""

# The guide's /etc/devd/carp-hast.conf, as it prints it (one line), script path changed.
SEED_DEVD = (
    'notify 100 { match "system" "IFNET"; match "subsystem" "carp0"; match "type" "LINK_UP"; '
    'action "SWITCH master"; }; notify 100 { match "system" "IFNET"; match "subsystem" "carp0"; '
    'match "type" "LINK_DOWN"; action "SWITCH slave"; };\n'
)

# The guide's carp-hast-switch, unchanged.
SEED_SWITCH = """#!/bin/sh
case "$1" in
master)
logger "CARP: Promoting to master"
hastctl role primary shared_storage
sleep 2
mount /dev/hast/shared_storage /shared
# Start services that depend on shared storage
service postgresql start
;;
slave)
logger "CARP: Demoting to slave"
service postgresql stop
umount -f /shared
hastctl role secondary shared_storage
;;
esac
"""

# Stand-ins for the commands the script runs, which record how they were called.
# (hastctl replaces these once HAST has landed.)
STAND_IN = '#!/bin/sh\necho "$(basename "$0") $*" >> "{log}"\n'


def commands_in(node: Node) -> list[list[str]]:
    """The command lines of the processes running in the node's namespace."""
    commands = []
    for pid in namespace_pids(node.netns):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        commands.append(raw.decode(errors="replace").rstrip("\0").split("\0"))
    return commands


def prepare_switch(node: Node) -> tuple[Path, Path, Path]:
    stand_ins = node.dir / "stand-ins"
    stand_ins.mkdir()
    log = node.dir / "commands.log"
    log.write_text("")
    for name in ("logger", "hastctl", "mount", "umount", "service"):
        path = stand_ins / name
        path.write_text(STAND_IN.format(log=log))
        path.chmod(0o755)
    switch = write_file(node, "carp-hast-switch", SEED_SWITCH)
    switch.chmod(0o755)
    conf = write_file(node, "carp-hast.conf", SEED_DEVD.replace("SWITCH", str(switch)))
    return conf, stand_ins, log


PROMOTE = [
    "logger CARP: Promoting to master",
    "hastctl role primary shared_storage",
    "mount /dev/hast/shared_storage /shared",
    "service postgresql start",
]
DEMOTE = [
    "logger CARP: Demoting to slave",
    "service postgresql stop",
    "umount -f /shared",
    "hastctl role secondary shared_storage",
]


def test_seed_devd_rule_runs_the_switch_script_on_carp_changes() -> None:
    with Lab() as lab:
        seed_lan(lab, client=False)
        node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
        logs = {}
        for node, skew in ((node1, 0), (node2, 100)):
            conf, stand_ins, logs[node.name] = prepare_switch(node)
            start_devd(node, conf, path_prefix=stand_ins)
            wait_until(lambda node=node: daemon_status(node, "devd") is not None)
            start_carpd(node, write_file(node, "rc.conf", CARP.format(n=node.index, skew=skew)))
            wait_carp_state(node, "MASTER" if skew == 0 else "BACKUP")
        # Like FreeBSD's carp, each vhid goes INIT -> BACKUP (LINK_DOWN) first.
        wait_until(lambda: logs["node1"].read_text().splitlines() == DEMOTE + PROMOTE, 15)
        wait_until(lambda: logs["node2"].read_text().splitlines() == DEMOTE, 15, "demotion")
        # node1 is demoted: node2 preempts it; each script runs the other way round.
        carpctl(node1, "-g", "carp", "carpdemote", "240")
        wait_carp_state(node2, "MASTER")
        wait_until(lambda: logs["node2"].read_text().splitlines() == DEMOTE + PROMOTE, 15)
        wait_until(lambda: logs["node1"].read_text().splitlines() == DEMOTE + PROMOTE + DEMOTE)
        assert daemon_status(node1, "devd")["actions_failed"] == 0


GUARD = (Path(__file__).parents[2] / "examples" / "ifstated-splitbrain.conf").read_text()


def test_ifstated_guard_demotes_a_node_that_loses_its_sync_link() -> None:
    with Lab() as lab:
        seed_lan(lab, client=False)
        node1, node2 = lab.nodes["node1"], lab.nodes["node2"]
        for node in (node1, node2):
            lab.attach(node, "sync", ifname="em1")
        start_carpd(node1, write_file(node1, "rc.conf", CARP.format(n=1, skew=0)))
        wait_carp_state(node1, "MASTER")
        start_carpd(node2, write_file(node2, "rc.conf", CARP.format(n=2, skew=100)))
        wait_carp_state(node2, "BACKUP")
        carpctl_words = f"{BIN / 'carpctl'} --run-dir {node1.dir}"
        guard = write_file(node1, "ifstated.conf", GUARD.replace("carpctl", carpctl_words))
        start_ifstated(node1, guard)
        wait_until(lambda: (daemon_status(node1, "ifstated") or {}).get("state") == "synced")
        lab.unplug(node1, "em1")
        wait_carp_state(node2, "MASTER")
        wait_carp_state(node1, "BACKUP")
        assert carpctl(node1, "get", "net.inet.carp.demotion")["net.inet.carp.demotion"] == 240
        assert daemon_status(node1, "ifstated")["state"] == "isolated"
        lab.plug(node1, "em1")
        wait_carp_state(node1, "MASTER")
        wait_carp_state(node2, "BACKUP")
        assert carpctl(node1, "get", "net.inet.carp.demotion")["net.inet.carp.demotion"] == 0


def test_bad_configs_get_line_numbers() -> None:
    with Lab() as lab:
        node = lab.node("node1")
        bad_devd = write_file(node, "bad-devd.conf", 'notify 0 {\n  match "type";\n};\n')
        result = node.run([str(BIN / "devd"), "-n", "-f", str(bad_devd)], check=False)
        assert result.returncode == 1 and "bad-devd.conf:2" in result.stderr, result.stderr
        bad_ifstated = write_file(
            node, "bad-ifstated.conf", "state a {\n  if em1.link.sideways {\n"
        )
        result = node.run([str(BIN / "ifstated"), "-n", "-f", str(bad_ifstated)], check=False)
        assert result.returncode == 1 and "bad-ifstated.conf:2" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_hanging_action_is_killed_and_a_carpd_restart_is_survived() -> None:
    with Lab() as lab:
        seed_lan(lab, routers=1, client=False)
        node = lab.nodes["node1"]
        log = node.dir / "types.log"
        conf = write_file(
            node,
            "devd.conf",
            'notify 10 { match "system" "CARP"; match "type" "MASTER"; '
            f'action "echo $type $subsystem >> {log}; sleep 30"; }};\n',
        )
        devd = start_devd(node, conf, timeout=1.5)
        wait_until(lambda: daemon_status(node, "devd") is not None)
        carpd = start_carpd(node, write_file(node, "rc.conf", CARP.format(n=1, skew=0)))
        wait_carp_state(node, "MASTER")
        wait_until(lambda: (daemon_status(node, "devd") or {}).get("actions_timed_out") == 1)
        assert "killed after" in devd.output()
        carpd.terminate()
        node.processes.remove(carpd)
        start_carpd(node, node.dir / "rc.conf")
        wait_carp_state(node, "MASTER")
        wait_until(lambda: log.read_text().splitlines() == ["MASTER 1@em0"] * 2, 20)
        wait_until(lambda: daemon_status(node, "devd")["actions_timed_out"] == 2)
        assert ["sleep", "30"] not in commands_in(node), "the timed-out action was not killed"
