"""relayctl's client side: JSON status back to relayd's formats, monitor lines, error pages."""

from __future__ import annotations

import dataclasses

from carpool.events import Event
from carpool.relayd.ctl import monitor_lines, status_from_json
from carpool.relayd.daemon import SessionHistory
from carpool.relayd.http_relay import error_page
from carpool.relayd.relayctl_format import (
    HostStatus,
    RedirectStatus,
    RelaydStatus,
    RelayStatus,
    SessionStats,
    TableStatus,
    render_summary,
)

TABLE = TableStatus(2, "webhosts:8080", (HostStatus(4, "10.0.0.10", "up", check_cnt=3, up_cnt=3),))


def test_status_round_trips_through_json() -> None:
    status = RelaydStatus(
        redirects=(RedirectStatus(1, "web_redirect", TABLE),),
        relays=(RelayStatus(1, "www", (TABLE,), stats=SessionStats(cnt=7)),),
    )
    assert status_from_json(dataclasses.asdict(status)) == status
    text = render_summary(status).expandtabs(8)
    assert text.splitlines()[1].split() == ["1", "redirect", "web_redirect", "active"]


def test_monitor_prints_relayctl_lines() -> None:
    event = Event("relayd", "host_down", {"id": 4, "state": "down"}, 1.0, 1795671930.0)
    lines = monitor_lines(event).splitlines()
    assert lines[0].startswith("host_status: imsg type 37 len ")
    assert lines[0].endswith(" peerid 0 pid 0")
    assert lines[1].startswith("\ttimestamp: 1795671930, ")
    assert lines[2:] == ["\tid: 4", "\tstate: down"]
    event = Event("relayd", "ctl_host_disable", {"id": 4, "name": "10.0.0.2"}, 1.0, 0.0)
    assert monitor_lines(event).splitlines()[2:] == ["\tid: 4", "\tname: 10.0.0.2"]


def test_session_history_gives_last_and_average() -> None:
    history = SessionHistory()
    assert history.stats(5) == SessionStats(cnt=5)
    history.tick(10)
    history.tick(30)
    stats = history.stats(30)
    assert (stats.last, stats.last_hour, stats.avg, stats.avg_hour) == (20, 30, 15, 900)


def test_error_page_is_a_complete_closing_response() -> None:
    page = error_page(400, "bare CR or LF in head", None, "relayd")
    head, _, body = page.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"Connection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"<title>400 Bad Request</title>" in body
