from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter

from carpool.errors import CarpoolError, ConfigError
from carpool.events import Event, EventBus
from carpool.metrics import parse_listen_address, start_metrics_server


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("127.0.0.1:9100", ("127.0.0.1", 9100)),
        ("[::1]:9100", ("::1", 9100)),
        ("[fe80::1%eth0]:1", ("fe80::1%eth0", 1)),
        (":9100", ("0.0.0.0", 9100)),
        ("localhost:0", ("localhost", 0)),
        ("node-a.lab.example:65535", ("node-a.lab.example", 65535)),
        (" 10.0.0.1:80 ", ("10.0.0.1", 80)),
    ],
)
def test_parse_listen_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_listen_address(address) == expected


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("", "no port"),
        ("9100", "no port"),
        ("127.0.0.1", "no port"),
        ("127.0.0.1:", "port '' is not a number"),
        ("127.0.0.1:http", "port 'http' is not a number"),
        ("127.0.0.1:-1", "port '-1' is not a number"),
        ("127.0.0.1:65536", "port 65536 is out of range"),
        ("::1:9100", "put an IPv6 address in brackets"),
        ("[::1]9100", "missing ':PORT' after ']'"),
        ("[::1:9100", "missing ']'"),
        ("[1.2.3.4]:80", "'1.2.3.4' is not an IPv6 address"),
        ("999.1.1.1:80", "'999.1.1.1' is not an IPv4 address"),
        ("bad host:80", "'bad host' is neither an IPv4 address nor a host name"),
        ("-x:80", "is neither an IPv4 address nor a host name"),
        ("127.0.0.1:٩٩", "is not a number"),
    ],
)
def test_parse_listen_address_errors(address: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_listen_address(address)
    message = str(info.value)
    assert message.startswith(f"--metrics: invalid listen address {address!r}: ")
    assert why in message
    assert "e.g. 127.0.0.1:9100" in message
    assert isinstance(info.value, CarpoolError)


def test_parse_listen_address_names_its_source() -> None:
    with pytest.raises(ConfigError, match=r"^rc.conf: invalid listen address"):
        parse_listen_address("nope", source="rc.conf")


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        body: bytes = response.read()
    return body.decode()


def test_metrics_server_serves_its_registry_on_a_free_port() -> None:
    registry = CollectorRegistry()
    packets = Counter("carp_packets_received", "CARP packets received.", registry=registry)
    packets.inc(3)
    bus = EventBus(registry)
    bus.publish(Event.now("carpd", "MASTER", vhid=1))

    server = start_metrics_server("127.0.0.1:0", registry)
    try:
        assert server.host == "127.0.0.1"
        assert server.port > 0
        assert server.url == f"http://127.0.0.1:{server.port}/metrics"
        body = _get(server.url)
        assert "carp_packets_received_total 3.0" in body
        assert 'carpool_events_total{event="MASTER",source="carpd"} 1.0' in body
        packets.inc()
        assert "carp_packets_received_total 4.0" in _get(server.url)
    finally:
        server.close()
    server.close()  # idempotent
    with pytest.raises(urllib.error.URLError):
        _get(server.url)


def test_metrics_server_reports_a_busy_port() -> None:
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(CarpoolError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            start_metrics_server(f"127.0.0.1:{port}", CollectorRegistry())
    finally:
        holder.close()


def test_metrics_server_rejects_a_bad_address() -> None:
    with pytest.raises(ConfigError, match="no port"):
        start_metrics_server("localhost", CollectorRegistry())
