"""Bad input at hastd's doors: malformed NBD requests on the export, garbage and
lies on the replication port. Each answer is an error or a closed connection;
hastd keeps running and no byte of either disk changes."""

from __future__ import annotations

import hashlib
import sys

from carpool.lab import Lab, Node
from carpool.lab.services import wait_until
from tests.conftest import requires_tool
from tests.integration.test_hast import (
    MIB,
    data_area,
    nbdsh,
    pair,
    replicate,
    status,
)


def fingerprint(node: Node) -> str:
    return hashlib.sha256(data_area(node.dir / "hast0.img")).hexdigest()


NBD_ABUSE = """
import nbd
h.set_strict_mode(0)
size = h.get_size()
refused = 0
for call in (
    lambda: h.pread(4096, size),                        # starts at the end
    lambda: h.pread(8192, size - 4096),                 # runs past the end
    lambda: h.pwrite(b"x" * 4096, size - 1024),         # write past the end
    lambda: h.trim(1 << 40, 0),
    lambda: h.zero(4096, size),
):
    try:
        call()
    except nbd.Error:
        refused += 1
print("refused", refused)
print("still-serving", h.pread(4096, 0) == bytes(4096))
"""

# Larger than any request may be: refused, and the connection closed (its payload
# cannot be trusted to follow the header).
NBD_OVERSIZED = """
import nbd
h.set_strict_mode(0)
try:
    h.pwrite(b"x" * (33 * 1024 * 1024), 0)
except nbd.Error:
    print("refused")
"""

RAW_GARBAGE = """
import socket, sys
for payload in (b"\\x00" * 64, b"IHAVEOPT" * 100, bytes(range(256)) * 40):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.settimeout(10)
    greeting = s.recv(18)
    assert greeting.startswith(b"NBDMAGIC"), greeting
    try:
        s.sendall(payload)
        while s.recv(65536):
            pass
    except OSError:
        pass
    s.close()
print("closed")
"""


@requires_tool("nbdsh")
def test_malformed_nbd_requests_are_refused_and_touch_nothing() -> None:
    with Lab() as lab:
        node1, node2 = pair(lab, "fullsync")
        daemon, _ = replicate(node1, node2)
        before = fingerprint(node1), fingerprint(node2)
        out = nbdsh(node1, NBD_ABUSE)
        assert "refused 5" in out and "still-serving True" in out
        assert "refused" in nbdsh(node1, NBD_OVERSIZED)
        assert "True" in nbdsh(node1, "print(h.pread(4096, 0) == bytes(4096))")
        sock = node1.dir / "hast" / "shared_storage.sock"
        assert "closed" in node1.run([sys.executable, "-c", RAW_GARBAGE, str(sock)]).stdout
        assert daemon.running
        assert status(node1)["status"] == "complete"
        assert (fingerprint(node1), fingerprint(node2)) == before


FAKE_PRIMARY = """
import os, socket, sys
from carpool.hast import wire
host, size = sys.argv[1], int(sys.argv[2])
def send(data):
    s = socket.create_connection((host, 8457), timeout=10)
    try:
        s.sendall(data)
        s.recv(65536)
    except OSError:
        pass
    s.close()
send(os.urandom(4096))
send(b"\\xff" * 40)
for resource, datasize in (("nosuch", size), ("shared_storage", size * 2)):
    send(wire.encode_bytes(wire.Hello(resource, 1, 1, 0, datasize, 2 * 1024 * 1024,
                                      os.urandom(16))))
print("done")
"""

FAKE_SECONDARY = """
import os, socket, sys
from carpool.hast import wire
server = socket.create_server((sys.argv[1], 8457))
server.settimeout(60)
for lie in ("size", "garbage", "extent"):
    conn, _ = server.accept()
    conn.settimeout(10)
    decoder = wire.WireDecoder()
    messages = []
    while not messages:
        messages = decoder.feed(conn.recv(65536))
    hello = messages[0]
    if lie == "garbage":
        conn.sendall(os.urandom(8192))
    else:
        datasize = hello.datasize * (2 if lie == "size" else 1)
        extent = hello.extentsize // (2 if lie == "extent" else 1)
        conn.sendall(wire.encode_bytes(wire.Hello(
            hello.resource, hello.resuid, 0, 0, datasize, extent, os.urandom(16),
            wire.HelloFlag.REPLY)))
    try:
        while conn.recv(65536):
            pass
    except OSError:
        pass
    conn.close()
    print("served", lie, flush=True)
"""


@requires_tool("nbdsh")
def test_a_fake_peer_with_garbage_or_lies_is_refused_and_touches_nothing() -> None:
    with Lab() as lab:
        node1, node2 = pair(lab, "memsync")
        intruder = lab.node("node3")
        lab.attach(intruder, "sync", ifname="em1")
        primary, secondary = replicate(node1, node2)
        size = status(node1)["datasize"]
        nbdsh(node1, f"h.pwrite(b'k' * 65536, {3 * MIB}); h.flush()")
        before = fingerprint(node1), fingerprint(node2)
        # A stranger, then the primary's own address, send garbage and false HELLOs
        # to the secondary's replication port.
        for node in (intruder, node1):
            done = node.run([sys.executable, "-c", FAKE_PRIMARY, "192.168.255.2", str(size)])
            assert "done" in done.stdout
        assert secondary.running and primary.running
        assert status(node2)["refused_connections"] >= 7
        wait_until(lambda: status(node1).get("status") == "complete", 40, "the real link back")
        assert (fingerprint(node1), fingerprint(node2)) == before
        # The secondary is replaced by a liar: wrong sizes, then garbage.
        secondary.kill()
        node2.processes.remove(secondary)
        liar = node2.spawn([sys.executable, "-c", FAKE_SECONDARY, "192.168.255.2"], name="liar")
        wait_until(lambda: liar.output().count("served") == 3, 90, "the primary to try the liar")
        assert status(node1)["status"] == "degraded"
        assert primary.running
        # The primary still serves its client, degraded, and the secondary's disk is as it was.
        nbdsh(node1, f"h.pwrite(b'z' * 4096, {5 * MIB}); h.flush()")
        assert "True" in nbdsh(node1, f"print(h.pread(4096, {5 * MIB}) == b'z' * 4096)")
        assert fingerprint(node2) == before[1]
