"""The load-balancer scenario's programs: a web backend and the client.

Backend (one per web node)::

    python -m carpool.scenarios.web serve NAME PORT

HTTP/1.1 with keep-alive; every answer is ``{"name": NAME, "path": PATH}``.

Client (in the client node)::

    python -m carpool.scenarios.web client --status FILE [--long-lived 20]

``--long-lived N`` keep-alive connections to http://10.0.0.100/ (relayd's
redirect, nftables DNAT) each ask ``GET /keep/<i>/<n>`` every 200 ms on the same
connection, forever; a request loop asks ``GET /loop/<n>`` of
https://10.0.0.100/ (relayd's TLS relay) on a new connection every 50 ms. Every
answer must echo its own path: anything else is a wrong answer. The status file
(rewritten each second, and at SIGTERM) holds the counts, the errors and the
longest stretch of the request loop without an answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import ssl
import sys
import time
from typing import Any

VIP = "10.0.0.100"


# -- the backend ---------------------------------------------------------------------------


async def serve(name: str, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                parts = request_line.split(" ")
                path = parts[1] if len(parts) > 1 else "/"
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    key, _, value = line.partition(b":")
                    if key.strip().lower() == b"content-length":
                        length = int(value.strip() or b"0")
                if length:
                    await reader.readexactly(length)
                body = json.dumps({"name": name, "path": path}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "0.0.0.0", port, backlog=256)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


# -- the client ----------------------------------------------------------------------------


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value.strip())
    body = await reader.readexactly(length)
    return status, json.loads(body)


class Client:
    def __init__(self, status_path: str, long_lived: int) -> None:
        self.status_path = status_path
        self.long_lived = long_lived
        self.keep_answers = [0] * long_lived
        self.keep_errors: list[str] = []
        self.loop_answers = 0
        self.loop_failures = 0
        self.wrong_answers: list[str] = []
        self.longest_gap = 0.0
        self.last_answer = time.monotonic()
        self.started = time.monotonic()
        self.backends: dict[str, int] = {}
        self.context = ssl.create_default_context()
        self.context.check_hostname = False
        self.context.verify_mode = ssl.CERT_NONE

    async def keep(self, index: int) -> None:
        try:
            reader, writer = await asyncio.open_connection(VIP, 80)
        except OSError as error:
            self.keep_errors.append(f"connection {index}: {error}")
            return
        number = 0
        try:
            while True:
                path = f"/keep/{index}/{number}"
                writer.write(f"GET {path} HTTP/1.1\r\nHost: www\r\n\r\n".encode())
                status, body = await read_response(reader)
                if status != 200 or body.get("path") != path:
                    self.wrong_answers.append(f"{path}: {status} {body}")
                    return
                self.keep_answers[index] += 1
                number += 1
                await asyncio.sleep(0.2)
        except (OSError, asyncio.IncompleteReadError, ValueError) as error:
            self.keep_errors.append(f"connection {index} after {number} answers: {error!r}")
        finally:
            writer.close()

    async def loop(self) -> None:
        number = 0
        while True:
            number += 1
            path = f"/loop/{number}"
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(VIP, 443, ssl=self.context), 2.0)  # fmt: skip
                try:
                    writer.write(f"GET {path} HTTP/1.1\r\nHost: www\r\nConnection: close"
                                 "\r\n\r\n".encode())  # fmt: skip
                    status, body = await asyncio.wait_for(read_response(reader), 2.0)
                finally:
                    writer.close()
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                self.loop_failures += 1
                await asyncio.sleep(0.05)
                continue
            if status != 200 or body.get("path") != path:
                self.wrong_answers.append(f"{path}: {status} {body}")
            else:
                now = time.monotonic()
                self.longest_gap = max(self.longest_gap, now - self.last_answer)
                self.last_answer = now
                self.loop_answers += 1
                name = str(body.get("name"))
                self.backends[name] = self.backends.get(name, 0) + 1
            await asyncio.sleep(0.05)

    def status(self) -> dict[str, Any]:
        return {
            "seconds": round(time.monotonic() - self.started, 1),
            "keep_answers": self.keep_answers,
            "keep_errors": self.keep_errors[:20],
            "loop_answers": self.loop_answers,
            "loop_failures": self.loop_failures,
            "wrong_answers": self.wrong_answers[:20],
            "loop_longest_gap_s": round(self.longest_gap, 2),
            "loop_backends": self.backends,
        }

    def write_status(self) -> None:
        temporary = self.status_path + ".tmp"
        with open(temporary, "w") as handle:
            json.dump(self.status(), handle)
        os.replace(temporary, self.status_path)

    async def run(self) -> None:
        stopping = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
        tasks = [asyncio.ensure_future(self.keep(i)) for i in range(self.long_lived)]
        tasks.append(asyncio.ensure_future(self.loop()))
        while not stopping.is_set():
            self.write_status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 1.0)
        for task in tasks:
            task.cancel()
        self.write_status()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="web")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve")
    serve_parser.add_argument("name")
    serve_parser.add_argument("port", type=int)
    client_parser = commands.add_parser("client")
    client_parser.add_argument("--status", required=True)
    client_parser.add_argument("--long-lived", type=int, default=20)
    arguments = parser.parse_args(argv)
    if arguments.command == "serve":
        asyncio.run(serve(arguments.name, arguments.port))
    else:
        asyncio.run(Client(arguments.status, arguments.long_lived).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
