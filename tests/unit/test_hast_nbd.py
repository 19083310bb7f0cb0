"""The NBD server state machine, driven with hand-built client bytes."""

from __future__ import annotations

import itertools
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.errors import ProtocolError
from carpool.hast.nbd import (
    IHAVEOPT,
    NBD_OPT_REPLY_MAGIC,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBDMAGIC,
    CommandFlag,
    Disconnect,
    Export,
    ExportChosen,
    Info,
    NbdCommand,
    NbdError,
    NbdEvent,
    NbdProtocolError,
    NbdServerConnection,
    Option,
    OptionReply,
    OptionRequested,
    Request,
    RequestRejected,
    State,
    TransmissionFlag,
    encode_simple_reply,
)

SIZE = 1 << 20
EXPORT = Export("res", SIZE, description="hast res")


def option(opt: int, data: bytes = b"") -> bytes:
    return struct.pack(">QII", IHAVEOPT, opt, len(data)) + data


def go_data(name: str, *infos: int) -> bytes:
    raw = name.encode()
    return struct.pack(">I", len(raw)) + raw + struct.pack(f">H{len(infos)}H", len(infos), *infos)


def request(cmd: int, cookie: int = 1, offset: int = 0, length: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, cookie, offset, length)


def parse_option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    out = []
    pos = 0
    while pos < len(data):
        magic, opt, rtype, length = struct.unpack_from(">QIII", data, pos)
        assert magic == NBD_OPT_REPLY_MAGIC
        out.append((opt, rtype, data[pos + 20 : pos + 20 + length]))
        pos += 20 + length
    return out


def parse_simple_replies(data: bytes) -> list[tuple[int, int]]:
    assert len(data) % 16 == 0
    out = []
    for pos in range(0, len(data), 16):
        magic, error, cookie = struct.unpack_from(">IIQ", data, pos)
        assert magic == NBD_SIMPLE_REPLY_MAGIC
        out.append((cookie, error))
    return out


def connected(export: Export = EXPORT) -> NbdServerConnection:
    conn = NbdServerConnection([export])
    conn.data_to_send()
    events = conn.receive_data(struct.pack(">I", 3) + option(Option.GO, go_data(export.name)))
    assert isinstance(events[-1], ExportChosen)
    conn.data_to_send()
    return conn


def test_greeting() -> None:
    conn = NbdServerConnection([EXPORT])
    assert conn.data_to_send() == struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3)
    assert conn.data_to_send() == b""
    assert conn.state is State.HANDSHAKE


def test_unknown_client_flags_hang_up() -> None:
    conn = NbdServerConnection([EXPORT])
    events = conn.receive_data(struct.pack(">I", 0x80))
    assert events == [Disconnect(False, "unknown client flags 0x80")]
    assert conn.state is State.CLOSED
    assert conn.receive_data(b"more") == []


def test_nbd_client_go_without_infos() -> None:
    conn = NbdServerConnection({"res": EXPORT})
    conn.data_to_send()
    events = conn.receive_data(struct.pack(">I", 1) + option(Option.GO, go_data("res")))
    assert events[0] == OptionRequested(Option.GO, 9, True)
    assert events[1] == ExportChosen(EXPORT, False)
    replies = parse_option_replies(conn.data_to_send())
    flags = (
        TransmissionFlag.HAS_FLAGS
        | TransmissionFlag.SEND_FLUSH
        | TransmissionFlag.SEND_FUA
        | TransmissionFlag.SEND_TRIM
        | TransmissionFlag.SEND_WRITE_ZEROES
    )
    assert replies == [
        (Option.GO, OptionReply.INFO, struct.pack(">HQH", Info.EXPORT, SIZE, flags)),
        (Option.GO, OptionReply.ACK, b""),
    ]
    assert not flags & TransmissionFlag.CAN_MULTI_CONN
    assert conn.state is State.TRANSMISSION and conn.export == EXPORT


def test_libnbd_sequence_structured_refused_then_info_and_go() -> None:
    conn = NbdServerConnection([EXPORT])
    conn.data_to_send()
    wire = (
        struct.pack(">I", 3)
        + option(Option.STRUCTURED_REPLY)
        + option(Option.INFO, go_data("res", Info.BLOCK_SIZE, Info.NAME, Info.DESCRIPTION))
        + option(Option.GO, go_data("res", Info.BLOCK_SIZE))
    )
    events = conn.receive_data(wire)
    assert [type(e) for e in events] == [OptionRequested] * 3 + [ExportChosen]
    assert events[0] == OptionRequested(Option.STRUCTURED_REPLY, 0, False)
    replies = parse_option_replies(conn.data_to_send())
    kinds = [(o, r) for o, r, _ in replies]
    assert kinds == [
        (Option.STRUCTURED_REPLY, OptionReply.ERR_UNSUP),
        (Option.INFO, OptionReply.INFO),
        (Option.INFO, OptionReply.INFO),
        (Option.INFO, OptionReply.INFO),
        (Option.INFO, OptionReply.INFO),
        (Option.INFO, OptionReply.ACK),
        (Option.GO, OptionReply.INFO),
        (Option.GO, OptionReply.INFO),
        (Option.GO, OptionReply.ACK),
    ]
    assert replies[2][2] == struct.pack(">HIII", Info.BLOCK_SIZE, 1, 4096, 32 << 20)
    assert replies[3][2] == struct.pack(">H", Info.NAME) + b"res"
    assert replies[4][2] == struct.pack(">H", Info.DESCRIPTION) + b"hast res"


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_export_name(no_zeroes: bool) -> None:
    conn = NbdServerConnection([EXPORT])
    conn.data_to_send()
    events = conn.receive_data(struct.pack(">I", 1 | (2 * no_zeroes)) + option(1, b"res"))
    assert events[-1] == ExportChosen(EXPORT, no_zeroes)
    out = conn.data_to_send()
    assert len(out) == 10 + (0 if no_zeroes else 124)
    size, flags = struct.unpack_from(">QH", out)
    assert size == SIZE and flags & TransmissionFlag.HAS_FLAGS


def test_export_name_unknown_hangs_up_and_default_export() -> None:
    conn = NbdServerConnection([EXPORT])
    events = conn.receive_data(struct.pack(">I", 1) + option(1, b"nope"))
    assert isinstance(events[-1], Disconnect) and not events[-1].clean
    conn = NbdServerConnection([EXPORT], default_export="res")
    events = conn.receive_data(struct.pack(">I", 1) + option(1, b""))
    assert events[-1] == ExportChosen(EXPORT, False)


def test_go_errors_keep_negotiating() -> None:
    conn = NbdServerConnection([EXPORT])
    conn.data_to_send()
    wire = (
        struct.pack(">I", 3)
        + option(Option.GO, go_data("nope"))
        + option(Option.GO, b"\x00\x00")
        + option(Option.GO, go_data("res")[:-1] + b"\x01")
        + option(Option.INFO, struct.pack(">I", 2) + b"\xff\xfe" + b"\x00\x00")
        + option(99)
        + option(Option.STARTTLS)
        + option(Option.LIST, b"x")
    )
    events = conn.receive_data(wire)
    assert conn.state is State.OPTIONS
    assert all(isinstance(e, OptionRequested) for e in events)
    assert [r for _, r, _ in parse_option_replies(conn.data_to_send())] == [
        OptionReply.ERR_UNKNOWN,
        OptionReply.ERR_INVALID,
        OptionReply.ERR_INVALID,
        OptionReply.ERR_INVALID,
        OptionReply.ERR_UNSUP,
        OptionReply.ERR_UNSUP,
        OptionReply.ERR_INVALID,
    ]


def test_list_and_abort() -> None:
    conn = NbdServerConnection([EXPORT, Export("other", 512)])
    conn.data_to_send()
    events = conn.receive_data(struct.pack(">I", 3) + option(Option.LIST) + option(Option.ABORT))
    assert events[-1] == Disconnect(True, "the client aborted the negotiation")
    replies = parse_option_replies(conn.data_to_send())
    assert replies == [
        (Option.LIST, OptionReply.SERVER, b"\x00\x00\x00\x03res"),
        (Option.LIST, OptionReply.SERVER, b"\x00\x00\x00\x05other"),
        (Option.LIST, OptionReply.ACK, b""),
        (Option.ABORT, OptionReply.ACK, b""),
    ]


def test_without_fixed_newstyle_unknown_option_hangs_up() -> None:
    conn = NbdServerConnection([EXPORT])
    events = conn.receive_data(struct.pack(">I", 0) + option(Option.LIST))
    assert isinstance(events[-1], Disconnect)


def test_bad_option_magic_and_huge_option() -> None:
    conn = NbdServerConnection([EXPORT])
    events = conn.receive_data(struct.pack(">I", 1) + b"X" * 16)
    assert events == [Disconnect(False, "bad option magic")]
    conn = NbdServerConnection([EXPORT])
    events = conn.receive_data(struct.pack(">I", 1) + struct.pack(">QII", IHAVEOPT, 7, 1 << 31))
    assert isinstance(events[-1], Disconnect)


def test_read_and_reply_buffers() -> None:
    conn = connected()
    (ev,) = conn.receive_data(request(NbdCommand.READ, cookie=7, offset=4096, length=512))
    assert ev == Request(7, NbdCommand.READ, 0, 4096, 512)
    data = memoryview(bytes(512))
    bufs = conn.reply(ev, 0, data)
    assert bufs[0] == encode_simple_reply(7) and bufs[1] is data
    assert conn.reply(ev, NbdError.EIO) == [encode_simple_reply(7, 5)]
    with pytest.raises(NbdProtocolError):
        conn.reply(ev, 0, b"short")
    with pytest.raises(NbdProtocolError):
        conn.reply(Request(1, NbdCommand.FLUSH, 0, 0, 0), 0, b"x")
    assert issubclass(NbdProtocolError, ProtocolError)


def test_write_byte_by_byte() -> None:
    conn = connected()
    payload = bytes(range(256)) * 4
    wire = request(NbdCommand.WRITE, cookie=9, offset=512, length=1024, flags=1) + payload
    wire += request(NbdCommand.FLUSH, cookie=10)
    events: list[NbdEvent] = []
    for i in range(len(wire)):
        events += conn.receive_data(wire[i : i + 1])
    assert len(events) == 2
    write, flush = events
    assert isinstance(write, Request) and write.data is not None
    assert bytes(write.data) == payload and write.fua and not write.no_hole
    assert flush == Request(10, NbdCommand.FLUSH, 0, 0, 0)
    assert conn.data_to_send() == b""


def test_write_zero_copy_buffer() -> None:
    conn = connected()
    assert conn.write_buffer() is None
    assert conn.receive_data(request(NbdCommand.WRITE, cookie=3, length=8)) == []
    buf = conn.write_buffer()
    assert buf is not None and len(buf) == 8
    buf[:5] = b"hello"
    assert conn.received_into(5) == []
    buf = conn.write_buffer()
    assert buf is not None and len(buf) == 3
    buf[:] = b"abc"
    (ev,) = conn.received_into(3)
    assert isinstance(ev, Request) and ev.data is not None and bytes(ev.data) == b"helloabc"
    with pytest.raises(NbdProtocolError):
        conn.received_into(1)


def test_trim_write_zeroes_flags_and_disc() -> None:
    conn = connected()
    wire = (
        request(NbdCommand.TRIM, 1, 0, 4096, CommandFlag.FUA)
        + request(NbdCommand.WRITE_ZEROES, 2, 0, 8192, CommandFlag.NO_HOLE)
        + request(NbdCommand.DISC, 3)
        + request(NbdCommand.READ, 4, 0, 1)
    )
    events = conn.receive_data(wire)
    assert events[0] == Request(1, NbdCommand.TRIM, 1, 0, 4096)
    assert isinstance(events[1], Request) and events[1].no_hole
    assert events[2] == Disconnect(True, "the client disconnected")
    assert len(events) == 3 and conn.state is State.CLOSED


def test_validation_replies_and_continues() -> None:
    conn = connected()
    wire = (
        request(42, cookie=1)
        + request(NbdCommand.READ, 2, SIZE - 512, 1024)
        + request(NbdCommand.WRITE, 3, SIZE, 4)
        + b"abcd"
        + request(NbdCommand.READ, 4, 0, 512, CommandFlag.FUA)
        + request(NbdCommand.READ, 5, 0, 0)
        + request(NbdCommand.WRITE_ZEROES, 6, SIZE, 1)
        + request(NbdCommand.TRIM, 7, 2**64 - 1, 2**32 - 1)
        + request(NbdCommand.BLOCK_STATUS, 8, 0, 512)
        + request(NbdCommand.READ, 9, 0, 512)
    )
    events = conn.receive_data(wire)
    assert [type(e) for e in events] == [RequestRejected] * 8 + [Request]
    rejected = [e for e in events if isinstance(e, RequestRejected)]
    assert [e.error for e in rejected] == [
        NbdError.EINVAL,
        NbdError.EINVAL,
        NbdError.ENOSPC,
        NbdError.EINVAL,
        NbdError.EINVAL,
        NbdError.ENOSPC,
        NbdError.EINVAL,
        NbdError.EINVAL,
    ]
    assert parse_simple_replies(conn.data_to_send()) == [(e.cookie, e.error) for e in rejected]
    assert conn.state is State.TRANSMISSION


def test_read_only_export_refuses_writes() -> None:
    conn = connected(Export("ro", SIZE, read_only=True))
    events = conn.receive_data(
        request(NbdCommand.WRITE, 1, 0, 2) + b"xy" + request(NbdCommand.TRIM, 2, 0, 2)
    )
    assert [e.error for e in events if isinstance(e, RequestRejected)] == [NbdError.EPERM] * 2


@pytest.mark.parametrize("cmd", [NbdCommand.READ, NbdCommand.WRITE])
def test_oversized_request_replies_and_disconnects(cmd: NbdCommand) -> None:
    conn = connected(Export("big", 1 << 40))
    events = conn.receive_data(request(cmd, 5, 0, (32 << 20) + 1))
    assert isinstance(events[0], RequestRejected) and events[0].error == NbdError.EINVAL
    assert isinstance(events[1], Disconnect) and not events[1].clean
    assert parse_simple_replies(conn.data_to_send()) == [(5, NbdError.EINVAL)]


def test_bad_request_magic_and_eof() -> None:
    conn = connected()
    events = conn.receive_data(b"\x00" * 28)
    assert isinstance(events[0], Disconnect)
    conn = connected()
    assert conn.receive_data(b"") == [Disconnect(False, "the client closed the connection")]


SESSION = (
    struct.pack(">I", 3)
    + option(Option.STRUCTURED_REPLY)
    + option(Option.GO, go_data("res", Info.BLOCK_SIZE))
    + request(NbdCommand.WRITE, 1, 0, 300)
    + bytes(range(100)) * 3
    + request(NbdCommand.READ, 2, 0, 300)
    + request(NbdCommand.WRITE, 3, 8, 5)
    + b"hello"
    + request(77, 4)
    + request(NbdCommand.FLUSH, 5)
    + request(NbdCommand.DISC, 6)
)


def _summary(events: list[NbdEvent]) -> list[object]:
    out: list[object] = []
    for e in events:
        if isinstance(e, Request):
            out.append(
                (e.cookie, e.command, e.offset, e.length, None if e.data is None else bytes(e.data))
            )
        else:
            out.append(e)
    return out


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, len(SESSION)), max_size=30))
def test_any_split_gives_the_same_events(cuts: list[int]) -> None:
    whole = NbdServerConnection([EXPORT])
    expected = _summary(whole.receive_data(SESSION))
    conn = NbdServerConnection([EXPORT])
    events: list[NbdEvent] = []
    bounds = sorted({0, len(SESSION), *cuts})
    for a, b in itertools.pairwise(bounds):
        events += conn.receive_data(SESSION[a:b])
    assert _summary(events) == expected
    assert conn.data_to_send() == whole.data_to_send()
    assert isinstance(events[-1], Disconnect) and events[-1].clean


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.sampled_from(["start", "options", "transmission"]))
def test_fuzz_never_raises(data: bytes, where: str) -> None:
    if where == "transmission":
        conn = connected()
    else:
        conn = NbdServerConnection([EXPORT])
        if where == "options":
            conn.receive_data(struct.pack(">I", 3))
    events = conn.receive_data(data)
    conn.data_to_send()
    for e in events:
        assert isinstance(
            e, OptionRequested | ExportChosen | Request | RequestRejected | Disconnect
        )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 8), st.integers(0, 31), st.integers(0, 2 * SIZE), st.integers(0, 4096)
        ),
        max_size=20,
    )
)
def test_fuzz_structured_requests(reqs: list[tuple[int, int, int, int]]) -> None:
    conn = connected()
    wire = b""
    for i, (cmd, flags, offset, length) in enumerate(reqs):
        wire += request(cmd, i, offset, length, flags)
        if cmd == NbdCommand.WRITE:
            wire += bytes(length)
    events = conn.receive_data(wire)
    for e in events:
        if isinstance(e, Request):
            assert e.offset + e.length <= SIZE or e.command is NbdCommand.FLUSH
            if e.command is NbdCommand.WRITE:
                assert e.data is not None and len(e.data) == e.length
        else:
            assert isinstance(e, RequestRejected | Disconnect)
