"""carpool's replication protocol between a HAST primary and its secondary (pure codec).

FreeBSD wire compatibility is not a goal; HAST's semantics are.  Every
message is one fixed 36-byte header, big-endian, followed by ``size`` body bytes::

    u32 magic "CPHA" | u8 version (1) | u8 type | u16 flags | u64 seq | u64 offset
    | u32 length | u32 size | u8 checksum | u8 compression | u16 error

``length`` is the length of the block range the message is about (a READ's
length, a WRITE's *uncompressed* data length), ``size`` the number of body
bytes that follow, ``error`` an errno for replies (0 = success).  Data
messages (WRITE, READ_REPLY, SYNC_DATA) carry ``digest || payload``: the digest
(crc32: 4 bytes, sha256: 32) is over the uncompressed data, the payload is the
data after compression.  ``compression`` says what was applied to this
message: ``none``, ``hole`` (all-zero data, empty payload) or ``fast``
(zlib level 1, standing in for FreeBSD's lzf; tried only on blocks of at least
1 KiB, and kept only when it saves space).

Message types (one frozen dataclass each): HELLO, AUTH, WRITE, WRITE_ACK,
READ, READ_REPLY, FLUSH, TRIM, WRITE_ZEROES, KEEPALIVE, SYNC_DATA, ERROR,
VERIFY.  WRITE_ACK answers every modifying request (WRITE, FLUSH, TRIM,
WRITE_ZEROES, SYNC_DATA) by ``seq``; its flags say ``RECEIVED`` (memsync's early
acknowledgement, sent when the data is off the socket) or ``WRITTEN``
(on the secondary's disk: fullsync's acknowledgement, and the final one of
memsync).  A VERIFY without the REPLY flag asks for the digest of a range;
with it, it carries the answer.

Authentication (carpool's addition; optional): both sides send HELLO with a
fresh random 16-byte nonce; each then sends AUTH whose MAC is
:func:`auth_mac` (HMAC-SHA256 keyed with the resource's pre-shared key over
a label, the resource name, the sender's nonce and the receiver's nonce), and
checks the peer's with :func:`verify_auth`.  The order of the nonces makes a
reflected AUTH useless.

API: :func:`encode` (message → list of buffers for ``writelines``/``sendmsg``;
data is never copied unless compressed), :func:`encode_bytes`, and
:class:`WireDecoder` (``feed(bytes) → list of messages``).  The decoder holds at
most one message's bytes and never allocates ahead of received data, so a
peer lying about sizes makes it wait or fail, never allocate; limits
(:data:`MAX_DATA`, ``max_body``) turn into :class:`MessageTooLarge`.  Every
decoding failure is a :class:`WireError` (a :class:`~carpool.errors.ProtocolError`);
after one the decoder refuses further input: close the connection.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import struct
import zlib
from dataclasses import dataclass
from typing import Final

from carpool.errors import ProtocolError
from carpool.hast.common import Checksum, Compression

__all__ = [
    "HEADER",
    "MAGIC",
    "MAX_BODY",
    "MAX_DATA",
    "NONCE_SIZE",
    "VERSION",
    "AckFlag",
    "Auth",
    "BadChecksum",
    "Error",
    "Flush",
    "Hello",
    "HelloFlag",
    "Keepalive",
    "Malformed",
    "Message",
    "MessageTooLarge",
    "MsgType",
    "Read",
    "ReadReply",
    "SyncData",
    "Trim",
    "Verify",
    "WireDecoder",
    "WireError",
    "Write",
    "WriteAck",
    "WriteFlag",
    "WriteZeroes",
    "auth_mac",
    "digest",
    "encode",
    "encode_bytes",
    "verify_auth",
]

MAGIC: Final = 0x43504841  # "CPHA"
VERSION: Final = 1
HEADER: Final = struct.Struct(">IBBHQQIIBBH")
#: Largest data a message may carry (a WRITE, READ reply or resync chunk).
MAX_DATA: Final = 32 * 1024 * 1024
#: Default limit on a message body (data + digest, or a HELLO with its bitmap).
MAX_BODY: Final = MAX_DATA + 1024 * 1024
#: Bodies at least this large may be received in place (WireDecoder.payload_buffer).
IN_PLACE_MIN: Final = 64 * 1024
NONCE_SIZE: Final = 16
MAX_NAME: Final = 1024
MAX_ERROR_TEXT: Final = 4096
#: Smallest block the fast compressor is tried on (lzf's threshold in hastd).
COMPRESS_MIN: Final = 1024

_AUTH_LABEL = b"carpool-hast-auth-v1"


class WireError(ProtocolError):
    """Bytes from the peer that are not a valid replication message."""

    stat = "hast_bad_messages"


class Malformed(WireError):
    """A header or body that does not parse (bad magic, version, type or layout)."""


class MessageTooLarge(WireError):
    """A message announcing more bytes than the limits allow."""

    stat = "hast_oversized_messages"


class BadChecksum(WireError):
    """Data whose digest does not match (corrupted in transit)."""

    stat = "hast_checksum_errors"


class MsgType(enum.IntEnum):
    HELLO = 1
    AUTH = 2
    WRITE = 3
    WRITE_ACK = 4
    READ = 5
    READ_REPLY = 6
    FLUSH = 7
    TRIM = 8
    WRITE_ZEROES = 9
    KEEPALIVE = 10
    SYNC_DATA = 11
    ERROR = 12
    VERIFY = 13


class HelloFlag(enum.IntFlag):
    VIRGIN = 1  #: the sender never wrote (HAST's "virgin")
    AUTH = 2  #: the sender has a key and will send AUTH
    REPLY = 4  #: the secondary's answer to the primary's HELLO


class WriteFlag(enum.IntFlag):
    MEMSYNC = 1  #: acknowledge RECEIVED as soon as the data is off the socket
    FUA = 2  #: make it durable before WRITTEN


class AckFlag(enum.IntFlag):
    RECEIVED = 1
    WRITTEN = 2


VERIFY_REPLY: Final = 1

_CHECKSUM_CODE = {Checksum.NONE: 0, Checksum.CRC32: 1, Checksum.SHA256: 2}
_CHECKSUM_BY_CODE = {v: k for k, v in _CHECKSUM_CODE.items()}
_DIGEST_SIZE = {Checksum.NONE: 0, Checksum.CRC32: 4, Checksum.SHA256: 32}
_COMP_CODE = {Compression.NONE: 0, Compression.HOLE: 1, Compression.FAST: 2}
_COMP_BY_CODE = {v: k for k, v in _COMP_CODE.items()}


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Hello:
    """Opens a connection: who I am for this resource (both directions).

    The secondary's answer (flag REPLY) may carry its dirty ``bitmap``.
    """

    resource: str
    resuid: int
    localcnt: int
    remotecnt: int
    datasize: int
    extentsize: int
    nonce: bytes
    flags: int = 0
    bitmap: bytes = b""


@dataclass(frozen=True, slots=True)
class Auth:
    mac: bytes


@dataclass(frozen=True, slots=True)
class Write:
    seq: int
    offset: int
    data: bytes | bytearray | memoryview
    flags: int = 0


@dataclass(frozen=True, slots=True)
class WriteAck:
    """Completion of a modifying request ``seq``: RECEIVED and/or WRITTEN, or ``error``."""

    seq: int
    flags: int = AckFlag.WRITTEN
    error: int = 0


@dataclass(frozen=True, slots=True)
class Read:
    seq: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class ReadReply:
    seq: int
    offset: int
    data: bytes | bytearray | memoryview = b""
    error: int = 0


@dataclass(frozen=True, slots=True)
class Flush:
    seq: int


@dataclass(frozen=True, slots=True)
class Trim:
    seq: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class WriteZeroes:
    seq: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class Keepalive:
    pass


@dataclass(frozen=True, slots=True)
class SyncData:
    """One chunk of a resync: ``data`` at ``offset`` of the sync target."""

    seq: int
    offset: int
    data: bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class Error:
    """The peer refuses (split-brain, resuid mismatch, bad auth...): ``code`` + text."""

    code: int
    message: str
    seq: int = 0


@dataclass(frozen=True, slots=True)
class Verify:
    """Request (``digest`` empty) or reply (``reply``) for the digest of a range."""

    seq: int
    offset: int
    length: int
    algorithm: Checksum = Checksum.SHA256
    digest: bytes = b""
    reply: bool = False


Message = (
    Hello | Auth | Write | WriteAck | Read | ReadReply | Flush | Trim | WriteZeroes
    | Keepalive | SyncData | Error | Verify
)  # fmt: skip


# --------------------------------------------------------------------------- helpers


def digest(algorithm: Checksum, data: bytes | bytearray | memoryview) -> bytes:
    """The digest of ``data`` with ``algorithm`` (b"" for none)."""
    if algorithm is Checksum.CRC32:
        return struct.pack(">I", zlib.crc32(data))
    if algorithm is Checksum.SHA256:
        return hashlib.sha256(data).digest()
    return b""


def auth_mac(key: bytes, resource: str, my_nonce: bytes, peer_nonce: bytes) -> bytes:
    """The MAC a node sends in AUTH: HMAC-SHA256(key, label|resource|my nonce|peer nonce)."""
    msg = b"".join(
        (_AUTH_LABEL, struct.pack(">H", len(resource.encode())), resource.encode(), my_nonce,
         peer_nonce)
    )  # fmt: skip
    return hmac.new(key, msg, hashlib.sha256).digest()


def verify_auth(key: bytes, resource: str, my_nonce: bytes, peer_nonce: bytes, auth: Auth) -> bool:
    """Whether the peer's AUTH proves it holds ``key`` (constant-time compare)."""
    expected = auth_mac(key, resource, peer_nonce, my_nonce)
    return hmac.compare_digest(expected, auth.mac)


_ZERO_CHUNK = bytes(64 * 1024)


def _is_zero(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is all zero bytes (fast: 64 KiB compares, early exit)."""
    view = memoryview(data).cast("B")
    n = len(view)
    step = len(_ZERO_CHUNK)
    # A short first probe makes ordinary (non-zero) data cost almost nothing.
    if view[:256].tobytes() != _ZERO_CHUNK[: min(256, n)]:
        return False
    for start in range(256, n, step):
        part = view[start : start + step].tobytes()
        if part != _ZERO_CHUNK[: len(part)]:
            return False
    return True


# --------------------------------------------------------------------------- encoder

_Buf = bytes | bytearray | memoryview


def _header(
    mtype: int, flags: int, seq: int, offset: int, length: int, size: int,
    checksum: int = 0, compression: int = 0, error: int = 0,
) -> bytes:  # fmt: skip
    try:
        return HEADER.pack(
            MAGIC, VERSION, mtype, flags, seq, offset, length, size, checksum, compression, error
        )
    except struct.error as exc:
        raise Malformed(f"cannot encode {MsgType(mtype).name}: a field is out of range") from exc


def _data_message(
    mtype: int, flags: int, seq: int, offset: int, data: _Buf, error: int,
    checksum: Checksum, compression: Compression,
) -> list[_Buf]:  # fmt: skip
    length = len(data) if not isinstance(data, memoryview) else data.nbytes
    if length > MAX_DATA:
        raise MessageTooLarge(f"{length} bytes of data exceed the {MAX_DATA}-byte limit")
    dig = digest(checksum, data)
    applied = Compression.NONE
    payload: _Buf = data
    if compression is not Compression.NONE and length:
        if _is_zero(data):
            applied, payload = Compression.HOLE, b""
        elif compression is Compression.FAST and length >= COMPRESS_MIN:
            packed = zlib.compress(data, 1)
            if len(packed) < length:
                applied, payload = Compression.FAST, packed
    size = len(dig) + len(payload)
    head = _header(
        mtype, flags, seq, offset, length, size, _CHECKSUM_CODE[checksum], _COMP_CODE[applied],
        error,
    )  # fmt: skip
    out: list[_Buf] = [head + dig]
    if len(payload):
        out.append(payload)
    return out


def encode(
    msg: Message,
    *,
    checksum: Checksum = Checksum.NONE,
    compression: Compression = Compression.NONE,
) -> list[bytes | bytearray | memoryview]:
    """Buffers that, written in order, carry ``msg``; ``checksum``/``compression`` apply to data."""
    if isinstance(msg, Write):
        return _data_message(
            MsgType.WRITE, msg.flags, msg.seq, msg.offset, msg.data, 0, checksum, compression
        )
    if isinstance(msg, SyncData):
        return _data_message(
            MsgType.SYNC_DATA, 0, msg.seq, msg.offset, msg.data, 0, checksum, compression
        )
    if isinstance(msg, ReadReply):
        data = b"" if msg.error else msg.data
        return _data_message(
            MsgType.READ_REPLY, 0, msg.seq, msg.offset, data, msg.error, checksum, compression
        )
    if isinstance(msg, WriteAck):
        return [_header(MsgType.WRITE_ACK, msg.flags, msg.seq, 0, 0, 0, error=msg.error)]
    if isinstance(msg, Read):
        return [_header(MsgType.READ, 0, msg.seq, msg.offset, msg.length, 0)]
    if isinstance(msg, Flush):
        return [_header(MsgType.FLUSH, 0, msg.seq, 0, 0, 0)]
    if isinstance(msg, Trim):
        return [_header(MsgType.TRIM, 0, msg.seq, msg.offset, msg.length, 0)]
    if isinstance(msg, WriteZeroes):
        return [_header(MsgType.WRITE_ZEROES, 0, msg.seq, msg.offset, msg.length, 0)]
    if isinstance(msg, Keepalive):
        return [_header(MsgType.KEEPALIVE, 0, 0, 0, 0, 0)]
    if isinstance(msg, Hello):
        name = msg.resource.encode("utf-8")
        if len(name) > MAX_NAME or len(msg.nonce) != NONCE_SIZE:
            raise Malformed("HELLO needs a resource name ≤ 1024 bytes and a 16-byte nonce")
        try:
            fixed = (
                struct.pack(">H", len(name))
                + name
                + struct.pack(
                    ">QQQQI", msg.resuid, msg.localcnt, msg.remotecnt, msg.datasize, msg.extentsize
                )
            )
        except struct.error as exc:
            raise Malformed("cannot encode HELLO: a counter is out of range") from exc
        body = fixed + msg.nonce + msg.bitmap
        return [_header(MsgType.HELLO, msg.flags, 0, 0, 0, len(body)) + body]
    if isinstance(msg, Auth):
        return [_header(MsgType.AUTH, 0, 0, 0, 0, len(msg.mac)) + msg.mac]
    if isinstance(msg, Error):
        text = msg.message.encode("utf-8")[:MAX_ERROR_TEXT]
        return [_header(MsgType.ERROR, 0, msg.seq, 0, 0, len(text), error=msg.code) + text]
    if isinstance(msg, Verify):
        flags = VERIFY_REPLY if msg.reply else 0
        return [
            _header(
                MsgType.VERIFY, flags, msg.seq, msg.offset, msg.length, len(msg.digest),
                _CHECKSUM_CODE[msg.algorithm],
            )
            + msg.digest
        ]  # fmt: skip
    raise TypeError(f"not a wire message: {msg!r}")


def encode_bytes(
    msg: Message,
    *,
    checksum: Checksum = Checksum.NONE,
    compression: Compression = Compression.NONE,
) -> bytes:
    """:func:`encode` joined into one bytes object (handy for small messages and tests)."""
    return b"".join(encode(msg, checksum=checksum, compression=compression))


# --------------------------------------------------------------------------- decoder

_NO_BODY = frozenset(
    {MsgType.WRITE_ACK, MsgType.READ, MsgType.FLUSH, MsgType.TRIM, MsgType.WRITE_ZEROES,
     MsgType.KEEPALIVE}
)  # fmt: skip
_DATA = frozenset({MsgType.WRITE, MsgType.READ_REPLY, MsgType.SYNC_DATA})


class WireDecoder:
    """Streaming decoder: :meth:`feed` bytes, get the complete messages they finish."""

    def __init__(self, *, max_body: int = MAX_BODY, max_data: int = MAX_DATA) -> None:
        self._buf = bytearray()
        self._max_body = max_body
        self._max_data = max_data
        self._failed: WireError | None = None
        #: A large data message's body being received in place (see payload_buffer).
        self._body: bytearray | None = None
        self._body_filled = 0
        self._body_fields: tuple[int, ...] = ()

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete message."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Message]:
        """Decode what ``data`` completes; WireError (and a dead decoder) on bad input."""
        if self._failed is not None:
            raise self._failed
        out: list[Message] = []
        if self._body is not None:
            view = memoryview(data).cast("B")
            take = min(len(view), len(self._body) - self._body_filled)
            self._body[self._body_filled : self._body_filled + take] = view[:take]
            out += self._body_filled_by(take)
            data = view[take:]
        buf = self._buf
        buf += data
        pos = 0
        hsize = HEADER.size
        try:
            while len(buf) - pos >= hsize:
                fields = HEADER.unpack_from(buf, pos)
                size = fields[7]
                self._check_header(fields)
                if len(buf) - pos - hsize < size:
                    break
                start = pos + hsize
                body = bytes(memoryview(buf)[start : start + size])
                pos = start + size
                out.append(self._message(fields, body))
        except WireError as exc:
            self._failed = exc
            buf.clear()
            raise
        if pos:
            del buf[:pos]
        return out

    def payload_buffer(self) -> memoryview | None:
        """Where the rest of a large data message's body goes, if one is pending and
        nothing else is buffered: the I/O layer may receive straight into it and
        call :meth:`payload_received`. None when bytes must go through :meth:`feed`.
        """
        if self._failed is not None:
            return None
        if self._body is not None:
            return memoryview(self._body)[self._body_filled :]
        buf = self._buf
        hsize = HEADER.size
        if len(buf) < hsize:
            return None
        fields = HEADER.unpack_from(buf, 0)
        mtype, size, comp = fields[2], fields[7], fields[9]
        if mtype not in _DATA or comp != 0 or size < IN_PLACE_MIN or len(buf) - hsize >= size:
            return None
        try:
            self._check_header(fields)
        except WireError as exc:
            self._failed = exc
            buf.clear()
            return None
        body = bytearray(size)
        have = len(buf) - hsize
        body[:have] = memoryview(buf)[hsize:]
        buf.clear()
        self._body, self._body_filled, self._body_fields = body, have, fields
        return memoryview(body)[have:]

    def payload_received(self, count: int) -> list[Message]:
        """``count`` bytes were written into :meth:`payload_buffer`."""
        if self._failed is not None:
            raise self._failed
        if self._body is None or count < 0 or self._body_filled + count > len(self._body):
            raise Malformed("payload_received without a matching payload_buffer")
        return self._body_filled_by(count)

    def _body_filled_by(self, count: int) -> list[Message]:
        assert self._body is not None
        self._body_filled += count
        if self._body_filled < len(self._body):
            return []
        body, fields = self._body, self._body_fields
        self._body, self._body_filled, self._body_fields = None, 0, ()
        try:
            return [self._data_message(fields, body)]
        except WireError as exc:
            self._failed = exc
            self._buf.clear()
            raise

    def _check_header(self, fields: tuple[int, ...]) -> None:
        magic, version, mtype, _flags, _seq, _off, length, size, csum, comp, _err = fields
        if magic != MAGIC:
            raise Malformed(f"bad magic {magic:#010x}: the peer does not speak carpool HAST")
        if version != VERSION:
            raise Malformed(f"unsupported protocol version {version} (this side speaks {VERSION})")
        if mtype not in _TYPES:
            raise Malformed(f"unknown message type {mtype}")
        if size > self._max_body:
            raise MessageTooLarge(f"message body of {size} bytes exceeds {self._max_body}")
        if csum not in _CHECKSUM_BY_CODE:
            raise Malformed(f"unknown checksum algorithm {csum}")
        if comp not in _COMP_BY_CODE:
            raise Malformed(f"unknown compression {comp}")
        if mtype in _NO_BODY and size:
            raise Malformed(f"{MsgType(mtype).name} carries no body, got {size} bytes")
        if mtype in _DATA or mtype == MsgType.READ:
            if length > self._max_data:
                raise MessageTooLarge(f"{length} bytes of data exceed {self._max_data}")
            if mtype in _DATA:
                alg = _CHECKSUM_BY_CODE[csum]
                limit = _DIGEST_SIZE[alg] + length
                if size > limit or size < _DIGEST_SIZE[alg]:
                    raise Malformed(f"body of {size} bytes for {length} bytes of data")
                if comp == 0 and size != limit:
                    raise Malformed(f"body of {size} bytes for {length} uncompressed bytes")
                if comp == 1 and size != _DIGEST_SIZE[alg]:
                    raise Malformed("a hole carries no payload")

    def _data_message(
        self, fields: tuple[int, ...], body: bytes | bytearray
    ) -> Write | SyncData | ReadReply:
        _m, _v, mtype, flags, seq, offset, length, _size, csum, comp, error = fields
        data = self._data(body, length, _CHECKSUM_BY_CODE[csum], _COMP_BY_CODE[comp])
        if mtype == MsgType.WRITE:
            return Write(seq, offset, data, flags)
        if mtype == MsgType.SYNC_DATA:
            return SyncData(seq, offset, data)
        if error and length:
            raise Malformed("a failed READ reply carries no data")
        return ReadReply(seq, offset, data, error)

    def _message(self, fields: tuple[int, ...], body: bytes) -> Message:
        _m, _v, mtype, flags, seq, offset, length, _size, csum, _comp, error = fields
        if mtype in _DATA:
            return self._data_message(fields, body)
        if mtype == MsgType.WRITE_ACK:
            return WriteAck(seq, flags, error)
        if mtype == MsgType.READ:
            return Read(seq, offset, length)
        if mtype == MsgType.FLUSH:
            return Flush(seq)
        if mtype == MsgType.TRIM:
            return Trim(seq, offset, length)
        if mtype == MsgType.WRITE_ZEROES:
            return WriteZeroes(seq, offset, length)
        if mtype == MsgType.KEEPALIVE:
            return Keepalive()
        if mtype == MsgType.HELLO:
            return _hello(body, flags)
        if mtype == MsgType.AUTH:
            if len(body) != 32:
                raise Malformed(f"AUTH carries a 32-byte MAC, got {len(body)} bytes")
            return Auth(body)
        if mtype == MsgType.ERROR:
            if len(body) > MAX_ERROR_TEXT:
                raise MessageTooLarge("ERROR text longer than 4096 bytes")
            return Error(error, body.decode("utf-8", "replace"), seq)
        # VERIFY
        alg = _CHECKSUM_BY_CODE[csum]
        reply = bool(flags & VERIFY_REPLY)
        if reply and len(body) != _DIGEST_SIZE[alg]:
            raise Malformed(f"VERIFY reply with a {len(body)}-byte {alg.value} digest")
        if not reply and body:
            raise Malformed("a VERIFY request carries no digest")
        return Verify(seq, offset, length, alg, body, reply)

    def _data(
        self, body: bytes | bytearray, length: int, alg: Checksum, comp: Compression
    ) -> memoryview:
        dsize = _DIGEST_SIZE[alg]
        view = memoryview(body)
        sent_digest = view[:dsize]
        payload = view[dsize:]
        if comp is Compression.HOLE:
            data = memoryview(bytes(length))
        elif comp is Compression.FAST:
            inflater = zlib.decompressobj()
            try:
                raw = inflater.decompress(payload, length)
            except zlib.error as exc:
                raise Malformed(f"compressed data does not inflate: {exc}") from None
            if len(raw) != length or inflater.unconsumed_tail or not inflater.eof:
                raise Malformed(f"compressed data does not inflate to {length} bytes")
            data = memoryview(raw)
        else:
            data = payload
        if dsize and digest(alg, data) != sent_digest:
            raise BadChecksum(f"{alg.value} mismatch on {length} bytes of data")
        return data


def _hello(body: bytes, flags: int) -> Hello:
    if len(body) < 2:
        raise Malformed("HELLO too short")
    (nlen,) = struct.unpack_from(">H", body, 0)
    if nlen > MAX_NAME:
        raise Malformed("HELLO resource name longer than 1024 bytes")
    fixed = 2 + nlen + 36 + NONCE_SIZE
    if len(body) < fixed:
        raise Malformed(f"HELLO of {len(body)} bytes, at least {fixed} expected")
    try:
        name = body[2 : 2 + nlen].decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("HELLO resource name is not UTF-8") from None
    resuid, localcnt, remotecnt, datasize, extentsize = struct.unpack_from(">QQQQI", body, 2 + nlen)
    nonce = body[2 + nlen + 36 : fixed]
    return Hello(
        name, resuid, localcnt, remotecnt, datasize, extentsize, nonce, flags, body[fixed:]
    )


_TYPES = frozenset(int(t) for t in MsgType)
