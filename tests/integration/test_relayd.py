"""relayd's layer-4 relays and health checks in the lab: a client, relayd, three web servers."""

from __future__ import annotations

import collections
import sys

from carpool.lab import Lab, LabProcess, Node
from carpool.lab.services import wait_until, write_file

CONF = """\
interval 1
timeout 500
web1 = "10.0.0.21"
web2 = "10.0.0.22"
web3 = "10.0.0.23"
table <webhosts> { $web1 $web2 $web3 }
relay "www" {
	listen on 10.0.0.5 port 80
	forward to <webhosts> port 8080 mode roundrobin check http "/" code 200
}
"""


def web_server(node: Node) -> LabProcess:
    root = node.dir / "www"
    root.mkdir(exist_ok=True)
    (root / "index.html").write_text(node.name)
    return node.spawn(
        [sys.executable, "-m", "http.server", "8080", "--bind", str(node.ipv4("lan")),
         "--directory", str(root)],
        name="web",
    )  # fmt: skip


def relayctl(node: Node, *words: str) -> str:
    argv = [sys.executable, "-m", "carpool.relayd.ctl", "--run-dir", str(node.dir), *words]
    return node.run(argv).stdout


def fetch(client: Node, count: int) -> collections.Counter[str]:
    script = (
        "import urllib.request, sys\n"
        "for _ in range(int(sys.argv[1])):\n"
        "    print(urllib.request.urlopen('http://10.0.0.5/', timeout=5).read().decode())\n"
    )
    output = client.run([sys.executable, "-c", script, str(count)]).stdout
    return collections.Counter(output.split())


def up_hosts(relayd_node: Node) -> int:
    argv = [sys.executable, "-m", "carpool.relayd.ctl", "--run-dir", str(relayd_node.dir),
            "show", "hosts"]  # fmt: skip
    result = relayd_node.run(argv, check=False)
    return result.stdout.count("\tup") if result.returncode == 0 else -1


def test_relay_balances_over_checked_hosts_and_skips_a_dead_one() -> None:
    with Lab() as lab:
        lab.network("lan")
        relayd_node = lab.node("relayd")
        lab.attach(relayd_node, "lan", host=5)
        client = lab.node("client")
        lab.attach(client, "lan", host=10)
        webs = {}
        for number in (1, 2, 3):
            node = lab.node(f"web{number}")
            lab.attach(node, "lan", host=20 + number)
            webs[node.name] = web_server(node)
        conf = write_file(relayd_node, "relayd.conf", CONF)
        relayd_node.spawn(
            [sys.executable, "-m", "carpool.relayd.daemon", "-f", str(conf),
             "--run-dir", str(relayd_node.dir)],
            name="relayd",
        )  # fmt: skip
        wait_until(lambda: up_hosts(relayd_node) == 3, 20, "three hosts up")
        summary = relayctl(relayd_node, "sh", "su")
        assert "relay" in summary and "www" in summary and "webhosts:8080" in summary
        assert fetch(client, 6) == {"web1": 2, "web2": 2, "web3": 2}

        webs["web2"].kill()
        wait_until(lambda: up_hosts(relayd_node) == 2, 20, "web2 marked down")
        assert "web2" not in fetch(client, 10)

        webs["web2"] = web_server(lab.nodes["web2"])
        wait_until(lambda: up_hosts(relayd_node) == 3, 20, "web2 back up")
        assert fetch(client, 9)["web2"] == 3

        relayctl(relayd_node, "host", "disable", "10.0.0.23")
        assert "web3" not in fetch(client, 6)
        relayctl(relayd_node, "host", "enable", "10.0.0.23")
        wait_until(lambda: "web3" in fetch(client, 3), 20, "web3 used again")


def test_unsupported_parts_and_bad_files_are_refused_clearly() -> None:
    with Lab() as lab:
        node = lab.node("relayd")
        bad = write_file(node, "bad.conf", 'table <t> { 10.0.0.1 }\nrelay "r" {\n  lisen on\n}\n')
        result = node.run([sys.executable, "-m", "carpool.relayd.daemon", "-n", "-f", str(bad)],
                          check=False)  # fmt: skip
        assert result.returncode == 1 and "bad.conf:3" in result.stderr, result.stderr
        routed = write_file(
            node, "route.conf",
            'table <t> { 10.0.0.1 }\nredirect "w" {\n  listen on 10.0.0.5 port 80\n'
            '  route to <t> port 8080 check tcp interface em0\n}\n',
        )  # fmt: skip
        result = node.run([sys.executable, "-m", "carpool.relayd.daemon", "-f", str(routed),
                           "--run-dir", str(node.dir)], check=False)  # fmt: skip
        assert result.returncode == 1 and "route to is not supported" in result.stderr, \
            result.stderr
