"""relayd's HTTP relays in the lab: rules, keep-alive, chunked bodies, smuggling, slow clients.

Nodes: a client (10.0.0.9), relayd (10.0.0.5) and three web servers (10.0.0.21-23)
that answer with their name, the request line and the headers they got, and log
every request they receive, so a test can tell what reached a backend.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from carpool.lab import Lab, LabProcess, Node
from carpool.lab.services import wait_until, write_file

#: an HTTP/1.1 server that echoes what it got as JSON and logs each request head
BACKEND = textwrap.dedent('''\
    import json, socket, ssl, sys, threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    NAME, ADDRESS, PORT, LOG = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    TLS = sys.argv[5:7]
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def answer(self):
            with lock, open(LOG, "a") as log:
                log.write(json.dumps([self.command, self.path, dict(self.headers.items())]) + "\\n")
            body = b""
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\\r\\n", b""):
                            pass
                        break
                    body += self.rfile.read(size + 2)[:size]
            elif self.headers.get("Content-Length"):
                body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/big":
                payload = b"x" * (8 << 20)
            else:
                payload = json.dumps({
                    "name": NAME, "method": self.command, "path": self.path,
                    "headers": {k: ", ".join(self.headers.get_all(k))
                                for k in set(self.headers.keys())},
                    "body": body.decode("latin-1"),
                }).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            if self.path == "/chunked":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                for piece in (payload[:10], payload[10:]):
                    self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(piece), piece))
                self.wfile.write(b"0\\r\\n\\r\\n")
            else:
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

        do_GET = do_POST = do_HEAD = do_PUT = answer

    server = ThreadingHTTPServer((ADDRESS, PORT), Handler)
    server.daemon_threads = True
    if TLS:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*TLS)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    print("serving", flush=True)
    server.serve_forever()
''')


def start_backend(node: Node, port: int = 8080, tls: tuple[Path, Path] | None = None
                  ) -> LabProcess:
    program = write_file(node, "backend.py", BACKEND)
    argv = [sys.executable, str(program), node.name, str(node.ipv4("lan")), str(port),
            str(node.dir / "requests.log")]  # fmt: skip
    if tls is not None:
        argv += [str(tls[0]), str(tls[1])]
    process = node.spawn(argv, name=f"backend{port}")
    assert process.wait_for_output("serving", 20), process.output()
    return process


def backend_requests(node: Node) -> list[list[Any]]:
    path = node.dir / "requests.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed P-256 certificate in relayd's layout: NAME.crt and private/NAME.key."""
    import subprocess

    (directory / "private").mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.crt", directory / "private" / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=IP:{name}"
         if name[0].isdigit() else f"subjectAltName=DNS:{name}",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def relayctl(node: Node, *words: str, check: bool = True) -> str:
    argv = [sys.executable, "-m", "carpool.relayd.ctl", "--run-dir", str(node.dir), *words]
    return node.run(argv, check=check).stdout


def up_hosts(node: Node) -> int:
    argv = [sys.executable, "-m", "carpool.relayd.ctl", "--run-dir", str(node.dir),
            "show", "hosts"]  # fmt: skip
    result = node.run(argv, check=False)
    return result.stdout.count("\tup") if result.returncode == 0 else -1


def start_relayd(node: Node, conf: str, *extra: str, hosts: int = 3) -> LabProcess:
    path = write_file(node, "relayd.conf", conf)
    process = node.spawn(
        [sys.executable, "-m", "carpool.relayd.daemon", "-f", str(path),
         "--run-dir", str(node.dir), *extra],
        name="relayd",
    )  # fmt: skip
    try:
        wait_until(lambda: up_hosts(node) >= hosts or not process.running(), 30, "hosts up")
    except AssertionError:
        raise AssertionError(f"relayd: {relayctl(node, 'show', 'hosts', check=False)}\n"
                             f"{process.output()}") from None
    assert process.running(), process.output()
    return process


def run_client(node: Node, script: str, *args: str, timeout: float = 60) -> Any:
    """Run a Python snippet in the client node; it prints one JSON value."""
    result = node.run([sys.executable, "-c", textwrap.dedent(script), *args], timeout=timeout)
    return json.loads(result.stdout)


#: raw exchanges: send bytes, read until the peer closes or the timeout, print what came back
RAW = '''
import json, socket, sys
data = bytes.fromhex(sys.argv[3])
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
s.sendall(data)
got = b""
try:
    while chunk := s.recv(65536):
        got += chunk
except socket.timeout:
    pass
print(json.dumps(got.decode("latin-1")))
'''


def raw(client: Node, data: bytes, address: str = "10.0.0.5", port: int = 80) -> str:
    result: str = run_client(client, RAW, address, str(port), data.hex())
    return result


CONF = """\
interval 1
timeout 500
table <webhosts> { 10.0.0.21 10.0.0.22 }
table <special> { 10.0.0.23 }
http protocol "web" {
	match request header append "X-Forwarded-For" value "$REMOTE_ADDR"
	match request header append "X-Forwarded-Port" value "$REMOTE_PORT"
	match request header set "X-Relay" value "carpool $SERVER_ADDR:$SERVER_PORT"
	match request header remove "X-Secret"
	match response header set "Server" value "relayd"
	block request quick path "/forbidden*"
	match request path "/special/*" forward to <special>
	return error
}
relay "www" {
	listen on 10.0.0.5 port 80
	protocol "web"
	forward to <webhosts> port 8080 mode roundrobin check tcp
	forward to <special> port 8080 check tcp
}
relay "flaky" {
	listen on 10.0.0.5 port 83
	protocol "web"
	forward to <special> port 8081 check tcp
}
relay "proxied" {
	listen on 10.0.0.5 port 84
	forward to <special> port 8082 check tcp proxy-protocol v1
}
"""

#: sends back the first line it reads (the PROXY header a relay puts first)
FIRST_LINE = textwrap.dedent('''\
    import socket, sys, threading
    server = socket.create_server((sys.argv[1], 8082))
    print("serving", flush=True)

    def handle(conn):
        with conn, conn.makefile("rb") as lines:
            conn.sendall(lines.readline())

    while True:
        threading.Thread(target=handle, args=(server.accept()[0],), daemon=True).start()
''')

#: answers the first request of each connection and drops the connection at the second,
#: as a keep-alive server timing out an idle connection just as a request arrives does
FLAKY = textwrap.dedent('''\
    import socket, sys, threading
    server = socket.create_server((sys.argv[1], 8081))
    print("serving", flush=True)

    def handle(conn):
        buf, seen = b"", 0
        while data := conn.recv(65536):
            buf += data
            while b"\\r\\n\\r\\n" in buf:
                _, _, buf = buf.partition(b"\\r\\n\\r\\n")
                seen += 1
                if seen == 2:
                    conn.close()
                    return
                conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 5\\r\\n\\r\\nfirst")
        conn.close()

    while True:
        threading.Thread(target=handle, args=(server.accept()[0],), daemon=True).start()
''')


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    loop = [] if request.param == "uvloop" else ["--no-uvloop"]
    with Lab() as lab:
        lab.network("lan")
        relayd_node = lab.node("relayd")
        lab.attach(relayd_node, "lan", host=5)
        lab.attach(lab.node("client"), "lan", host=9)
        for number in (1, 2, 3):
            node = lab.node(f"web{number}")
            lab.attach(node, "lan", host=20 + number)
            start_backend(node)
        flaky = lab.nodes["web3"].spawn([sys.executable, "-c", FLAKY, "10.0.0.23"], name="flaky")
        assert flaky.wait_for_output("serving", 20), flaky.output()
        first = lab.nodes["web3"].spawn([sys.executable, "-c", FIRST_LINE, "10.0.0.23"],
                                        name="firstline")  # fmt: skip
        assert first.wait_for_output("serving", 20), first.output()
        start_relayd(relayd_node, CONF, *loop)
        yield lab


KEEPALIVE = '''
import http.client, json
c = http.client.HTTPConnection("10.0.0.5", 80, timeout=10)
out = []
for path in ("/a", "/chunked", "/special/x", "/b"):
    c.request("GET", path, headers={"X-Forwarded-For": "192.0.2.1", "X-Secret": "s"})
    r = c.getresponse()
    body = json.loads(r.read())
    out.append({"server": r.getheader("Server"), "port": c.sock.getsockname()[1], **body})
c.request("POST", "/post", body=iter([b"hello ", b"world"]), encode_chunked=True,
          headers={"Transfer-Encoding": "chunked"})
r = c.getresponse()
out.append(json.loads(r.read()))
c.request("PUT", "/put", body=b"x" * 100000)
r = c.getresponse()
out.append(json.loads(r.read()))
print(json.dumps(out))
'''


def test_rules_keep_alive_and_chunked_bodies(lab: Lab) -> None:
    client = lab.nodes["client"]
    answers = run_client(client, KEEPALIVE)
    first = answers[0]
    headers = first["headers"]
    assert headers["X-Forwarded-For"] == "192.0.2.1, 10.0.0.9"
    assert headers["X-Forwarded-Port"] == str(first["port"])
    assert headers["X-Relay"] == "carpool 10.0.0.5:80"
    assert "X-Secret" not in headers
    assert first["server"] == "relayd"
    # one backend connection per client connection, as relayd; a rule's table switches it
    assert answers[0]["name"] == answers[1]["name"] != "web3"
    assert answers[3]["name"] in ("web1", "web2")
    assert answers[1]["path"] == "/chunked"
    assert answers[2]["name"] == "web3" and answers[2]["path"] == "/special/x"
    assert answers[4]["body"] == "hello world" and answers[4]["method"] == "POST"
    assert answers[5]["body"] == "x" * 100000


RETRY = '''
import http.client, json
c = http.client.HTTPConnection("10.0.0.5", 83, timeout=10)
out = []
for _ in range(3):
    c.request("GET", "/")
    out.append(c.getresponse().read().decode())
print(json.dumps(out))
'''


def test_request_on_a_backend_connection_closing_under_it_is_sent_again(lab: Lab) -> None:
    assert run_client(lab.nodes["client"], RETRY) == ["first", "first", "first"]


PROXIED = '''
import json, socket
s = socket.create_connection(("10.0.0.5", 84), timeout=10)
s.sendall(b"hello\\n")
print(json.dumps([s.recv(200).decode(), s.getsockname()[1]]))
'''


def test_proxy_protocol_header_goes_first_to_the_backend(lab: Lab) -> None:
    line, port = run_client(lab.nodes["client"], PROXIED)
    assert line == f"PROXY TCP4 10.0.0.9 10.0.0.5 {port} 84\r\n"


def test_blocked_request_gets_403_and_reaches_no_backend(lab: Lab) -> None:
    client = lab.nodes["client"]
    before = sum(len(backend_requests(lab.nodes[f"web{n}"])) for n in (1, 2, 3))
    reply = raw(client, b"GET /forbidden/x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert reply.startswith("HTTP/1.1 403 "), reply
    after = sum(len(backend_requests(lab.nodes[f"web{n}"])) for n in (1, 2, 3))
    assert after == before


SMUGGLING = [
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\n X-Folded: yes\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\n\n",
    b"GET / HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", SMUGGLING, ids=range(len(SMUGGLING)))
def test_malformed_and_smuggling_requests_get_400_and_reach_no_backend(
    lab: Lab, request_bytes: bytes
) -> None:
    client = lab.nodes["client"]
    before = sum(len(backend_requests(lab.nodes[f"web{n}"])) for n in (1, 2, 3))
    reply = raw(client, request_bytes)
    assert reply.startswith("HTTP/1.1 400 "), reply
    after = sum(len(backend_requests(lab.nodes[f"web{n}"])) for n in (1, 2, 3))
    assert after == before


def test_oversized_head_gets_431(lab: Lab) -> None:
    reply = raw(lab.nodes["client"],
                b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + b"y" * 10000 + b"\r\n\r\n")
    assert reply.startswith("HTTP/1.1 431 "), reply


SLOW = '''
import json, socket, time, urllib.request
slow = []
for _ in range(20):  # clients that send half a head and wait
    s = socket.create_connection(("10.0.0.5", 80))
    s.sendall(b"GET / HTTP/1.1\\r\\nHost: a\\r\\nX-Slow:")
    slow.append(s)
big = socket.create_connection(("10.0.0.5", 80))  # a client that never reads its 8 MiB
big.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
big.sendall(b"GET /big HTTP/1.1\\r\\nHost: a\\r\\n\\r\\n")
time.sleep(1)
answered = 0
for _ in range(30):
    with urllib.request.urlopen("http://10.0.0.5/ok", timeout=5) as r:
        answered += r.status == 200
print(json.dumps(answered))
'''


def test_slow_clients_stall_nobody_else(lab: Lab) -> None:
    assert run_client(lab.nodes["client"], SLOW) == 30


def test_relayctl_shows_the_relay_and_its_sessions(lab: Lab) -> None:
    node = lab.nodes["relayd"]
    summary = relayctl(node, "sh", "su")
    lines = summary.expandtabs(8).splitlines()
    assert lines[0].split() == ["Id", "Type", "Name", "Avlblty", "Status"]
    assert any(line.split()[:3] == ["1", "relay", "www"] for line in lines[1:]), summary
    assert "webhosts:8080" in summary and "special:8080" in summary
    relays = relayctl(node, "show", "relays")
    assert "\ttotal: " in relays and "sessions" in relays
    data = json.loads(relayctl(node, "-j", "show", "summary"))
    assert data["relays"][0]["name"] == "www"
    assert relayctl(node, "log", "verbose") == "logging request sent.\n"
    assert relayctl(node, "log", "brief") == "logging request sent.\n"
    failed = node.run([sys.executable, "-m", "carpool.relayd.ctl", "--run-dir", str(node.dir),
                       "host", "disable", "nosuch"], check=False)  # fmt: skip
    assert failed.returncode == 1 and failed.stdout == "command failed\n"
