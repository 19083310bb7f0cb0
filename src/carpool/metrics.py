"""Prometheus exposition for the daemons (``--metrics ADDR``).

Each daemon owns its ``prometheus_client.CollectorRegistry`` (so that tests may
run many daemons in one process) and serves it on ``http://ADDR/metrics`` from
a background thread.
"""

from __future__ import annotations

import ipaddress
import re
import threading
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

from carpool.errors import ConfigError

__all__ = ["MetricsServer", "parse_listen_address", "start_metrics_server"]

_HOSTNAME_RE = re.compile(
    r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z"
)
_EXAMPLES = "use HOST:PORT, [IPV6]:PORT or :PORT, e.g. 127.0.0.1:9100"


def parse_listen_address(address: str, *, source: str = "--metrics") -> tuple[str, int]:
    """Split ``127.0.0.1:9100``, ``[::1]:9100``, ``localhost:9100`` or ``:9100``.

    An empty host means every IPv4 address (``0.0.0.0``).  Port 0 asks the
    kernel for a free port.  Raises :class:`ConfigError` naming *source*.
    """

    def bad(why: str) -> ConfigError:
        return ConfigError(f"invalid listen address {address!r}: {why}; {_EXAMPLES}", path=source)

    text = address.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise bad("missing ']' after the IPv6 address")
        host, rest = text[1:end], text[end + 1 :]
        if not rest.startswith(":"):
            raise bad("missing ':PORT' after ']'")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise bad("no port")
        if ":" in host:
            raise bad("put an IPv6 address in brackets, like [::1]:9100")
        if host and re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise bad(f"{host!r} is not an IPv4 address") from None
        elif host and not _HOSTNAME_RE.match(host):
            raise bad(f"{host!r} is neither an IPv4 address nor a host name")
        if not host:
            host = "0.0.0.0"
    if not port_text.isascii() or not port_text.isdigit():
        raise bad(f"port {port_text!r} is not a number")
    port = int(port_text)
    if port > 65535:
        raise bad(f"port {port} is out of range (0-65535)")
    return host, port


@dataclass
class MetricsServer:
    """A running ``/metrics`` endpoint; :meth:`close` stops it."""

    host: str
    port: int
    _httpd: WSGIServer = field(repr=False)
    _thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join(timeout=5.0)
        self._httpd.server_close()


def start_metrics_server(address: str, registry: CollectorRegistry) -> MetricsServer:
    """Serve *registry* on ``http://address/metrics`` from a daemon thread.

    Raises :class:`ConfigError` for a malformed address and
    :class:`~carpool.errors.CarpoolError` when the port cannot be bound.
    """
    host, port = parse_listen_address(address)
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(
            f"cannot serve metrics on {address}: {exc.strerror or exc}", path="--metrics"
        ) from exc
    bound_port = int(httpd.server_address[1])
    return MetricsServer(host=host, port=bound_port, _httpd=httpd, _thread=thread)
