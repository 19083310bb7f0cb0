"""The NBD protocol, server side, as a sans-I/O state machine (``NetworkBlockDevice/nbd`` proto.md).

This module owns the NBD state machine of one client connection; the daemon
is only its caller.  :class:`NbdServerConnection` never touches a socket:

* on creation it queues the fixed-newstyle greeting;
* :meth:`~NbdServerConnection.receive_data` takes bytes read from the client
  and returns the events they complete (:class:`OptionRequested`,
  :class:`ExportChosen`, :class:`Request`, :class:`RequestRejected`,
  :class:`Disconnect`);
* :meth:`~NbdServerConnection.data_to_send` returns the bytes the machine
  wants written (handshake replies, and error replies for requests it refused
  on its own);
* :meth:`~NbdServerConnection.reply` builds the simple reply to a
  :class:`Request` the caller has carried out, as buffers for
  ``writelines``/``sendmsg`` (a READ's data is never copied).

For large WRITEs the caller may skip a copy: while a WRITE payload is being
received, :meth:`~NbdServerConnection.write_buffer` returns the unfilled part
of the payload buffer to ``recv_into``, followed by
:meth:`~NbdServerConnection.received_into`.

Negotiation: fixed newstyle with NO_ZEROES; options EXPORT_NAME, INFO, GO
(INFO_EXPORT always, NAME/DESCRIPTION/BLOCK_SIZE when asked), LIST, ABORT;
everything else (STARTTLS, STRUCTURED_REPLY, meta contexts, extended
headers...) gets ``NBD_REP_ERR_UNSUP`` and negotiation goes on.
Transmission: simple replies only; READ, WRITE, DISC, FLUSH, TRIM,
WRITE_ZEROES; flags FUA (WRITE, TRIM, WRITE_ZEROES) and NO_HOLE
(WRITE_ZEROES).  Advertised transmission flags: HAS_FLAGS, SEND_FLUSH,
SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES (+READ_ONLY for a read-only export);
never CAN_MULTI_CONN.

Validation in transmission: an unknown command or flag → EINVAL; a range past
the end of the export → ENOSPC for WRITE/WRITE_ZEROES and EINVAL otherwise
(proto.md); a WRITE/WRITE_ZEROES/TRIM on a read-only export → EPERM; zero-length
READ/WRITE → EINVAL; all answered with an error reply, the connection goes
on.  A READ or WRITE longer than :data:`MAX_REQUEST` (32 MiB) gets EINVAL and
the connection is closed (its payload cannot be trusted to follow); so is a
request with a wrong magic.  Every failure of the peer is reported as an event,
never raised: a broken client costs a connection, not a daemon.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from carpool.errors import ProtocolError

__all__ = [
    "CLIENT_FLAGS_KNOWN",
    "MAX_OPTION_LENGTH",
    "MAX_REQUEST",
    "NBD_REQUEST_MAGIC",
    "NBD_SIMPLE_REPLY_MAGIC",
    "CommandFlag",
    "Disconnect",
    "Export",
    "ExportChosen",
    "HandshakeFlag",
    "Info",
    "NbdCommand",
    "NbdError",
    "NbdEvent",
    "NbdProtocolError",
    "NbdServerConnection",
    "Option",
    "OptionReply",
    "OptionRequested",
    "Request",
    "RequestRejected",
    "State",
    "TransmissionFlag",
    "encode_simple_reply",
]

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
NBD_OPT_REPLY_MAGIC = 0x0003E889045565A9
NBD_REQUEST_MAGIC = 0x25609513
NBD_SIMPLE_REPLY_MAGIC = 0x67446698

#: Largest READ/WRITE payload accepted (the protocol's default maximum block size).
MAX_REQUEST = 32 * 1024 * 1024
#: Largest option payload accepted during negotiation (names are at most 4096 bytes).
MAX_OPTION_LENGTH = 16 * 1024
#: Preferred block size announced in NBD_INFO_BLOCK_SIZE.
PREFERRED_BLOCK_SIZE = 4096


class NbdProtocolError(ProtocolError):
    """NBD bytes that cannot be accepted (also the ``reason`` of a Disconnect)."""

    stat = "nbd_bad_requests"


class HandshakeFlag(enum.IntFlag):
    FIXED_NEWSTYLE = 1
    NO_ZEROES = 2


CLIENT_FLAGS_KNOWN = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES


class TransmissionFlag(enum.IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Option(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class OptionReply(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = 2**31 + 1
    ERR_POLICY = 2**31 + 2
    ERR_INVALID = 2**31 + 3
    ERR_PLATFORM = 2**31 + 4
    ERR_TLS_REQD = 2**31 + 5
    ERR_UNKNOWN = 2**31 + 6
    ERR_SHUTDOWN = 2**31 + 7
    ERR_BLOCK_SIZE_REQD = 2**31 + 8
    ERR_TOO_BIG = 2**31 + 9


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class NbdCommand(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CommandFlag(enum.IntFlag):
    FUA = 1
    NO_HOLE = 2
    DF = 4
    REQ_ONE = 8
    FAST_ZERO = 16


class NbdError(enum.IntEnum):
    """Error values of a simple reply (Linux errno numbers, as NBD defines them)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class State(enum.Enum):
    HANDSHAKE = "handshake"  #: waiting for the client flags
    OPTIONS = "options"  #: option haggling
    TRANSMISSION = "transmission"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Export:
    """One export: its name, size in bytes and whether it is read-only."""

    name: str
    size: int
    read_only: bool = False
    description: str = ""
    min_block: int = 1
    preferred_block: int = PREFERRED_BLOCK_SIZE
    max_block: int = MAX_REQUEST

    def transmission_flags(self) -> int:
        flags = (
            TransmissionFlag.HAS_FLAGS
            | TransmissionFlag.SEND_FLUSH
            | TransmissionFlag.SEND_FUA
            | TransmissionFlag.SEND_TRIM
            | TransmissionFlag.SEND_WRITE_ZEROES
        )
        if self.read_only:
            flags |= TransmissionFlag.READ_ONLY
        return int(flags)


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class OptionRequested:
    """The client sent an option (answered by the machine already; for logs and metrics)."""

    option: int
    length: int
    supported: bool


@dataclass(frozen=True, slots=True)
class ExportChosen:
    """Negotiation is over: requests for ``export`` follow."""

    export: Export
    no_zeroes: bool


@dataclass(frozen=True, slots=True)
class Request:
    """A valid request to carry out, then answer with :meth:`NbdServerConnection.reply`.

    ``data`` is the payload of a WRITE (a view of a buffer owned by this
    request; no other command has one).
    """

    cookie: int
    command: NbdCommand
    flags: int
    offset: int
    length: int
    data: memoryview | None = None

    @property
    def fua(self) -> bool:
        return bool(self.flags & _FUA)

    @property
    def no_hole(self) -> bool:
        return bool(self.flags & _NO_HOLE)


@dataclass(frozen=True, slots=True)
class RequestRejected:
    """A request the machine refused on its own; the error reply is already queued."""

    cookie: int
    command: int
    error: NbdError
    reason: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The connection is over: close it once :meth:`data_to_send` is written.

    ``clean`` is True for NBD_CMD_DISC and NBD_OPT_ABORT; otherwise ``reason``
    says what the client did wrong.
    """

    clean: bool
    reason: str = ""


NbdEvent = OptionRequested | ExportChosen | Request | RequestRejected | Disconnect

# --------------------------------------------------------------------------- encoders

_REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_SIMPLE_REPLY = struct.Struct(">IIQ")
_OPTION = struct.Struct(">QII")  # IHAVEOPT, option, length
_OPTION_REPLY = struct.Struct(">QIII")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_EXPORT_INFO = struct.Struct(">HQH")
_BLOCK_INFO = struct.Struct(">HIII")

_ALLOWED_FLAGS: dict[int, int] = {
    NbdCommand.READ: 0,
    NbdCommand.WRITE: int(CommandFlag.FUA),
    NbdCommand.FLUSH: 0,
    NbdCommand.TRIM: int(CommandFlag.FUA),
    NbdCommand.WRITE_ZEROES: int(CommandFlag.FUA | CommandFlag.NO_HOLE),
    NbdCommand.DISC: 0,
}
_MODIFYING = frozenset({NbdCommand.WRITE, NbdCommand.TRIM, NbdCommand.WRITE_ZEROES})
#: The per-request path avoids enum construction and IntFlag arithmetic (slow in CPython).
_COMMAND_BY_VALUE: dict[int, NbdCommand] = {int(c): c for c in NbdCommand}
_FUA = int(CommandFlag.FUA)
_NO_HOLE = int(CommandFlag.NO_HOLE)


def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    """The 16-byte simple reply header (data, for a successful READ, follows it)."""
    return _SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)


def _option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(NBD_OPT_REPLY_MAGIC, option, reply, len(data)) + data


# --------------------------------------------------------------------------- machine


class NbdServerConnection:
    """The server side of one NBD connection (see the module docstring).

    ``exports`` maps names to exports; ``default_export`` is the one the empty
    name selects (None: the empty name is unknown unless it is a key).
    """

    def __init__(
        self,
        exports: Mapping[str, Export] | Sequence[Export],
        *,
        default_export: str | None = None,
        max_request: int = MAX_REQUEST,
    ) -> None:
        if isinstance(exports, Mapping):
            self._exports: dict[str, Export] = dict(exports)
        else:
            self._exports = {e.name: e for e in exports}
        self._default = default_export
        self._max_request = max_request
        self.state = State.HANDSHAKE
        self.export: Export | None = None
        self.fixed_newstyle = False
        self.no_zeroes = False
        self._in = bytearray()
        self._out = bytearray()
        self._write: Request | None = None  # WRITE whose payload is being received
        self._payload: bytearray | None = None
        self._filled = 0
        self._discard_reason = ""  # set when a refused WRITE's payload is being skipped
        self._discard_error = NbdError.OK
        self._out += struct.pack(
            ">QQH", NBDMAGIC, IHAVEOPT, HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
        )

    # -- output

    def data_to_send(self) -> bytes:
        """Bytes the machine wants written to the client (and forgets)."""
        out = bytes(self._out)
        self._out.clear()
        return out

    def reply(
        self, request: Request, error: int = 0, data: bytes | memoryview | None = None
    ) -> list[bytes | memoryview]:
        """Buffers answering ``request``: the header, then ``data`` for a successful READ.

        ``data`` must be exactly ``request.length`` bytes for a successful READ
        and absent otherwise (NbdProtocolError: a bug in the caller).
        """
        if error == 0 and request.command == NbdCommand.READ:
            if data is None or len(data) != request.length:
                got = "no data" if data is None else f"{len(data)} bytes"
                raise NbdProtocolError(
                    f"a READ of {request.length} bytes must be answered with as many, got {got}"
                )
            return [encode_simple_reply(request.cookie, 0), data]
        if data:
            raise NbdProtocolError("only a successful READ reply carries data")
        return [encode_simple_reply(request.cookie, error)]

    # -- zero-copy receive of WRITE payloads

    def write_buffer(self) -> memoryview | None:
        """The unfilled part of the WRITE payload being received, for ``recv_into``.

        None when the machine is not inside a WRITE payload or still holds
        buffered input (then use :meth:`receive_data`).
        """
        if self._payload is None or self._in:
            return None
        return memoryview(self._payload)[self._filled :]

    def received_into(self, nbytes: int) -> list[NbdEvent]:
        """Account for ``nbytes`` written into :meth:`write_buffer`; return completed events."""
        if self._payload is None or nbytes < 0 or self._filled + nbytes > len(self._payload):
            raise NbdProtocolError("received_into() without a matching write_buffer()")
        self._filled += nbytes
        events: list[NbdEvent] = []
        if self._filled == len(self._payload):
            self._finish_write(events)
        return events

    # -- input

    def payload_buffer(self) -> memoryview | None:
        """Where the rest of the current WRITE's payload goes, when nothing else is
        buffered: the I/O layer may receive straight into it, then call
        :meth:`payload_received`. None when bytes must go through :meth:`receive_data`.
        """
        if self._payload is None or self._in or self.state is State.CLOSED:
            return None
        return memoryview(self._payload)[self._filled :]

    def payload_received(self, count: int) -> list[NbdEvent]:
        """``count`` bytes were written into :meth:`payload_buffer`."""
        events: list[NbdEvent] = []
        payload = self._payload
        if payload is None or count < 0 or self._filled + count > len(payload):
            raise NbdProtocolError("payload_received without a matching payload_buffer")
        self._filled += count
        if self._filled == len(payload):
            self._finish_write(events)
        return events

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[NbdEvent]:
        """Feed bytes read from the client; return the events they complete.

        Empty ``data`` means the client closed its side (a Disconnect event
        unless the connection is already closed).
        """
        events: list[NbdEvent] = []
        if self.state is State.CLOSED:
            return events
        if not data:
            self._close(events, clean=False, reason="the client closed the connection")
            return events
        view = memoryview(data).cast("B")
        if self._payload is not None and not self._in:
            # Fast path: straight from the caller's bytes into the payload buffer.
            take = min(len(view), len(self._payload) - self._filled)
            self._payload[self._filled : self._filled + take] = view[:take]
            self._filled += take
            view = view[take:]
            if self._filled == len(self._payload):
                self._finish_write(events)
        if view:
            self._in += view
        self._process(events)
        return events

    def _process(self, events: list[NbdEvent]) -> None:
        buf = self._in
        pos = 0
        while self.state is not State.CLOSED:
            avail = len(buf) - pos
            if self._payload is not None:
                if not avail:
                    break
                take = min(avail, len(self._payload) - self._filled)
                self._payload[self._filled : self._filled + take] = memoryview(buf)[
                    pos : pos + take
                ]
                self._filled += take
                pos += take
                if self._filled == len(self._payload):
                    self._finish_write(events)
                continue
            if self.state is State.TRANSMISSION:
                if avail < 28:
                    break
                used = self._request(buf, pos, events)
                if used == 0:
                    break
                pos += used
            elif self.state is State.OPTIONS:
                if avail < 16:
                    break
                magic, option, length = _OPTION.unpack_from(buf, pos)
                if magic != IHAVEOPT:
                    self._close(events, clean=False, reason="bad option magic")
                    break
                if length > MAX_OPTION_LENGTH:
                    self._close(
                        events, clean=False, reason=f"option {option} too long ({length} bytes)"
                    )
                    break
                if avail < 16 + length:
                    break
                payload = bytes(buf[pos + 16 : pos + 16 + length])
                pos += 16 + length
                self._option(option, payload, events)
            else:  # HANDSHAKE
                if avail < 4:
                    break
                (flags,) = _U32.unpack_from(buf, pos)
                pos += 4
                if flags & ~int(CLIENT_FLAGS_KNOWN):
                    self._close(events, clean=False, reason=f"unknown client flags {flags:#x}")
                    break
                self.fixed_newstyle = bool(flags & HandshakeFlag.FIXED_NEWSTYLE)
                self.no_zeroes = bool(flags & HandshakeFlag.NO_ZEROES)
                self.state = State.OPTIONS
        if self.state is State.CLOSED:
            buf.clear()
        elif pos:
            del buf[:pos]

    # -- options

    def _lookup(self, name: str) -> Export | None:
        export = self._exports.get(name)
        if export is None and name == "" and self._default is not None:
            export = self._exports.get(self._default)
        return export

    def _option(self, option: int, data: bytes, events: list[NbdEvent]) -> None:
        supported = option in (
            Option.EXPORT_NAME,
            Option.ABORT,
            Option.LIST,
            Option.INFO,
            Option.GO,
        )
        events.append(OptionRequested(option, len(data), supported))
        if option == Option.EXPORT_NAME:
            export = self._lookup(data.decode("utf-8", "replace"))
            if export is None:
                self._close(events, clean=False, reason="EXPORT_NAME of an unknown export")
                return
            self._out += struct.pack(">QH", export.size, export.transmission_flags())
            if not self.no_zeroes:
                self._out += bytes(124)
            self._enter_transmission(export, events)
        elif option == Option.ABORT:
            self._out += _option_reply(option, OptionReply.ACK)
            self._close(events, clean=True, reason="the client aborted the negotiation")
        elif not self.fixed_newstyle:
            # Without fixed newstyle no error reply is possible: hang up.
            self._close(events, clean=False, reason=f"unsupported option {option}")
        elif option == Option.LIST:
            if data:
                self._out += _option_reply(option, OptionReply.ERR_INVALID)
                return
            for name in self._exports:
                raw = name.encode("utf-8")
                self._out += _option_reply(option, OptionReply.SERVER, _U32.pack(len(raw)) + raw)
            self._out += _option_reply(option, OptionReply.ACK)
        elif option in (Option.INFO, Option.GO):
            self._info_or_go(option, data, events)
        else:
            self._out += _option_reply(option, OptionReply.ERR_UNSUP)

    def _info_or_go(self, option: int, data: bytes, events: list[NbdEvent]) -> None:
        if len(data) < 6:
            self._out += _option_reply(option, OptionReply.ERR_INVALID)
            return
        (namelen,) = _U32.unpack_from(data, 0)
        if 4 + namelen + 2 > len(data):
            self._out += _option_reply(option, OptionReply.ERR_INVALID)
            return
        (count,) = _U16.unpack_from(data, 4 + namelen)
        if 4 + namelen + 2 + 2 * count != len(data):
            self._out += _option_reply(option, OptionReply.ERR_INVALID)
            return
        try:
            name = data[4 : 4 + namelen].decode("utf-8")
        except UnicodeDecodeError:
            self._out += _option_reply(option, OptionReply.ERR_INVALID)
            return
        wanted = struct.unpack_from(f">{count}H", data, 4 + namelen + 2)
        export = self._lookup(name)
        if export is None:
            self._out += _option_reply(option, OptionReply.ERR_UNKNOWN)
            return
        out = self._out
        out += _option_reply(
            option,
            OptionReply.INFO,
            _EXPORT_INFO.pack(Info.EXPORT, export.size, export.transmission_flags()),
        )
        for info in dict.fromkeys(wanted):
            if info == Info.NAME:
                out += _option_reply(
                    option, OptionReply.INFO, _U16.pack(Info.NAME) + export.name.encode()
                )
            elif info == Info.DESCRIPTION and export.description:
                out += _option_reply(
                    option,
                    OptionReply.INFO,
                    _U16.pack(Info.DESCRIPTION) + export.description.encode(),
                )
            elif info == Info.BLOCK_SIZE:
                out += _option_reply(
                    option,
                    OptionReply.INFO,
                    _BLOCK_INFO.pack(
                        Info.BLOCK_SIZE,
                        export.min_block,
                        export.preferred_block,
                        min(export.max_block, self._max_request),
                    ),
                )
        out += _option_reply(option, OptionReply.ACK)
        if option == Option.GO:
            self._enter_transmission(export, events)

    def _enter_transmission(self, export: Export, events: list[NbdEvent]) -> None:
        self.export = export
        self.state = State.TRANSMISSION
        events.append(ExportChosen(export, self.no_zeroes))

    # -- transmission

    def _reject(self, events: list[NbdEvent], cookie: int, command: int, error: NbdError,
                reason: str) -> None:  # fmt: skip
        self._out += _SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, error, cookie)
        events.append(RequestRejected(cookie, command, error, reason))

    def _request(self, buf: bytearray, pos: int, events: list[NbdEvent]) -> int:
        """Handle the request header at ``pos``; return the bytes consumed (28)."""
        magic, flags, ctype, cookie, offset, length = _REQUEST.unpack_from(buf, pos)
        if magic != NBD_REQUEST_MAGIC:
            self._close(events, clean=False, reason=f"bad request magic {magic:#x}")
            return 0
        export = self.export
        assert export is not None
        if ctype == NbdCommand.DISC:
            self._close(events, clean=True, reason="the client disconnected")
            return 28
        allowed = _ALLOWED_FLAGS.get(ctype)
        if allowed is None:
            self._reject(events, cookie, ctype, NbdError.EINVAL, f"unknown command {ctype}")
            return 28
        command = _COMMAND_BY_VALUE[ctype]
        if command in (NbdCommand.READ, NbdCommand.WRITE) and length > self._max_request:
            self._reject(
                events, cookie, ctype, NbdError.EINVAL,
                f"{command.name} of {length} bytes exceeds the {self._max_request}-byte limit",
            )  # fmt: skip
            self._close(events, clean=False, reason=f"oversized {command.name} ({length} bytes)")
            return 28
        error = NbdError.OK
        reason = ""
        if flags & ~allowed:
            error, reason = NbdError.EINVAL, f"flags {flags:#x} not allowed on {command.name}"
        elif command in _MODIFYING and export.read_only:
            error, reason = NbdError.EPERM, "the export is read-only"
        elif length == 0 and command in (NbdCommand.READ, NbdCommand.WRITE):
            error, reason = NbdError.EINVAL, f"zero-length {command.name}"
        elif command is not NbdCommand.FLUSH and offset + length > export.size:
            error = (
                NbdError.ENOSPC
                if command in (NbdCommand.WRITE, NbdCommand.WRITE_ZEROES)
                else NbdError.EINVAL
            )
            reason = f"range {offset}+{length} is past the end of the export ({export.size})"
        if command is NbdCommand.WRITE:
            # The payload follows whatever we decide; receive it, then act.
            self._write = Request(cookie, command, flags, offset, length)
            self._payload = bytearray(length)
            self._filled = 0
            self._discard_reason = reason
            self._discard_error = error
            if length == 0:
                self._finish_write(events)
            return 28
        if error:
            self._reject(events, cookie, ctype, error, reason)
            return 28
        events.append(Request(cookie, command, flags, offset, length))
        return 28

    def _finish_write(self, events: list[NbdEvent]) -> None:
        request = self._write
        payload = self._payload
        assert request is not None and payload is not None
        self._write = None
        self._payload = None
        self._filled = 0
        if self._discard_reason:
            self._reject(
                events, request.cookie, request.command, self._discard_error, self._discard_reason
            )
            self._discard_reason = ""
            return
        events.append(
            Request(
                request.cookie, request.command, request.flags, request.offset, request.length,
                memoryview(payload),
            )
        )  # fmt: skip

    def _close(self, events: list[NbdEvent], *, clean: bool, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
        self._payload = None
        self._write = None
        events.append(Disconnect(clean, reason))
