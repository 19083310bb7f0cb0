"""The guide's relayd.conf as written, in the lab: TLS relay on 443, nftables redirect on 80.

Topology as a relayd firewall would sit: the client on its own network
(192.168.50.0/24) reaches the CARP address 10.0.0.100 through the relayd node,
which routes to the web servers 10.0.0.10-12 (their replies go back through it,
so the redirect's DNAT is undone on the way out).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

from carpool.lab import Lab, Node
from carpool.lab.services import wait_until
from tests.integration.test_relayd_http import (
    make_certificate,
    relayctl,
    run_client,
    start_backend,
    start_relayd,
)

SEED_CONF = Path(__file__).parent.parent / "unit" / "data" / "relayd" / "seed.conf"

HTTPS = '''
import json, socket, ssl, sys
context = ssl.create_default_context(cafile=sys.argv[1])
out = []
for _ in range(int(sys.argv[2])):
    with socket.create_connection(("10.0.0.100", 443), timeout=10) as raw:
        port = raw.getsockname()[1]
        with context.wrap_socket(raw, server_hostname="10.0.0.100") as s:
            s.sendall(b"GET / HTTP/1.1\\r\\nHost: www\\r\\nConnection: close\\r\\n\\r\\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\\r\\n\\r\\n")
    out.append({"status": head.split(b" ")[1].decode(), "port": port,
                **json.loads(body)})
print(json.dumps(out))
'''

PLAIN = '''
import json, sys, urllib.request
names = []
for _ in range(int(sys.argv[1])):
    with urllib.request.urlopen("http://10.0.0.100/", timeout=10) as r:
        names.append(json.loads(r.read())["name"])
print(json.dumps(names))
'''


def nft_table(node: Node) -> str:
    return node.run(["nft", "list", "table", "ip", "relayd"], check=False).stdout


def test_seed_relayd_conf_serves_tls_relay_and_nftables_redirect() -> None:
    with Lab() as lab:
        lab.network("lan")
        lab.network("wan", subnet4="192.168.50.0/24")
        relayd_node = lab.node("relayd")
        lab.attach(relayd_node, "lan", host=100)
        lab.attach(relayd_node, "wan", ifname="em1", host=1)
        relayd_node.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        client = lab.node("client")
        lab.attach(client, "wan", host=50)
        client.run(["ip", "route", "add", "10.0.0.0/24", "via", "192.168.50.1"])
        for number, host in ((1, 10), (2, 11), (3, 12)):
            node = lab.node(f"web{number}")
            lab.attach(node, "lan", host=host)
            node.run(["ip", "route", "add", "192.168.50.0/24", "via", "10.0.0.100"])
            start_backend(node)
        ssl_dir = relayd_node.dir / "ssl"
        cert, _ = make_certificate(ssl_dir, "10.0.0.100")
        process = start_relayd(relayd_node, SEED_CONF.read_text(), "--ssl-dir", str(ssl_dir),
                               hosts=6)  # fmt: skip

        summary = relayctl(relayd_node, "show", "summary").expandtabs(8).splitlines()
        rows = [line.split(None, 3) for line in summary[1:]]
        assert rows[0][:3] == ["1", "redirect", "web_redirect"] and rows[0][3].strip() == "active"
        assert rows[1][:3] == ["2", "table", "webhosts:8080"]
        assert "active (3 hosts)" in summary[2]
        assert any(r[:3] == ["1", "relay", "www"] for r in rows), summary
        hosts = relayctl(relayd_node, "show", "hosts")
        raw_lines = hosts.splitlines()
        assert raw_lines[0] == "Id  \tType    \tName                    \tAvlblty\tStatus"
        host_rows = [line for line in raw_lines if "\thost    \t" in line]
        assert len(host_rows) == 6, hosts  # the redirect's and the relay's table uses
        assert all(row.endswith("\t100.00%\tup") for row in host_rows), hosts
        assert any(line.startswith("\t        \ttotal: ") and line.endswith(" checks")
                   for line in raw_lines), hosts  # fmt: skip

        # relay "www": TLS on 443, X-Forwarded-For/-Port appended, loadbalance keeps the client
        answers = run_client(client, HTTPS, str(cert), "6")
        assert {a["status"] for a in answers} == {"200"}
        assert len({a["name"] for a in answers}) == 1, answers
        for answer in answers:
            assert answer["headers"]["X-Forwarded-For"] == "192.168.50.50"
            assert answer["headers"]["X-Forwarded-Port"] == str(answer["port"])

        # redirect "web_redirect": nftables DNAT spreads new connections over the hosts
        wait_until(lambda: "numgen inc mod 3" in nft_table(relayd_node), 20, "redirect rules")
        names = collections.Counter(run_client(client, PLAIN, "12"))
        assert names == {"web1": 4, "web2": 4, "web3": 4}, names

        # a host taken out: the rules are replaced and it gets no connection
        assert relayctl(relayd_node, "host", "disable", "10.0.0.11") == "command succeeded\n"
        wait_until(lambda: "numgen inc mod 2" in nft_table(relayd_node), 20, "rules without web2")
        names = collections.Counter(run_client(client, PLAIN, "10"))
        assert names == {"web1": 5, "web3": 5}, names
        redirects = relayctl(relayd_node, "show", "redirects")
        assert "\ttotal: 22 sessions\n" in redirects, redirects
        assert relayctl(relayd_node, "redirect", "disable", "web_redirect").endswith("succeeded\n")
        wait_until(lambda: "dnat" not in nft_table(relayd_node), 20, "redirect removed")
        status = json.loads(relayctl(relayd_node, "-j", "show", "redirects"))
        assert status["redirects"][0]["disabled"] is True

        process.terminate()
        assert nft_table(relayd_node) == ""
