#!/usr/bin/env python3
"""carpool's relayd relays and redirects beside HAProxy, against the same nginx backend.

One lab node runs nginx (10.0.0.5:8080, a 75-byte page and a 100 MiB file),
HAProxy 2.x (nbthread 1; tcp mode on :8082, http mode with ``option
forwardfor`` on :8081), and carpool's relayd (one process, uvloop) with a tcp
relay on :8083, an http relay applying the guide's ``http_check`` rules
(X-Forwarded-For and X-Forwarded-Port appended, a response header match) on
:8084, and a redirect of 10.0.0.100:80 to nginx through nftables.  Servers are
pinned to CPU 1, wrk and curl to CPU 0, as in the reference measurements.

Per round, in rotating order: ``wrk -t1 -c50 --latency`` keep-alive against
each target (req/s; proxy CPU µs per request from /proc/PID/stat utime+stime),
then ``curl`` of the 100 MiB file through HAProxy tcp and carpool tcp (MB/s).
Values are medians over rounds; ratios are computed within each round.

usage: relay.py [--quick] [--rounds N] [--duration S] [--no-uvloop]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from carpool.lab import Lab, LabProcess, Node
from carpool.lab.services import wait_until, write_file

ADDRESS = "10.0.0.5"
VIP = "10.0.0.100"
PAGE = b"<html><body>hello from the backend, a small static response.</body></html>\n"

NGINX = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx.error.log;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 100000000;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp;
    fastcgi_temp_path {dir}/tmp;
    uwsgi_temp_path {dir}/tmp;
    scgi_temp_path {dir}/tmp;
    server {{
        listen {address}:8080 backlog=4096;
        root {dir}/www;
    }}
}}
"""

HAPROXY = """\
global
    nbthread 1
    maxconn 4000
defaults
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend fe_http
    mode http
    bind {address}:8081
    option forwardfor
    default_backend be_http
backend be_http
    mode http
    server s1 {address}:8080
frontend fe_tcp
    mode tcp
    bind {address}:8082
    default_backend be_tcp
backend be_tcp
    mode tcp
    server s1 {address}:8080
"""

RELAYD = """\
table <web> {{ {address} }}
http protocol "http_check" {{
    match request header append "X-Forwarded-For" value "$REMOTE_ADDR"
    match request header append "X-Forwarded-Port" value "$REMOTE_PORT"
    match response header "Content-Type" value "text/html*"
}}
relay "tcp" {{
    listen on {address} port 8083
    forward to <web> port 8080 check tcp
}}
relay "http" {{
    listen on {address} port 8084
    protocol "http_check"
    forward to <web> port 8080 check tcp
}}
redirect "rdr" {{
    listen on {vip} port 80
    forward to <web> port 8080 check tcp
}}
"""


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    process: LabProcess | None  #: the proxy whose CPU is counted


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pinned(node: Node, cpu: int, argv: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *argv]


def wrk(node: Node, url: str, seconds: int) -> float:
    out = node.run(pinned(node, 0, ["wrk", "-t1", "-c50", f"-d{seconds}s", "--latency", url]),
                   timeout=seconds + 60).stdout  # fmt: skip
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors[1]} failed responses:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if match is None:
        raise RuntimeError(f"wrk printed no rate for {url}:\n{out}")
    return float(match[1])


def curl(node: Node, url: str) -> float:
    out = node.run(pinned(node, 0, ["curl", "-s", "-o", "/dev/null", "-w", "%{speed_download}",
                                    url]), timeout=120).stdout  # fmt: skip
    return float(out) / 1e6


def top_functions(collapsed: str, count: int = 25) -> str:
    """Self and total sample shares per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    samples = 0
    for line in collapsed.splitlines():
        stack, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        n = int(number)
        samples += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + n
    rows = sorted(own.items(), key=lambda item: -item[1])[:count]
    return "\n".join(f"  self {n / samples:6.1%}  total {total[f] / samples:6.1%}  {f}"
                     for f, n in rows)


def median(values: list[float]) -> float:
    return round(statistics.median(values), 2) if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one short round (about a minute)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--duration", type=int, help="seconds per wrk run")
    parser.add_argument("--no-uvloop", action="store_true", help="carpool on plain asyncio")
    parser.add_argument("--profile", metavar="SECONDS", type=int,
                        help="after the rounds, record py-spy on the http relay under load")
    arguments = parser.parse_args()
    if os.geteuid() != 0:
        print("relay: run as root (network namespaces, nftables)", file=sys.stderr)
        return 1
    rounds = arguments.rounds or (1 if arguments.quick else 3)
    seconds = arguments.duration or (5 if arguments.quick else 10)
    results: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    bulk: dict[str, list[float]] = {}
    ratios: dict[str, list[float]] = {}
    with Lab() as lab:
        lab.network("lan")
        node = lab.node("bench")
        lab.attach(node, "lan", host=5)
        (node.dir / "www").mkdir()
        (node.dir / "tmp").mkdir()
        (node.dir / "www" / "index.html").write_bytes(PAGE)
        with open(node.dir / "www" / "big.bin", "wb") as big:
            big.write(os.urandom(100 << 20))
        fmt = {"dir": node.dir, "address": ADDRESS, "vip": VIP}
        nginx_conf = write_file(node, "nginx.conf", NGINX.format(**fmt))
        haproxy_conf = write_file(node, "haproxy.cfg", HAPROXY.format(**fmt))
        relayd_conf = write_file(node, "relayd.conf", RELAYD.format(**fmt))
        node.spawn(pinned(node, 1, ["nginx", "-c", str(nginx_conf), "-g", "daemon off;"]),
                   name="nginx")  # fmt: skip
        haproxy = node.spawn(pinned(node, 1, ["haproxy", "-f", str(haproxy_conf), "-db"]),
                             name="haproxy")  # fmt: skip
        relayd = node.spawn(pinned(node, 1, [
            sys.executable, "-m", "carpool.relayd.daemon", "-f", str(relayd_conf),
            "--run-dir", str(node.dir), *(["--no-uvloop"] if arguments.no_uvloop else []),
        ]), name="relayd")  # fmt: skip

        def ready() -> bool:
            result = node.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                               f"http://{VIP}/index.html"], check=False)  # fmt: skip
            return result.stdout == "200"

        wait_until(ready, 60, "nginx, haproxy and relayd serving")
        for port in (8081, 8082, 8083, 8084):
            wait_until(lambda p=port: node.run(["curl", "-sf", "-o", "/dev/null",  # type: ignore[misc]
                                                f"http://{ADDRESS}:{p}/index.html"],
                                               check=False).returncode == 0, 30, f"port {port}")
        # direct and redirect stay next to each other in every round (shifts 0, 2, 4),
        # so that their ratio compares like with like on a shared machine
        targets = [
            Target("haproxy_http", f"http://{ADDRESS}:8081/index.html", haproxy),
            Target("haproxy_tcp", f"http://{ADDRESS}:8082/index.html", haproxy),
            Target("carpool_tcp", f"http://{ADDRESS}:8083/index.html", relayd),
            Target("carpool_http", f"http://{ADDRESS}:8084/index.html", relayd),
            Target("direct", f"http://{ADDRESS}:8080/index.html", None),
            Target("carpool_redirect", f"http://{VIP}/index.html", None),
        ]
        for number in range(rounds):
            shift = number * 2 % len(targets)
            this_round: dict[str, float] = {}
            for target in targets[shift:] + targets[:shift]:
                before = cpu_seconds(target.process.pid) if target.process else 0.0
                rate = wrk(node, target.url, seconds)
                after = cpu_seconds(target.process.pid) if target.process else 0.0
                results.setdefault(target.name, []).append(rate)
                this_round[target.name] = rate
                if target.process is not None:
                    per_request = (after - before) / (rate * seconds) * 1e6
                    cpu.setdefault(target.name, []).append(per_request)
                print(f"round {number + 1} {target.name:<17} {rate:9.0f} req/s"
                      + (f"  {cpu[target.name][-1]:5.1f} µs/req" if target.process else ""),
                      flush=True)  # fmt: skip
                time.sleep(0.5)
            bulk_round = {}
            for name, port in (("haproxy", 8082), ("carpool", 8083)):
                speed = curl(node, f"http://{ADDRESS}:{port}/big.bin")
                bulk.setdefault(name, []).append(speed)
                bulk_round[name] = speed
                print(f"round {number + 1} bulk {name:<12} {speed:9.0f} MB/s", flush=True)
            for key, value in (
                ("tcp_req", this_round["carpool_tcp"] / this_round["haproxy_tcp"]),
                ("http_req", this_round["carpool_http"] / this_round["haproxy_http"]),
                ("tcp_cpu", cpu["carpool_tcp"][-1] / cpu["haproxy_tcp"][-1]),
                ("http_cpu", cpu["carpool_http"][-1] / cpu["haproxy_http"][-1]),
                ("bulk", bulk_round["carpool"] / bulk_round["haproxy"]),
                ("redirect", this_round["carpool_redirect"] / this_round["direct"]),
            ):
                ratios.setdefault(key, []).append(value)
        if arguments.profile:
            for name, target in (("http", targets[3]), ("tcp", targets[2])):
                out = node.dir / f"relayd-{name}.txt"
                spy = node.spawn([os.path.join(os.path.dirname(sys.executable), "py-spy"),
                                  "record", "-f", "raw", "-o", str(out), "-r", "200",
                                  "-d", str(arguments.profile), "-p", str(relayd.pid)],
                                 name="py-spy")  # fmt: skip
                time.sleep(1)
                wrk(node, target.url, arguments.profile)
                spy.wait(120)
                print(f"profile of the {name} relay: {out}")
                if out.exists():
                    print(top_functions(out.read_text()))
    print("\nmedians (ratio = carpool / anchor within each round; goal in brackets)")
    for key, goal in (("tcp_cpu", "<= 1.1"), ("http_cpu", "<= 1.2"), ("bulk", ">= 1.5"),
                      ("redirect", ">= 0.95"), ("tcp_req", ""), ("http_req", "")):
        print(f"  {key:<9} {median(ratios[key]):5.2f}  {goal}")
    metrics = [
        {"name": "tcp_cpu_us_per_req", "unit": "us", "better": "lower", "trials": rounds,
         "values": {"haproxy": median(cpu["haproxy_tcp"]), "carpool": median(cpu["carpool_tcp"])}},
        {"name": "http_cpu_us_per_req", "unit": "us", "better": "lower", "trials": rounds,
         "values": {"haproxy": median(cpu["haproxy_http"]),
                    "carpool": median(cpu["carpool_http"])}},
        {"name": "tcp_req_per_s", "unit": "req/s", "better": "higher", "trials": rounds,
         "values": {"haproxy": median(results["haproxy_tcp"]),
                    "carpool": median(results["carpool_tcp"])}},
        {"name": "http_req_per_s", "unit": "req/s", "better": "higher", "trials": rounds,
         "values": {"haproxy": median(results["haproxy_http"]),
                    "carpool": median(results["carpool_http"])}},
        {"name": "bulk_mbps", "unit": "MB/s", "better": "higher", "trials": rounds,
         "values": {"haproxy": median(bulk["haproxy"]), "carpool": median(bulk["carpool"])}},
        {"name": "redirect_req_per_s", "unit": "req/s", "better": "higher", "trials": rounds,
         "values": {"direct": median(results["direct"]),
                    "carpool": median(results["carpool_redirect"])}},
    ]  # fmt: skip
    print(json.dumps({"benchmark": "relay", "metrics": metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
