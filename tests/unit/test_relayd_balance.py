"""relayd host selection: modes, skipping down hosts, fairness, stickiness."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.relayd.balance import Balancer, NoHostError, table_key
from carpool.relayd.model import Mode

KEY = bytes(range(16))
ALL_MODES = list(Mode)


def make(mode: Mode, n: int = 3, up: tuple[int, ...] | None = None) -> Balancer:
    hosts = list(range(1, n + 1))
    return Balancer(hosts, mode, key=KEY, rng=random.Random(7), up=hosts if up is None else up)


def test_table_key() -> None:
    assert table_key("0x" + "ab" * 16) == bytes([0xAB] * 16)
    assert len(table_key("secret")) == 16
    assert table_key("secret") == table_key("secret")
    assert table_key(None) != table_key(None)


def test_roundrobin_order_and_skip() -> None:
    b = make(Mode.ROUNDROBIN)
    assert [b.select() for _ in range(6)] == [1, 2, 3, 1, 2, 3]
    b.set_up(2, False)
    assert [b.select() for _ in range(4)] == [1, 3, 1, 3]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_no_host_up(mode: Mode) -> None:
    b = make(mode, up=())
    with pytest.raises(NoHostError):
        b.select(client_addr="10.0.0.1")


def test_least_states() -> None:
    b = make(Mode.LEAST_STATES)
    b.session_opened(1)
    b.session_opened(1)
    b.session_opened(2)
    assert b.select() == 3
    b.session_opened(3)
    b.session_opened(3)
    assert b.select() == 2
    b.session_closed(1)
    b.session_closed(1)
    assert b.select() == 1


def test_loadbalance_uses_relay_address() -> None:
    b = make(Mode.LOADBALANCE, n=8)
    picks = {b.select(client_addr="192.0.2.1", relay_addr="10.0.0.100", relay_port=p) for p in
             range(1, 200)}
    assert len(picks) > 1  # the relay port is part of the hash
    one = b.select(client_addr="192.0.2.1", relay_addr="10.0.0.100", relay_port=443)
    assert one == b.select(client_addr="192.0.2.1", relay_addr="10.0.0.100", relay_port=443)


def test_hash_uses_hash_data() -> None:
    b = make(Mode.HASH, n=8)
    picks = {b.select(relay_addr="10.0.0.100", relay_port=443, hash_data=str(i).encode())
             for i in range(100)}
    assert len(picks) > 1


@settings(max_examples=150, deadline=None)
@given(
    mode=st.sampled_from(ALL_MODES),
    n=st.integers(1, 8),
    data=st.data(),
)
def test_only_up_hosts_are_chosen(mode: Mode, n: int, data: st.DataObject) -> None:
    hosts = list(range(1, n + 1))
    up = data.draw(st.sets(st.sampled_from(hosts), min_size=1))
    b = Balancer(hosts, mode, key=KEY, rng=random.Random(1), up=up)
    for _ in range(20):
        addr = data.draw(st.ip_addresses().map(str))
        h = b.select(client_addr=addr, relay_addr="10.0.0.1", relay_port=443, hash_data=b"x")
        assert h in up
        b.session_opened(h)
        if data.draw(st.booleans()):
            flip = data.draw(st.sampled_from(hosts))
            if b.is_up(flip) and len(b.up_hosts) > 1:
                b.set_up(flip, False)
            else:
                b.set_up(flip, True)
            up = set(b.up_hosts)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 8), picks=st.integers(1, 100), data=st.data())
def test_roundrobin_is_fair(n: int, picks: int, data: st.DataObject) -> None:
    hosts = list(range(1, n + 1))
    up = data.draw(st.sets(st.sampled_from(hosts), min_size=1))
    b = Balancer(hosts, Mode.ROUNDROBIN, key=KEY, up=up)
    counts = Counter(b.select() for _ in range(picks))
    assert set(counts) <= up
    full = [counts.get(h, 0) for h in up]
    assert max(full) - min(full) <= 1
    assert sum(full) == picks


@settings(max_examples=100, deadline=None)
@given(n=st.integers(2, 8), sources=st.lists(st.ip_addresses().map(str), min_size=1, max_size=30),
       data=st.data())
def test_source_hash_is_sticky(n: int, sources: list[str], data: st.DataObject) -> None:
    hosts = list(range(1, n + 1))
    up = data.draw(st.sets(st.sampled_from(hosts), min_size=1))
    b = Balancer(hosts, Mode.SOURCE_HASH, key=KEY, up=up)
    first = {s: b.select(client_addr=s) for s in sources}
    for s in reversed(sources):
        # other traffic in between changes nothing
        b.select(client_addr="198.51.100.7")
        assert b.select(client_addr=s) == first[s]
    # a host going down moves only the sources it served
    if len(up) > 1:
        gone = data.draw(st.sampled_from(sorted(up)))
        b.set_up(gone, False)
        for s in sources:
            if first[s] != gone:
                assert b.select(client_addr=s) == first[s]
            else:
                assert b.select(client_addr=s) != gone


def test_random_is_spread_and_deterministic() -> None:
    a = make(Mode.RANDOM, n=4)
    b = make(Mode.RANDOM, n=4)
    seq = [a.select() for _ in range(400)]
    assert seq == [b.select() for _ in range(400)]
    assert set(seq) == {1, 2, 3, 4}


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        Balancer([1, 1])
    with pytest.raises(ValueError):
        Balancer([1], key=b"short")
    with pytest.raises(KeyError):
        Balancer([1]).set_up(9, True)
