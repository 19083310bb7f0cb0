"""pfsyncd's rc.conf lines, its status text, and the table writer's error accounting."""

from __future__ import annotations

import errno
import ipaddress
from pathlib import Path

import pytest

from carpool.errors import ConfigError
from carpool.pfsync.config import DEFAULT_GROUP, DEFAULT_PORT, parse_config
from carpool.pfsync.ctl import format_status

SEED = """\
ifconfig_em0="inet 10.0.0.1 netmask 255.255.255.0"
ifconfig_em0_alias0="vhid 1 advskew 0 pass secretpass alias 10.0.0.100/32"
pfsync_enable="YES"
pfsync_syncdev="em1"
pfsync_syncpeer="192.168.255.2"
pfsync_key="sixteen bytes or more"
"""


def test_the_seed_lines_with_a_key() -> None:
    config = parse_config(SEED, "rc.conf")
    assert config.enabled and config.syncdev == "em1"
    assert config.syncpeer == ipaddress.IPv4Address("192.168.255.2")
    assert config.destination == config.syncpeer
    assert config.port == DEFAULT_PORT and config.demotion_factor == 240
    assert config.key == b"sixteen bytes or more"


def test_without_syncpeer_it_is_pfsyncs_multicast_group() -> None:
    text = SEED.replace('pfsync_syncpeer="192.168.255.2"\n', "")
    config = parse_config(text)
    assert config.syncpeer is None and config.destination == DEFAULT_GROUP


def test_carpool_keys() -> None:
    text = SEED + (
        'pfsync_port="9000"\npfsync_ignore="10.0.0.1 10.9.0.0/16"\n'
        'pfsync_carp_demotion_factor="100"\npfsync_refresh="10"\n'
    )
    config = parse_config(text)
    assert config.port == 9000 and config.demotion_factor == 100
    assert config.refresh_interval == 10.0
    assert config.ignore == (
        ipaddress.ip_network("10.0.0.1/32"),
        ipaddress.ip_network("10.9.0.0/16"),
    )


def test_keyfile(tmp_path: Path) -> None:
    keyfile = tmp_path / "pfsync.key"
    keyfile.write_text("a secret from a file\n")
    text = SEED.replace('pfsync_key="sixteen bytes or more"', f'pfsync_keyfile="{keyfile}"')
    assert parse_config(text).key == b"a secret from a file"


@pytest.mark.parametrize(
    ("line", "where", "words"),
    [
        ('pfsync_syncpeer="192.168.255.300"', "rc.conf:5:17", "IPv4 or IPv6"),
        ('pfsync_port="70000"', "rc.conf:7:13", "1..65535"),
        ('pfsync_ignore="10.0.0.1 nonsense"', "rc.conf:7:25", "not an address"),
        ('pfsync_enable="MAYBE"', "rc.conf:3:15", "YES"),
        ('pfsync_key="short"', "rc.conf:6:12", "at least 16"),
        ('pfsync_sycndev="em1"', "rc.conf:7:1", "unknown pfsync setting"),
        ('pfsync_group="10.0.0.1"', "rc.conf:7:14", "multicast"),
    ],
)
def test_errors_point_at_file_line_column(line: str, where: str, words: str) -> None:
    name = line.split("=")[0]
    lines = SEED.splitlines()
    replaced = [line if entry.startswith(name + "=") else entry for entry in lines]
    if replaced == lines:
        replaced.append(line)
    with pytest.raises(ConfigError) as caught:
        parse_config("\n".join(replaced) + "\n", "rc.conf")
    message = str(caught.value)
    assert message.startswith(where), message
    assert words in message


def test_missing_syncdev_and_key_say_what_to_do() -> None:
    with pytest.raises(ConfigError, match="pfsync_syncdev is not set"):
        parse_config('pfsync_enable="YES"\npfsync_key="sixteen bytes or more"\n')
    with pytest.raises(ConfigError, match="set pfsync_key"):
        parse_config('pfsync_enable="YES"\npfsync_syncdev="em1"\n')


def test_status_text_uses_pfctl_and_netstat_words() -> None:
    status = {
        "states": 200, "syncok": True, "bulk": "done", "bulk_tries": 1, "demotion": 0,
        "peer": "up", "syncdev": "em1", "syncpeer": "192.168.255.2", "port": 8240,
        "destination": "192.168.255.2", "running_seconds": 100.0,
        "counters": {"inserts": 200, "removals": 5, "ipackets": 50, "badauth": 3,
                     "opackets": 70, "table_full": 2},
    }  # fmt: skip
    text = format_status(status)
    assert "Status: Enabled for 0 days 00:01:40" in text and "syncok: yes" in text
    assert "current entries" in text and "200" in text
    assert "inserts" in text and "2.0/s" in text
    assert "50 packets received" in text
    assert "3 packets discarded for bad authentication" in text
    assert "70 packets sent" in text
    assert "2 states not inserted: conntrack table full" in text
    assert "2 errors" in text


def test_table_writer_counts_a_full_table_apart() -> None:
    from carpool.pfsync.conntrack import ApplyReport, TableWriter

    writer = TableWriter.__new__(TableWriter)
    report = ApplyReport()
    retry: list[object] = []
    entry = object()
    writer._account("create", entry, errno.ENOMEM, report, retry)  # type: ignore[arg-type]
    writer._account("create", entry, errno.ENOSPC, report, retry)  # type: ignore[arg-type]
    writer._account("create", entry, errno.EEXIST, report, retry)  # type: ignore[arg-type]
    writer._account("delete", entry, errno.ENOENT, report, retry)  # type: ignore[arg-type]
    writer._account("update", entry, errno.EBUSY, report, retry)  # type: ignore[arg-type]
    assert report.table_full == 2 and report.already_gone == 1
    assert report.errors == {"EBUSY": 1} and report.failed == 3
    assert retry == [("update", entry)]
