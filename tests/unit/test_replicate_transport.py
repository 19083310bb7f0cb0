"""transport: Local runs, ssh argv, pipe() byte counts and failures, the token bucket's pacing."""

from __future__ import annotations

import subprocess

import pytest

from carpool.replicate.transport import (
    CommandError,
    Local,
    PipeError,
    Ssh,
    TokenBucket,
    pipe,
)


def ends(
    send: list[str], recv: list[str]
) -> tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]:
    local = Local()
    recv_proc = local.start(recv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    send_proc = local.start(send, stdout=subprocess.PIPE)
    return send_proc, recv_proc


def counting_receiver() -> list[str]:
    return ["sh", "-c", "wc -c >&2"]


def test_local_run_returns_output() -> None:
    result = Local().run(["sh", "-c", "echo out; echo err >&2"])
    assert result == type(result)(0, "out\n", "err\n")


def test_local_run_passes_input() -> None:
    assert Local().run(["cat"], input="abc").stdout == "abc"


def test_local_run_failure_names_command_and_stderr() -> None:
    with pytest.raises(CommandError) as info:
        Local().run(["sh", "-c", "echo boom >&2; exit 3"])
    assert info.value.returncode == 3
    assert "boom" in str(info.value)
    assert "sh -c" in str(info.value)


def test_local_run_check_false_returns_failure() -> None:
    result = Local().run(["sh", "-c", "exit 4"], check=False)
    assert result.returncode == 4


def test_local_run_missing_command() -> None:
    with pytest.raises(CommandError, match="not found"):
        Local().run(["/nonexistent/carpool-no-such-tool"])


def test_local_run_timeout() -> None:
    with pytest.raises(CommandError, match="no answer within"):
        Local().run(["sleep", "5"], timeout=0.2)


def test_ssh_wraps_argv_quoted() -> None:
    ssh = Ssh("db2", user="root", port=2222, identity="/k", options=("StrictHostKeyChecking=no",))
    argv = ssh.wrap(["zfs", "list", "-H", "pool/a b"])
    assert argv == [
        "ssh",
        "-o",
        "BatchMode=yes",
        "-p",
        "2222",
        "-i",
        "/k",
        "-o",
        "StrictHostKeyChecking=no",
        "root@db2",
        "--",
        "zfs list -H 'pool/a b'",
    ]
    assert ssh.describe() == "root@db2:2222"


@pytest.mark.parametrize("size", [0, 1, 65536, 3 * 1024 * 1024 + 7])
def test_pipe_counts_bytes(size: int) -> None:
    send, recv = ends(["head", "-c", str(size), "/dev/zero"], counting_receiver())
    seen: list[int] = []
    result = pipe(send, recv, progress=seen.append)
    assert result.bytes_copied == size
    assert int(result.receive_stderr.strip()) == size
    assert (seen[-1] if seen else 0) == size


def test_pipe_with_limit_copies_everything() -> None:
    size = 300_000
    send, recv = ends(["head", "-c", str(size), "/dev/zero"], counting_receiver())
    result = pipe(send, recv, limit_bytes_per_s=100_000_000)
    assert result.bytes_copied == size
    assert int(result.receive_stderr.strip()) == size


def test_pipe_send_failure_names_sender() -> None:
    send, recv = ends(["sh", "-c", "echo no such snapshot >&2; exit 3"], ["cat"])
    with pytest.raises(PipeError) as info:
        pipe(send, recv)
    assert info.value.side == "send"
    assert "sending side" in str(info.value)
    assert "exit 3" in str(info.value)
    assert "no such snapshot" in str(info.value)


def test_pipe_false_sender() -> None:
    send, recv = ends(["false"], ["cat"])
    with pytest.raises(PipeError) as info:
        pipe(send, recv)
    assert info.value.side == "send"
    assert "'false'" in str(info.value)


def test_pipe_receive_failure_names_receiver() -> None:
    send, recv = ends(
        ["head", "-c", str(8 * 1024 * 1024), "/dev/zero"],
        ["sh", "-c", "head -c 10 >/dev/null; echo invalid backup stream >&2; exit 1"],
    )
    with pytest.raises(PipeError) as info:
        pipe(send, recv)
    assert info.value.side == "receive"
    assert "receiving side" in str(info.value)
    assert "invalid backup stream" in str(info.value)


def test_pipe_receiver_exits_zero_early_is_an_error() -> None:
    send, recv = ends(["head", "-c", str(8 * 1024 * 1024), "/dev/zero"], ["true"])
    with pytest.raises(PipeError) as info:
        pipe(send, recv)
    assert info.value.side == "receive"
    assert "closed its input" in str(info.value)


def test_pipe_receiver_false() -> None:
    send, recv = ends(["head", "-c", "100", "/dev/zero"], ["false"])
    with pytest.raises(PipeError) as info:
        pipe(send, recv)
    assert info.value.side == "receive"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_bucket_allows_burst_then_paces() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=500, clock=clock, sleep=clock.sleep)
    assert bucket.consume(500) == 0.0
    assert bucket.consume(250) == pytest.approx(0.25)
    assert bucket.consume(1000) == pytest.approx(1.0)
    assert clock.sleeps == [pytest.approx(0.25), pytest.approx(1.0)]


def test_bucket_total_sleep_matches_rate() -> None:
    clock = FakeClock()
    rate, burst, chunk, count = 10_000, 1000, 700, 100
    bucket = TokenBucket(rate, burst=burst, clock=clock, sleep=clock.sleep)
    for _ in range(count):
        bucket.consume(chunk)
    assert sum(clock.sleeps) == pytest.approx((chunk * count - burst) / rate)


def test_bucket_idle_time_refills_only_up_to_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000, burst=100, clock=clock, sleep=clock.sleep)
    clock.now += 60.0  # a long pause earns no more than the burst
    assert bucket.consume(100) == 0.0
    assert bucket.consume(100) == pytest.approx(0.1)


def test_bucket_rejects_bad_rate() -> None:
    with pytest.raises(Exception, match="bandwidth limit"):
        TokenBucket(0)


def test_pipe_uses_injected_bucket_sleeps() -> None:
    clock = FakeClock()
    rate = 1_000_000
    bucket = TokenBucket(rate, burst=0, clock=clock, sleep=clock.sleep)
    size = 2_000_000
    send, recv = ends(["head", "-c", str(size), "/dev/zero"], counting_receiver())
    result = pipe(send, recv, bucket=bucket)
    assert result.bytes_copied == size
    assert sum(clock.sleeps) == pytest.approx(size / rate)
