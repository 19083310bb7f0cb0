"""relayd health checks: retry semantics, scheduling, counters, parents, evaluators."""

from __future__ import annotations

import hashlib

from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.relayd.glob import glob_match
from carpool.relayd.health import (
    CheckResult,
    HostDown,
    HostError,
    HostSpec,
    HostState,
    HostUp,
    TableHealth,
    body_hasher,
    evaluate_http,
    evaluate_send_expect,
    http_check_request,
)
from carpool.relayd.model import Check, CheckType

HTTP = Check(type=CheckType.HTTP, path="/", code=200)
OK = CheckResult.success(HostError.HTTP_CODE_OK, 3.0)
FAIL = CheckResult.failure(HostError.TCP_CONNECT_FAIL)


def table(retry: int = 0, check: Check = HTTP) -> TableHealth:
    hosts = [HostSpec(1, "10.0.0.10", retry), HostSpec(2, "10.0.0.11", retry)]
    return TableHealth("webhosts:8080", hosts, check, interval=10, table_id=1)


def test_first_result_sets_state_and_events() -> None:
    t = table()
    ids, ev = t.start_round(0.0)
    assert ids == [1, 2] and ev == []
    assert t.up == 0
    (e,) = t.record(1, OK, 0.1)
    assert isinstance(e, HostUp) and e.previous is HostState.UNKNOWN and e.host == "10.0.0.10"
    (e,) = t.record(2, FAIL, 0.1)
    assert isinstance(e, HostDown) and e.error is HostError.TCP_CONNECT_FAIL
    assert e.name == "host_down"
    assert "state unknown -> down" in e.log_line("http code")
    assert t.up == 1 and t.usable_hosts() == [1]
    assert t.hosts[1].availability == 100.0 and t.hosts[2].availability == 0.0


def test_retry_tolerates_n_failures() -> None:
    t = table(retry=2)
    t.record(1, OK, 0)
    assert t.hosts[1].state is HostState.UP
    assert t.record(1, FAIL, 10) == []
    assert t.record(1, FAIL, 20) == []
    assert t.hosts[1].state is HostState.UP and t.hosts[1].retry_cnt == 0
    (e,) = t.record(1, FAIL, 30)
    assert isinstance(e, HostDown)
    # the retried checks counted as up: 3 up of 4
    assert (t.hosts[1].up_cnt, t.hosts[1].check_cnt) == (3, 4)
    # one success resets the counter and brings it up
    (e,) = t.record(1, OK, 40)
    assert isinstance(e, HostUp) and t.hosts[1].retry_cnt == 2


def test_failure_with_retries_while_unknown_is_not_counted() -> None:
    t = table(retry=1)
    assert t.record(1, FAIL, 0) == []
    h = t.hosts[1]
    assert h.state is HostState.UNKNOWN and h.check_cnt == 0 and h.availability is None
    (e,) = t.record(1, FAIL, 10)
    assert isinstance(e, HostDown)


@settings(max_examples=200, deadline=None)
@given(retry=st.integers(0, 4), results=st.lists(st.booleans(), max_size=40))
def test_down_exactly_after_retry_plus_one_failures(retry: int, results: list[bool]) -> None:
    t = table(retry=retry)
    run = 0
    ever_ok = False
    for i, ok in enumerate(results):
        t.record(1, OK if ok else FAIL, float(i))
        run = 0 if ok else run + 1
        ever_ok = ever_ok or ok
        h = t.hosts[1]
        if run > retry:
            want = HostState.DOWN
        elif ever_ok:
            want = HostState.UP
        else:
            want = HostState.UNKNOWN
        assert h.state is want
        assert h.up_cnt <= h.check_cnt <= i + 1


def test_interval_scheduling_and_interval_timeout() -> None:
    t = table()
    assert t.due(0.0)
    ids, _ = t.start_round(0.0)
    assert t.next_check == 10.0
    assert not t.due(5.0)
    assert t.start_round(5.0) == ([], [])
    t.record(1, OK, 1.0)
    # host 2 never answered: the next round fails it with "interval timeout"
    ids, ev = t.start_round(10.0)
    assert ids == [1, 2]
    assert len(ev) == 1 and ev[0].error is HostError.INTERVAL_TIMEOUT
    assert t.next_check == 20.0
    t.poll(12.0)
    assert t.due(12.0)
    # a late loop does not make rounds pile up
    t.start_round(55.0)
    assert t.next_check == 65.0


def test_parent_host_is_copied_not_checked() -> None:
    hosts = [HostSpec(1, "a"), HostSpec(2, "b", parent=1)]
    t = TableHealth("t:80", hosts, HTTP, interval=10)
    ids, _ = t.start_round(0)
    assert ids == [1]
    ev = t.record(1, OK, 0)
    assert [(type(e), e.host_id) for e in ev] == [(HostUp, 1), (HostUp, 2)]
    assert t.hosts[2].check_cnt == 1


def test_no_check_means_up() -> None:
    t = table(check=Check())
    assert t.up == 2
    assert not t.due(100.0)


def test_disable_enable() -> None:
    t = table()
    t.record(1, OK, 0)
    assert t.disable_host(1) and not t.disable_host(1)
    assert t.up == 0
    ids, _ = t.start_round(0)
    assert ids == [2]
    assert t.record(1, OK, 1) == []
    assert t.enable_host(1) and not t.enable_host(1)
    assert t.hosts[1].state is HostState.UNKNOWN and t.hosts[1].check_cnt == 0
    assert t.find_host("1") is t.hosts[1] and t.find_host("10.0.0.11") is t.hosts[2]
    assert t.find_host("nope") is None
    assert t.set_disabled(True) and not t.due(100)
    assert t.set_disabled(False)


def test_http_check_request() -> None:
    assert http_check_request(HTTP) == b"HEAD / HTTP/1.0\r\n\r\n"
    c = Check(type=CheckType.HTTP, path="/x", host="www.example.com", code=200)
    assert http_check_request(c) == (
        b"HEAD /x HTTP/1.1\r\nHost: www.example.com\r\nConnection: close\r\n\r\n"
    )
    d = Check(type=CheckType.HTTP, path="/", digest="a" * 40)
    assert http_check_request(d).startswith(b"GET / HTTP/1.0")


def test_evaluate_http_code() -> None:
    assert evaluate_http(b"HTTP/1.1 200 OK\r\n\r\n", None, HTTP).error is HostError.HTTP_CODE_OK
    r = evaluate_http(b"HTTP/1.0 503 Busy\r\n", None, HTTP)
    assert not r.ok and r.error is HostError.HTTP_CODE_FAIL
    for bad in (b"", b"HTTP/2 200 OK\r\n", b"HTTP/1.1 20", b"HTTP/1.1 abc x\r\n",
                b"HTTP/1.1 099 x\r\n", b"SSH-2.0-OpenSSH\r\n"):
        r = evaluate_http(bad, None, HTTP)
        assert not r.ok and r.error is HostError.HTTP_CODE_ERROR, bad


def test_evaluate_http_digest() -> None:
    body = b"hello\n"
    for n in (40, 32):
        want = (hashlib.sha1(body) if n == 40 else hashlib.md5(body)).hexdigest()
        check = Check(type=CheckType.HTTP, path="/", digest=want)
        h = body_hasher(check)
        h.update(body)
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n"
        assert evaluate_http(head, h.hexdigest(), check).error is HostError.HTTP_DIGEST_OK
        assert evaluate_http(head, "0" * n, check).error is HostError.HTTP_DIGEST_FAIL
        assert evaluate_http(b"HTTP/1.1 200", h.hexdigest(), check).error is (
            HostError.HTTP_DIGEST_ERROR
        )


def test_evaluate_send_expect() -> None:
    assert evaluate_send_expect(b"SSH-2.0-OpenSSH_9.6\r\n", "SSH-2.0-*").ok
    assert not evaluate_send_expect(b"220 smtp ready\r\n", "SSH-*").ok
    assert evaluate_send_expect(b"+OK\0junk", "+OK").ok
    assert evaluate_send_expect(b"\x01\x02\x03", "0102", binary=True).ok
    assert not evaluate_send_expect(b"\x01", "0102", binary=True).ok
    assert not evaluate_send_expect(b"\x01", "zz", binary=True).ok
    r = evaluate_send_expect(b"x", "y")
    assert r.error is HostError.SEND_EXPECT_FAIL


def test_glob() -> None:
    assert glob_match("text/html*", "text/html; charset=utf-8")
    assert glob_match("a?c", "abc") and not glob_match("a?c", "ac")
    assert glob_match("[!x]b", "ab") and glob_match("[^x]b", "ab") and not glob_match("[!a]b", "ab")
    assert glob_match("[a-c]", "b") and not glob_match("[a-c]", "d")
    assert glob_match("\\*", "*") and not glob_match("\\*", "a")
    assert glob_match("*/x", "a/b/x")
    assert glob_match("TEXT/*", "text/html", casefold=True) and not glob_match("TEXT/*", "text/")
    assert glob_match("[", "[") and glob_match("a[]]", "a]")
