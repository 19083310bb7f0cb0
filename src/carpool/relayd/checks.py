"""Running relayd's health checks against one host (the I/O half of ``relayd.health``).

Each function returns a :class:`~carpool.relayd.health.CheckResult` and never
raises for a failing host: connection refused, timeouts and garbage are results.
The verdicts themselves (HTTP code, digest, expect patterns) are ``health``'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time

from carpool.relayd.health import (
    CheckResult,
    HostError,
    body_hasher,
    evaluate_http,
    evaluate_send_expect,
    http_check_request,
)
from carpool.relayd.model import Check, CheckType

READ_LIMIT = 64 * 1024


def _client_tls() -> ssl.SSLContext:
    # relayd's checks do not verify the backend's certificate either.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def run_check(host: str, port: int, check: Check, timeout: float) -> CheckResult:
    """One check of ``host``; ``timeout`` in seconds covers the whole exchange."""
    started = time.monotonic()
    phase = ["connect"]
    try:
        async with asyncio.timeout(timeout):
            result = await _dispatch(host, port, check, started, phase)
    except TimeoutError:
        kind = check.type
        if kind is CheckType.ICMP:
            error = HostError.ICMP_READ_TIMEOUT
        elif kind is CheckType.SCRIPT:
            error = HostError.SCRIPT_FAIL
        elif phase[0] == "connect":
            error = HostError.TCP_CONNECT_TIMEOUT
        else:
            error = HostError.TCP_READ_TIMEOUT
        return CheckResult.failure(error, _ms(started))
    return result


def _ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


async def _dispatch(
    host: str, port: int, check: Check, started: float, phase: list[str]
) -> CheckResult:
    kind = check.type
    if kind is CheckType.ICMP:
        return await _icmp(host, started)
    if kind is CheckType.SCRIPT:
        return await _script(host, check, started)
    use_tls = kind in (CheckType.TLS, CheckType.HTTPS) or bool(check.tls)
    try:
        reader, writer = await asyncio.open_connection(
            host, port, ssl=_client_tls() if use_tls else None
        )
    except ssl.SSLError:
        return CheckResult.failure(HostError.TLS_CONNECT_ERROR, _ms(started))
    except OSError:
        return CheckResult.failure(HostError.TCP_CONNECT_FAIL, _ms(started))
    phase[0] = "read"
    try:
        if kind in (CheckType.TCP, CheckType.TLS):
            return CheckResult.success(HostError.TCP_CONNECT_OK, _ms(started))
        if kind in (CheckType.HTTP, CheckType.HTTPS):
            return await _http(reader, writer, check, started)
        return await _send_expect(reader, writer, check, started)
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


async def _http(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, check: Check, started: float
) -> CheckResult:
    writer.write(http_check_request(check))
    await writer.drain()
    received = b""
    try:
        while len(received) < READ_LIMIT:
            chunk = await reader.read(READ_LIMIT)
            if not chunk:
                break
            received += chunk
            if check.digest is None and b"\r\n" in received:
                break
    except (OSError, ssl.SSLError):
        return CheckResult.failure(HostError.TCP_READ_FAIL, _ms(started))
    digest = None
    if check.digest is not None and b"\r\n\r\n" in received:
        hasher = body_hasher(check)
        hasher.update(received.split(b"\r\n\r\n", 1)[1])
        digest = hasher.hexdigest()
    return evaluate_http(received, digest, check, _ms(started))


async def _send_expect(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, check: Check, started: float
) -> CheckResult:
    binary = check.type is CheckType.BINARY
    if check.send:
        writer.write(bytes.fromhex(check.send) if binary else check.send.encode())
        await writer.drain()
    received = b""
    result = CheckResult.failure(HostError.SEND_EXPECT_FAIL, _ms(started))
    while len(received) < READ_LIMIT:
        try:
            chunk = await reader.read(READ_LIMIT)
        except (OSError, ssl.SSLError):
            return CheckResult.failure(HostError.TCP_READ_FAIL, _ms(started))
        if not chunk:
            break
        received += chunk
        result = evaluate_send_expect(
            received, check.expect or "", binary=binary, latency_ms=_ms(started)
        )
        if result.ok:
            break
    return result


async def _icmp(host: str, started: float) -> CheckResult:
    process = await asyncio.create_subprocess_exec(
        "ping", "-n", "-q", "-c", "1", "-W", "1", host,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    if code == 0:
        return CheckResult.success(HostError.ICMP_OK, _ms(started))
    return CheckResult.failure(HostError.ICMP_READ_TIMEOUT, _ms(started))


async def _script(host: str, check: Check, started: float) -> CheckResult:
    process = await asyncio.create_subprocess_exec(
        check.path, host, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        code = await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
    if code == 0:
        return CheckResult.success(HostError.SCRIPT_OK, _ms(started))
    return CheckResult.failure(HostError.SCRIPT_FAIL, _ms(started))
