"""Where devd and ifstated get their events: carpool daemons' streams and netlink links.

Each carpool daemon's event stream is followed with reconnection (a daemon that is
not running, or restarts, is waited for, never an error), and every event becomes
a flat mapping of devd variables: ``system``, ``subsystem``, ``type`` and the
event's own attributes.

CARP events carry FreeBSD's names (system ``CARP``, subsystem ``<vhid>@<if>``, type
``MASTER|BACKUP|INIT``). For rules written for FreeBSD before 10, where each vhid
had a ``carpN`` interface, every CARP event is also delivered in that older form:
system ``IFNET``, subsystem ``carp<vhid-1>`` (``carp0`` is vhid 1, the usual
``ifconfig carp0 vhid 1``), type ``LINK_UP`` for MASTER and ``LINK_DOWN`` otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from carpool.control import ControlError, async_request, async_subscribe, socket_path
from carpool.events import Event
from carpool.net.netlink import watch_links

log = logging.getLogger("carpool.devd")

# The daemons whose events devd and ifstated follow, and the devd system of each.
DAEMON_SYSTEMS: dict[str, str] = {
    "carpd": "CARP",
    "hastd": "HAST",
    "pfsyncd": "PFSYNC",
    "relayd": "RELAYD",
    "zfs-replicate": "ZFS",
}
RETRY_MIN, RETRY_MAX = 0.2, 2.0

DevdVariables = dict[str, str]


def event_variables(event: Event) -> list[DevdVariables]:
    """The devd variable sets an event is delivered as (CARP events: two forms)."""
    attributes = {key: _text(value) for key, value in event.attributes.items()}
    variables: DevdVariables = {
        **attributes,
        "system": attributes.get("system", DAEMON_SYSTEMS.get(event.source, event.source.upper())),
        "subsystem": attributes.get("subsystem", _subsystem(attributes)),
        "type": attributes.get("type", event.name),
        "source": event.source,
        "event": event.name,
    }
    forms = [variables]
    if variables["system"] == "CARP" and "vhid" in attributes:
        legacy = dict(variables)
        legacy["system"] = "IFNET"
        legacy["subsystem"] = f"carp{int(attributes['vhid']) - 1}"
        legacy["type"] = "LINK_UP" if variables["type"] == "MASTER" else "LINK_DOWN"
        forms.append(legacy)
    return forms


def link_variables(ifname: str, up: bool) -> DevdVariables:
    kind = "LINK_UP" if up else "LINK_DOWN"
    return {"system": "IFNET", "subsystem": ifname, "type": kind, "source": "kernel", "event": kind}


def _subsystem(attributes: Mapping[str, str]) -> str:
    for key in ("resource", "table", "host", "relay", "job", "ifname"):
        if key in attributes:
            return attributes[key]
    return ""


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


async def follow_daemon(run_dir: Path, daemon: str) -> AsyncIterator[Event]:
    """Every event of ``daemon``, across its restarts; waits quietly while it is not running."""
    path = socket_path(run_dir, daemon)
    delay = RETRY_MIN
    connected = False
    # Nothing that happens after we start is missed: on every (re)connection the
    # daemon replays what it remembers since the last event we saw.
    seen = time.monotonic()
    while True:
        try:
            await async_request(path, "ping")  # quiet while the daemon is not running
            async with contextlib.aclosing(async_subscribe(path, since=seen)) as stream:
                if not connected:
                    log.info("following %s events on %s", daemon, path)
                connected, delay = True, RETRY_MIN
                async for event in stream:
                    seen = max(seen, event.monotonic)
                    yield event
            log.info("%s closed its event stream; waiting for it to come back", daemon)
        except ControlError:
            if connected:
                log.info("%s is gone; waiting for it to come back", daemon)
            connected = False
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


async def follow_links() -> AsyncIterator[tuple[str, bool]]:
    """(ifname, up) for every change of a link's carrier or administrative state."""
    known: dict[str, bool] = {}
    async for state in watch_links():
        if known.get(state.ifname) != state.up:
            known[state.ifname] = state.up
            yield state.ifname, state.up
