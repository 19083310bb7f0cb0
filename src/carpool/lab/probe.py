"""Client-side traffic for failover measurements: a UDP echo responder and a prober.

    python -m carpool.lab.probe echo ADDRESS NAME            # answers "<NAME> <payload>"
    python -m carpool.lab.probe probe ADDRESS INTERVAL SECONDS

The responder binds with IP_FREEBIND, so it can start before the virtual address
exists and answers from it once it does. The prober sends one datagram every
INTERVAL seconds for SECONDS and prints one JSON object: for every probe, its send
time (CLOCK_MONOTONIC, shared by all namespaces) and who answered, if anyone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import select
import socket
import sys
import time
from dataclasses import dataclass

PORT = 7777
IP_FREEBIND = 15


def echo(address: str, name: str) -> None:
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    level = socket.IPPROTO_IPV6 if family == socket.AF_INET6 else socket.IPPROTO_IP
    sock.setsockopt(level, IP_FREEBIND, 1)
    sock.bind((address, PORT))
    prefix = name.encode() + b" "
    print(f"echo: answering on {address}:{PORT} as {name}", flush=True)
    while True:
        data, peer = sock.recvfrom(512)
        sock.sendto(prefix + data, peer)


@dataclass(frozen=True)
class ProbeResult:
    sent: list[float]
    answered_by: list[str | None]

    def longest_outage(self, start: float, interval: float) -> tuple[float, float | None]:
        """Longest run of unanswered probes sent at or after ``start``: (seconds, run start)."""
        best = run = 0
        best_start: float | None = None
        run_start = 0.0
        for sent, who in zip(self.sent, self.answered_by, strict=True):
            if sent < start:
                continue
            if who is None:
                if run == 0:
                    run_start = sent
                run += 1
                if run > best:
                    best, best_start = run, run_start
            else:
                run = 0
        return best * interval, best_start


def probe(address: str, interval: float, duration: float) -> ProbeResult:
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sent: list[float] = []
    answered: dict[int, str] = {}
    begin = time.monotonic()
    next_send = begin
    while True:
        now = time.monotonic()
        if now >= next_send:
            if now - begin > duration:
                break
            with_sequence = str(len(sent)).encode()
            with contextlib.suppress(OSError):  # no route yet: counted as lost
                sock.sendto(with_sequence, (address, PORT))
            sent.append(now)
            next_send += interval
            continue
        readable, _, _ = select.select([sock], [], [], max(0.0, next_send - now))
        if readable:
            _drain(sock, answered)
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        readable, _, _ = select.select([sock], [], [], 0.05)
        if readable:
            _drain(sock, answered)
    return ProbeResult(sent=sent, answered_by=[answered.get(i) for i in range(len(sent))])


def _drain(sock: socket.socket, answered: dict[int, str]) -> None:
    while True:
        try:
            data = sock.recv(512)
        except BlockingIOError:
            return
        who, _, sequence = data.partition(b" ")
        if sequence.isdigit():
            answered.setdefault(int(sequence), who.decode(errors="replace"))


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "echo":
        echo(argv[1], argv[2])
        return 0
    if len(argv) == 4 and argv[0] == "probe":
        result = probe(argv[1], float(argv[2]), float(argv[3]))
        print(json.dumps({"sent": result.sent, "answered_by": result.answered_by}))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
