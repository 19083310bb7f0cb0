"""relayd operations in the lab: prefork workers, forward with tls, relayctl monitor, sessions,
reload, Prometheus metrics, and redirect modes."""

from __future__ import annotations

import collections
import json
import sys
import time

from carpool.lab import Lab
from carpool.lab.services import wait_until, write_file
from tests.integration.test_relayd_http import (
    make_certificate,
    relayctl,
    run_client,
    start_backend,
    start_relayd,
)

CONF = """\
interval 1
timeout 500
prefork 2
log connection
table <webhosts> { 10.0.0.21 10.0.0.22 }
relay "plain" {
	listen on 10.0.0.5 port 80
	forward to <webhosts> port 8080 mode roundrobin check http "/" code 200
}
relay "tlsback" {
	listen on 10.0.0.5 port 81
	forward with tls to <webhosts> port 8443 check tls
}
"""

FETCH = '''
import json, sys, urllib.request
names = []
for _ in range(int(sys.argv[2])):
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        names.append(json.loads(r.read())["name"])
print(json.dumps(names))
'''

HOLD = '''
import json, socket, sys, time
held = [socket.create_connection(("10.0.0.5", 80)) for _ in range(3)]
time.sleep(float(sys.argv[1]))
print(json.dumps(len(held)))
'''


def test_prefork_tls_backends_monitor_sessions_reload_and_metrics() -> None:
    with Lab() as lab:
        lab.network("lan")
        relayd_node = lab.node("relayd")
        lab.attach(relayd_node, "lan", host=5)
        client = lab.node("client")
        lab.attach(client, "lan", host=9)
        for number in (1, 2):
            node = lab.node(f"web{number}")
            lab.attach(node, "lan", host=20 + number)
            start_backend(node)
            tls = make_certificate(node.dir / "ssl", str(node.ipv4("lan")))
            start_backend(node, 8443, tls)
        process = start_relayd(relayd_node, CONF, "--metrics", "10.0.0.5:9100", hosts=4)
        workers = relayd_node.run(
            ["pgrep", "-P", str(process.pid), "-f", "relayd.daemon .*[-]-worker"], check=False
        ).stdout.split()
        assert len(workers) == 1, workers  # prefork 2: the parent and one worker

        names = run_client(client, FETCH, "http://10.0.0.5/", "20")
        assert collections.Counter(names) == {"web1": 10, "web2": 10} or len(set(names)) == 2
        names = run_client(client, FETCH, "http://10.0.0.5:81/", "4")
        assert set(names) <= {"web1", "web2"} and len(names) == 4

        def relay_total() -> int:
            data = json.loads(relayctl(relayd_node, "-j", "show", "relays"))
            return int(data["relays"][0]["stats"]["cnt"])

        wait_until(lambda: relay_total() == 20, 20, "sessions of both processes counted")

        holder = client.spawn([sys.executable, "-c", HOLD, "6"], name="hold")
        wait_until(lambda: relayctl(relayd_node, "show", "sessions").count("RUNNING") == 3, 20,
                   "three sessions listed")  # fmt: skip
        sessions = relayctl(relayd_node, "show", "sessions")
        assert "10.0.0.9:" in sessions and "-> 10.0.0.2" in sessions and "\tage 00:00:0" in sessions
        holder.wait(30)

        monitor = relayd_node.spawn([sys.executable, "-m", "carpool.relayd.ctl", "--run-dir",
                                     str(relayd_node.dir), "monitor"], name="monitor")
        time.sleep(1)
        assert relayctl(relayd_node, "host", "disable", "10.0.0.22") == "command succeeded\n"
        assert monitor.wait_for_output("ctl_host_disable: imsg type 22", 20), monitor.output()
        assert "\tid: " in monitor.output() and "\ttimestamp: " in monitor.output()
        assert set(run_client(client, FETCH, "http://10.0.0.5/", "6")) == {"web1"}
        relayctl(relayd_node, "host", "enable", "10.0.0.22")
        assert monitor.wait_for_output("state: up", 20), monitor.output()
        monitor.terminate()

        metrics = relayd_node.run(["curl", "-s", "http://10.0.0.5:9100/metrics"]).stdout
        assert 'carpool_relayd_host_up{host="10.0.0.21",table="webhosts:8080"} 1.0' in metrics
        assert 'carpool_relayd_relay_sessions_total{relay="plain"}' in metrics

        write_file(relayd_node, "relayd.conf", CONF + 'relay "more" {\n'
                   "\tlisten on 10.0.0.5 port 82\n\tforward to <webhosts> port 8080 check tcp\n}\n")
        assert relayctl(relayd_node, "reload") == ""
        wait_until(lambda: "more" in relayctl(relayd_node, "show", "relays"), 20, "reloaded")
        wait_until(lambda: len(run_client(client, FETCH, "http://10.0.0.5:82/", "2")) == 2, 20,
                   "new relay serving")  # fmt: skip
        write_file(relayd_node, "relayd.conf", "relay {\n")
        assert relayctl(relayd_node, "reload") == ""
        assert process.wait_for_output("reload refused, keeping the running configuration", 20)
        assert len(run_client(client, FETCH, "http://10.0.0.5:82/", "2")) == 2
        assert process.running()
        assert "relay plain, session " in process.output()
        assert "unreadable report" not in process.output()


HASH_CONF = """\
interval 1
timeout 500
table <webhosts> { 10.0.0.21 10.0.0.22 10.0.0.23 }
redirect "sticky" {
	listen on 10.0.0.100 port 80
	forward to <webhosts> port 8080 mode source-hash check tcp
}
redirect "least" {
	listen on 10.0.0.100 port 81
	forward to <webhosts> port 8080 mode least-states check tcp
}
"""


def test_redirect_source_hash_keeps_a_client_and_least_states_spreads() -> None:
    with Lab() as lab:
        lab.network("lan")
        lab.network("wan", subnet4="192.168.50.0/24")
        relayd_node = lab.node("relayd")
        lab.attach(relayd_node, "lan", host=100)
        lab.attach(relayd_node, "wan", ifname="em1", host=1)
        relayd_node.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"])
        clients = []
        for number in (1, 2, 3):
            client = lab.node(f"client{number}")
            lab.attach(client, "wan", host=50 + number)
            client.run(["ip", "route", "add", "10.0.0.0/24", "via", "192.168.50.1"])
            clients.append(client)
        for number in (1, 2, 3):
            node = lab.node(f"web{number}")
            lab.attach(node, "lan", host=20 + number)
            node.run(["ip", "route", "add", "192.168.50.0/24", "via", "10.0.0.100"])
            start_backend(node)
        start_relayd(relayd_node, HASH_CONF, hosts=6)
        wait_until(lambda: "jhash ip saddr mod 3" in relayd_node.run(
            ["nft", "list", "table", "ip", "relayd"]).stdout, 20, "source-hash rules")
        for client in clients:
            names = run_client(client, FETCH, "http://10.0.0.100/", "6")
            assert len(set(names)) == 1, names
        names = run_client(clients[0], FETCH, "http://10.0.0.100:81/", "6")
        assert len(names) == 6 and set(names) <= {"web1", "web2", "web3"}


SNI_CONF = """\
interval 1
timeout 500
table <webhosts> {{ 10.0.0.21 }}
http protocol "https" {{
	tls keypair "one.test"
	tls keypair "two.test"
	tls {{ no tlsv1.2 }}
	match request header append "X-Forwarded-For" value "$REMOTE_ADDR"
}}
relay "sni" {{
	listen on 10.0.0.5 port 443 tls
	protocol "https"
	forward to <webhosts> port 8080 check tcp
}}
"""

SNI_CLIENT = '''
import json, socket, ssl, sys
out = {}
for name in ("one.test", "two.test", "other.test"):
    context = ssl.create_default_context(cafile=sys.argv[1] if name != "two.test" else sys.argv[2])
    context.check_hostname = name != "other.test"
    with socket.create_connection(("10.0.0.5", 443), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=name) as s:
            cert = s.getpeercert()
            s.sendall(b"GET / HTTP/1.1\\r\\nHost: x\\r\\nConnection: close\\r\\n\\r\\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            out[name] = [dict(x[0] for x in cert["subject"])["commonName"], s.version(),
                         json.loads(data.partition(b"\\r\\n\\r\\n")[2])["headers"]["X-Forwarded-For"]]
print(json.dumps(out))
'''


def test_tls_keypairs_are_chosen_by_sni() -> None:
    with Lab() as lab:
        lab.network("lan")
        relayd_node = lab.node("relayd")
        lab.attach(relayd_node, "lan", host=5)
        client = lab.node("client")
        lab.attach(client, "lan", host=9)
        web = lab.node("web1")
        lab.attach(web, "lan", host=21)
        start_backend(web)
        ssl_dir = relayd_node.dir / "ssl"
        one, _ = make_certificate(ssl_dir, "one.test")
        two, _ = make_certificate(ssl_dir, "two.test")
        start_relayd(relayd_node, SNI_CONF.format(), "--ssl-dir", str(ssl_dir), hosts=1)
        out = run_client(client, SNI_CLIENT, str(one), str(two))
        assert out["one.test"] == ["one.test", "TLSv1.3", "10.0.0.9"]
        assert out["two.test"] == ["two.test", "TLSv1.3", "10.0.0.9"]
        assert out["other.test"][0] == "one.test"  # no match: the first keypair
