"""hast.conf, read as FreeBSD's hastd reads it (``sbin/hastd/token.l`` and ``parse.y``).

Grammar (whitespace and newlines separate words, ``#`` starts a comment that
runs to the end of the line, there is no ``;`` and no quoting)::

    file      = { global-stmt | "on" NODE "{" { control | pidfile | listen } "}"
                | "resource" NAME "{" resource-body "}" } ;
    global-stmt = control | pidfile | listen | replication | checksum
                | compression | timeout | exec | metaflush | key ;
    resource-body = { replication | checksum | compression | timeout | exec
                    | metaflush | name | local | key
                    | "on" NODE "{" { name | local | remote | source | metaflush | key } "}" } ;

A word is ``[a-zA-Z0-9.\\-_/:\\[\\]]+``; the keywords below are reserved (a host
or resource called ``on`` or ``none`` is an error, as in hastd), and a purely
numeric word is a number (so a resource called ``123`` is an error too).
Statements come in any order; the last of a repeated statement wins, except
``listen``, which accumulates.

carpool adds one statement, ``key``, whose value is a word or a double-quoted
string (``\\"`` and ``\\\\`` escape): a pre-shared key both peers must share
before any data flows.  It may appear globally, in a resource or in its
``on`` section; like the other settings it is inherited.

Inheritance is hastd's: a resource's ``on <this node>`` section, then the
resource (``name``, ``local``, ``metaflush``, ``key``), then the global section,
then the built-in default (replication memsync, checksum none, compression
hole, timeout 20, metaflush on, listen ``tcp4://0.0.0.0:8457`` and
``tcp6://[::]:8457``).  ``compression lzf`` selects carpool's fast compressor
(:attr:`Compression.FAST`).  ``control`` and ``pidfile`` accept FreeBSD's
forms (``uds:///var/run/hastctl``, ``unix://path``, ``/path``); their defaults
are carpool's (``/run/carpool/hastd.sock``, ``/run/carpool/hastd.pid``).

The section for "this node" is the one whose name matches one of the node
names given (``node=``) or, by default, :func:`local_node_names` (the full
hostname, its first label, the machine id, ``hostid<N>``), compared as hastd
does.  Every resource needs such a section and must end up with ``local`` and
``remote`` (``remote none`` = peer not known yet).

Public API: :func:`parse_config` (text → :class:`HastConfig`), :func:`load_config`
(file → :class:`HastConfig`), :func:`parse_address`, :func:`local_node_names`,
and the frozen dataclasses :class:`HastConfig`, :class:`ResourceConfig`,
:class:`Address`.  Every error is a :class:`~carpool.errors.ConfigError`
with file:line:column and the offending word.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from carpool.configfile import read_config_text
from carpool.errors import ConfigError
from carpool.hast.common import (
    DEFAULT_PORT,
    DEFAULT_TIMEOUT,
    Checksum,
    Compression,
    Replication,
)

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "DEFAULT_CONTROL",
    "DEFAULT_LISTEN",
    "DEFAULT_PIDFILE",
    "KEYWORDS",
    "Address",
    "HastConfig",
    "ResourceConfig",
    "load_config",
    "local_node_names",
    "parse_address",
    "parse_config",
]

DEFAULT_CONFIG_PATH = "/etc/hast.conf"


def default_config_path() -> str:
    """``$CARPOOL_HAST_CONF`` when set (a node of a test lab), else /etc/hast.conf."""
    return os.environ.get("CARPOOL_HAST_CONF") or DEFAULT_CONFIG_PATH
#: carpool's control socket; hastd's is ``uds:///var/run/hastctl``.
DEFAULT_CONTROL = "/run/carpool/hastd.sock"
DEFAULT_PIDFILE = "/run/carpool/hastd.pid"
DEFAULT_LISTEN = ("tcp4://0.0.0.0:8457", "tcp6://[::]:8457")
#: Largest accepted ``timeout`` (seconds); hastd stores it in an int.
MAX_TIMEOUT = 2**31 - 1

KEYWORDS = frozenset(
    {
        "control", "pidfile", "listen", "replication", "checksum", "compression",
        "timeout", "exec", "metaflush", "resource", "name", "local", "remote",
        "source", "on", "off", "fullsync", "memsync", "async", "none", "crc32",
        "sha256", "hole", "lzf", "key",
    }
)  # fmt: skip

_WORD_CHARS = re.compile(r"[a-zA-Z0-9.\-_/:\[\]]+")


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class Address:
    """A hast.conf address: TCP (``host``, ``port``) or a unix socket (``path``).

    ``text`` is the word as written; ``scheme`` is ``tcp``, ``tcp4``, ``tcp6``
    or ``uds``.  A TCP address written without a port gets 8457.
    """

    text: str
    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def is_unix(self) -> bool:
        return self.scheme == "uds"

    def __str__(self) -> str:
        if self.is_unix:
            return f"uds://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ResourceConfig:
    """One resource, resolved for this node with every default filled in."""

    name: str  #: the resource name (``resource NAME``)
    node: str  #: the ``on`` section that matched this node
    provname: str  #: ``name``: the exported device's name (default: the resource name)
    local: str  #: path of the local provider (file or block device)
    remote: Address | None  #: the peer; None for ``remote none``
    source: Address | None = None  #: local address to bind before connecting
    replication: Replication = Replication.MEMSYNC
    checksum: Checksum = Checksum.NONE
    compression: Compression = Compression.HOLE
    timeout: int = DEFAULT_TIMEOUT
    exec: str | None = None  #: hook program run on events
    metaflush: bool = True
    key: bytes | None = field(default=None, repr=False)  #: pre-shared key (carpool)
    line: int = 0  #: where ``resource NAME`` is written, for messages

    @property
    def remote_host(self) -> str | None:
        return None if self.remote is None else self.remote.host

    @property
    def remote_port(self) -> int:
        return DEFAULT_PORT if self.remote is None else self.remote.port


@dataclass(frozen=True, slots=True)
class HastConfig:
    """The whole file as this node sees it."""

    path: str
    node: tuple[str, ...]  #: the node names this configuration was resolved for
    control: Address
    pidfile: str
    listen: tuple[Address, ...]
    resources: tuple[ResourceConfig, ...]

    def resource(self, name: str) -> ResourceConfig:
        """The resource called ``name``; ConfigError naming the known ones otherwise."""
        for res in self.resources:
            if res.name == name:
                return res
        known = ", ".join(r.name for r in self.resources) or "none"
        raise ConfigError(
            f"no resource {name!r} in the configuration (configured: {known})", path=self.path
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.resources)


# --------------------------------------------------------------------------- lexer


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # "word", "num", "kw", "qstr", "{", "}", "eof"
    text: str
    line: int
    column: int


def _tokenize(text: str, path: str) -> Iterator[_Token]:
    pos = 0
    line = 1
    line_start = 0
    n = len(text)
    while pos < n:
        ch = text[pos]
        if ch == "\n":
            line += 1
            pos += 1
            line_start = pos
            continue
        if ch in " \t\r\f\v":
            pos += 1
            continue
        if ch == "#":
            end = text.find("\n", pos)
            pos = n if end < 0 else end
            continue
        column = pos - line_start + 1
        if ch in "{}":
            yield _Token(ch, ch, line, column)
            pos += 1
            continue
        if ch == '"':
            chars: list[str] = []
            pos += 1
            while True:
                if pos >= n or text[pos] == "\n":
                    raise ConfigError(
                        "unterminated quoted string: close it with '\"' on the same line",
                        path=path, line=line, column=column, token=text[pos - len(chars) - 1 : pos],
                    )  # fmt: skip
                c = text[pos]
                if c == '"':
                    pos += 1
                    break
                if c == "\\" and pos + 1 < n and text[pos + 1] in '"\\':
                    chars.append(text[pos + 1])
                    pos += 2
                    continue
                chars.append(c)
                pos += 1
            yield _Token("qstr", "".join(chars), line, column)
            continue
        m = _WORD_CHARS.match(text, pos)
        if m is None:
            raise ConfigError(
                f"unexpected character {ch!r}: words may only contain letters, digits "
                "and . - _ / : [ ] (no quoting, no ';')",
                path=path, line=line, column=column, token=ch,
            )  # fmt: skip
        word = m.group()
        pos = m.end()
        if word in KEYWORDS:
            kind = "kw"
        elif word.isdigit():
            kind = "num"
        else:
            kind = "word"
        yield _Token(kind, word, line, column)
    yield _Token("eof", "", line, pos - line_start + 1)


# --------------------------------------------------------------------------- addresses


def parse_address(text: str, *, unix_ok: bool = False, tcp_ok: bool = True) -> Address:
    """Parse a hast.conf address; ValueError with a readable reason if it is not one.

    TCP: ``tcp4://host[:port]``, ``tcp6://[addr][:port]``, ``tcp://host[:port]`` or
    a bare ``host[:port]`` / ``[v6][:port]`` / ``v6`` (default port 8457).
    Unix (when ``unix_ok``): ``uds://path``, ``unix://path`` or ``/path``.
    """
    for prefix in ("uds://", "unix://"):
        if text.startswith(prefix):
            if not unix_ok:
                raise ValueError("a unix socket is not allowed here, give a TCP address")
            sock = text[len(prefix) :]
            if not sock.startswith("/"):
                raise ValueError("a unix socket path must be absolute")
            return Address(text, "uds", path=sock)
    if text.startswith("/"):
        if not unix_ok:
            raise ValueError("a path is not allowed here, give a TCP address")
        return Address(text, "uds", path=text)
    if not tcp_ok:
        raise ValueError("expected a unix socket (uds:///path or /path)")
    scheme = "tcp"
    rest = text
    for prefix in ("tcp4://", "tcp6://", "tcp://"):
        if text.startswith(prefix):
            scheme = prefix[:-3]
            rest = text[len(prefix) :]
            break
    else:
        if "://" in text:
            raise ValueError("unknown protocol, use tcp://, tcp4://, tcp6:// or uds://")
    port = DEFAULT_PORT
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise ValueError("missing ']' after an IPv6 address")
        host = rest[1:close]
        tail = rest[close + 1 :]
        if tail:
            if not tail.startswith(":"):
                raise ValueError("expected ':port' after ']'")
            port = _port(tail[1:])
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif rest.count(":") > 1:
        host = rest
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address (write [addr]:port)") from None
    else:
        host, sep, port_text = rest.partition(":")
        if sep:
            port = _port(port_text)
    if not host:
        raise ValueError("the host is missing")
    if "[" in host or "]" in host or "/" in host:
        raise ValueError(f"{host!r} is not a host name or address")
    if scheme == "tcp6" and ":" not in host and not _is_name(host):
        raise ValueError("tcp6:// needs an IPv6 address or a host name")
    if scheme == "tcp4" and ":" in host:
        raise ValueError("tcp4:// cannot take an IPv6 address")
    return Address(text, scheme, host=host, port=port)


def _is_name(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return True
    return False


def _port(text: str) -> int:
    if not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise ValueError(f"port {text!r} is not a number from 0 to 65535")
    return int(text)


# --------------------------------------------------------------------------- node names


def local_node_names() -> tuple[str, ...]:
    """The names a ``on NODE`` section may use for this machine.

    hastd's ``isitme``: the hostname, its first label and the host UUID (here
    ``/etc/machine-id`` and the DMI product UUID).  ``hostid<N>`` has no Linux
    equivalent worth trusting and is not offered.
    """
    names: list[str] = []
    host = socket.gethostname()
    if host:
        names.append(host)
        short = host.split(".", 1)[0]
        if short != host:
            names.append(short)
    for path in ("/etc/machine-id", "/sys/class/dmi/id/product_uuid"):
        try:
            with open(path, encoding="ascii") as handle:
                value = handle.read().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if value:
            names.append(value)
    return tuple(names)


def _matches(node: str, names: tuple[str, ...]) -> bool:
    for name in names:
        if node == name:
            return True
        if len(node) == 36 and node.count("-") == 4 and node.lower() == name.lower():
            return True  # host UUIDs compare case-insensitively
    return False


# --------------------------------------------------------------------------- parser


_SETTING_VALUES: dict[str, dict[str, object]] = {
    "replication": {r.value: r for r in Replication},
    "checksum": {"none": Checksum.NONE, "crc32": Checksum.CRC32, "sha256": Checksum.SHA256},
    "compression": {"none": Compression.NONE, "hole": Compression.HOLE, "lzf": Compression.FAST},
    "metaflush": {"on": True, "off": False},
}

_GLOBAL = frozenset(
    {"control", "pidfile", "listen", "replication", "checksum", "compression", "timeout",
     "exec", "metaflush", "key"}
)  # fmt: skip
_GLOBAL_NODE = frozenset({"control", "pidfile", "listen"})
_RESOURCE = frozenset(
    {"replication", "checksum", "compression", "timeout", "exec", "metaflush", "name",
     "local", "key"}
)  # fmt: skip
_RESOURCE_NODE = frozenset({"name", "local", "remote", "source", "metaflush", "key"})
_STATEMENTS = _GLOBAL | _RESOURCE | _RESOURCE_NODE | {"resource", "on"}


class _Parser:
    def __init__(self, text: str, path: str, node: tuple[str, ...]) -> None:
        self.path = path
        self.node = node
        self.tokens = _tokenize(text, path)
        self.tok = next(self.tokens)

    # -- helpers

    def error(self, message: str, tok: _Token | None = None) -> ConfigError:
        tok = tok or self.tok
        return ConfigError(
            message,
            path=self.path,
            line=tok.line,
            column=tok.column,
            token=tok.text if tok.kind != "eof" else None,
        )

    def advance(self) -> _Token:
        tok = self.tok
        self.tok = next(self.tokens)
        return tok

    def describe(self, tok: _Token) -> str:
        if tok.kind == "eof":
            return "end of file"
        if tok.kind == "kw":
            return f"keyword {tok.text!r}"
        if tok.kind == "qstr":
            return "a quoted string"
        return repr(tok.text)

    def expect(self, kind: str, what: str) -> _Token:
        if self.tok.kind != kind:
            raise self.error(f"syntax error: expected {what}, found {self.describe(self.tok)}")
        return self.advance()

    def expect_name(self, what: str) -> _Token:
        tok = self.tok
        if tok.kind == "word":
            return self.advance()
        if tok.kind == "kw":
            raise self.error(
                f"syntax error: {tok.text!r} is a reserved word and cannot be used as {what}"
            )
        if tok.kind == "num":
            raise self.error(f"syntax error: a number cannot be used as {what}")
        raise self.error(f"syntax error: expected {what}, found {self.describe(tok)}")

    # -- statements

    def value(self, keyword: _Token) -> tuple[object, _Token]:
        """Read the value of the statement introduced by ``keyword``."""
        kw = keyword.text
        tok = self.tok
        if kw in _SETTING_VALUES:
            choices = _SETTING_VALUES[kw]
            if tok.kind == "kw" and tok.text in choices:
                self.advance()
                return choices[tok.text], tok
            words = " | ".join(choices)
            raise self.error(f"syntax error: {kw} must be one of: {words}")
        if kw == "timeout":
            if tok.kind != "num":
                raise self.error("syntax error: timeout needs a number of seconds")
            self.advance()
            seconds = int(tok.text)
            if seconds <= 0:
                raise self.error("Negative or zero timeout.", tok)
            if seconds > MAX_TIMEOUT:
                raise self.error(f"timeout too large (at most {MAX_TIMEOUT} seconds)", tok)
            return seconds, tok
        if kw == "key":
            if tok.kind in ("qstr", "word", "num"):
                self.advance()
                if not tok.text:
                    raise self.error("the key is empty: give a non-empty pre-shared key", tok)
                return tok.text.encode("utf-8"), tok
            raise self.error("syntax error: key needs a word or a double-quoted string")
        if kw == "remote" and tok.kind == "kw" and tok.text == "none":
            self.advance()
            return None, tok
        if tok.kind != "word":
            raise self.error(f"syntax error: {kw} needs a value, found {self.describe(tok)}")
        self.advance()
        text = tok.text
        try:
            if kw in ("listen", "remote", "source"):
                return parse_address(text), tok
            if kw == "control":
                return parse_address(text, unix_ok=True, tcp_ok=True), tok
        except ValueError as exc:
            raise self.error(f"invalid {kw} address: {exc}", tok) from None
        return text, tok

    def block(
        self, allowed: frozenset[str], where: str, sections: str | None = None
    ) -> Iterator[tuple[_Token, object, _Token]]:
        """Yield (keyword, value, value token) for the statements of a ``{ ... }`` body.

        An ``on`` is not consumed here when ``sections`` names it: it is yielded
        as (keyword, None, keyword) and the caller parses the section.
        """
        self.expect("{", "'{'")
        while True:
            tok = self.tok
            if tok.kind == "}":
                self.advance()
                return
            if tok.kind == "eof":
                raise self.error("syntax error: unexpected end of file, a '}' is missing")
            if tok.kind == "kw" and tok.text == "on" and sections:
                self.advance()
                yield tok, None, tok
                continue
            yield from self.statement(allowed, where)

    def statement(
        self, allowed: frozenset[str], where: str
    ) -> Iterator[tuple[_Token, object, _Token]]:
        tok = self.tok
        if tok.kind == "kw" and tok.text in allowed:
            self.advance()
            value, vtok = self.value(tok)
            yield tok, value, vtok
            return
        if tok.kind == "kw" and tok.text in _STATEMENTS:
            raise self.error(f"syntax error: {tok.text!r} is not allowed {where}")
        raise self.error(f"syntax error: expected a statement {where}, found {self.describe(tok)}")

    # -- file

    def parse(self) -> HastConfig:
        glob: dict[str, object] = {}
        node_settings: dict[str, object] = {}
        listens: list[Address] = []
        node_listens: list[Address] = []
        resources: list[tuple[_Token, dict[str, object], dict[str, object] | None, str]] = []
        seen: dict[str, _Token] = {}
        while self.tok.kind != "eof":
            tok = self.tok
            if tok.kind == "kw" and tok.text == "on":
                self.advance()
                node_tok = self.expect_name("a node name")
                mine = _matches(node_tok.text, self.node)
                for kw, value, _ in self.block(_GLOBAL_NODE, "in a global 'on' section"):
                    if not mine:
                        continue
                    if kw.text == "listen":
                        assert isinstance(value, Address)
                        node_listens.append(value)
                    else:
                        node_settings[kw.text] = value
                continue
            if tok.kind == "kw" and tok.text == "resource":
                self.advance()
                name_tok = self.expect_name("a resource name")
                if name_tok.text in seen:
                    first = seen[name_tok.text]
                    raise self.error(
                        f'Resource "{name_tok.text}" configured more than once '
                        f"(first at line {first.line}).",
                        name_tok,
                    )
                seen[name_tok.text] = name_tok
                res_settings: dict[str, object] = {}
                mine_settings: dict[str, object] | None = None
                mine_node = ""
                for kw, value, _ in self.block(_RESOURCE, "in a resource section", "on"):
                    if kw.text == "on":
                        node_tok = self.expect_name("a node name")
                        section: dict[str, object] = {}
                        for nkw, nvalue, _ in self.block(
                            _RESOURCE_NODE, "in a resource's 'on' section"
                        ):
                            section[nkw.text] = nvalue
                        if _matches(node_tok.text, self.node):
                            if mine_settings is None:
                                mine_settings = {}
                            mine_settings.update(section)
                            mine_node = node_tok.text
                        continue
                    res_settings[kw.text] = value
                resources.append((name_tok, res_settings, mine_settings, mine_node))
                continue
            for kw, value, _ in self.statement(_GLOBAL, "in the global section"):
                if kw.text == "listen":
                    assert isinstance(value, Address)
                    listens.append(value)
                else:
                    glob[kw.text] = value
        return self.resolve(glob, node_settings, listens + node_listens, resources)

    def resolve(
        self,
        glob: dict[str, object],
        node_settings: dict[str, object],
        listens: list[Address],
        resources: list[tuple[_Token, dict[str, object], dict[str, object] | None, str]],
    ) -> HastConfig:
        control = node_settings.get("control", glob.get("control"))
        if control is None:
            control = Address(DEFAULT_CONTROL, "uds", path=DEFAULT_CONTROL)
        pidfile = node_settings.get("pidfile", glob.get("pidfile", DEFAULT_PIDFILE))
        if not listens:
            listens = [parse_address(text) for text in DEFAULT_LISTEN]
        out: list[ResourceConfig] = []
        for name_tok, res, mine, node in resources:
            name = name_tok.text
            if mine is None:
                accepted = ", ".join(self.node) or "none"
                raise ConfigError(
                    f"No resource {name} configuration for this node "
                    f"(acceptable node names: {accepted}); add an 'on <node> {{ ... }}' section",
                    path=self.path, line=name_tok.line, column=name_tok.column, token=name,
                )  # fmt: skip

            merged = {**glob, **res, **mine}  # node section > resource > global
            pick = merged.get

            local = pick("local", None)
            if local is None:
                raise ConfigError(
                    f"Local path not configured for resource {name}: add 'local PATH'",
                    path=self.path, line=name_tok.line, column=name_tok.column, token=name,
                )  # fmt: skip
            if "remote" not in mine:
                raise ConfigError(
                    f"Remote address not configured for resource {name}: add 'remote ADDRESS'"
                    " (or 'remote none') to its 'on' section",
                    path=self.path, line=name_tok.line, column=name_tok.column, token=name,
                )  # fmt: skip
            remote = mine["remote"]
            source = mine.get("source")
            key = pick("key", None)
            exec_ = pick("exec", None)
            out.append(
                ResourceConfig(
                    name=name,
                    node=node,
                    provname=str(pick("name", name)),
                    local=str(local),
                    remote=remote if isinstance(remote, Address) else None,
                    source=source if isinstance(source, Address) else None,
                    replication=_as(pick("replication", Replication.MEMSYNC), Replication),
                    checksum=_as(pick("checksum", Checksum.NONE), Checksum),
                    compression=_as(pick("compression", Compression.HOLE), Compression),
                    timeout=_as(pick("timeout", DEFAULT_TIMEOUT), int),
                    exec=None if exec_ is None else str(exec_),
                    metaflush=_as(pick("metaflush", True), bool),
                    key=key if isinstance(key, bytes) else None,
                    line=name_tok.line,
                )
            )
        assert isinstance(control, Address)
        pid_text = str(pidfile)
        return HastConfig(
            path=self.path,
            node=self.node,
            control=control,
            pidfile=pid_text,
            listen=tuple(listens),
            resources=tuple(out),
        )


_T = TypeVar("_T")


def _as(value: object, kind: type[_T]) -> _T:
    assert isinstance(value, kind)
    return value


def parse_config(
    text: str,
    *,
    path: str = "<hast.conf>",
    node: str | Iterable[str] | None = None,
) -> HastConfig:
    """Parse hast.conf ``text`` for the node called ``node`` (a name or several names).

    Without ``node`` the machine's own names (:func:`local_node_names`) are used.
    Raises :class:`ConfigError` (file:line:column, token) on any error.
    """
    if node is None:
        names = local_node_names()
    elif isinstance(node, str):
        names = (node,)
    else:
        names = tuple(node)
    return _Parser(text, path, names).parse()


def load_config(
    path: str = DEFAULT_CONFIG_PATH, *, node: str | Iterable[str] | None = None
) -> HastConfig:
    """Read and parse the hast.conf at ``path`` (see :func:`parse_config`)."""
    return parse_config(read_config_text(path), path=path, node=node)
