"""The parsed relayd.conf: frozen dataclasses with relayd's defaults filled in.

Units follow relayd.conf(5): ``interval`` and ``session timeout`` are seconds,
check ``timeout`` is milliseconds.  Every object that a message may need to
point at keeps the ``path`` and ``line`` where it was written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "DEFAULT_BACKLOG",
    "DEFAULT_CIPHERS",
    "DEFAULT_HEADERLEN",
    "DEFAULT_INTERVAL",
    "DEFAULT_PREFORK",
    "DEFAULT_SESSION_TIMEOUT",
    "DEFAULT_SSL_DIR",
    "DEFAULT_TIMEOUT",
    "AgentX",
    "Check",
    "CheckType",
    "Direction",
    "ForwardTarget",
    "Host",
    "HttpOptions",
    "KeyAction",
    "KeyField",
    "KeyValue",
    "Keypair",
    "Listen",
    "LogOptions",
    "Mode",
    "Protocol",
    "ProtocolType",
    "Redirect",
    "RedirectListen",
    "Relay",
    "RelayForward",
    "RelaydConfig",
    "Rule",
    "RuleAction",
    "Table",
    "TableRef",
    "TcpOptions",
    "TlsOptions",
]

DEFAULT_INTERVAL = 10  #: seconds between check rounds (CHECK_INTERVAL)
DEFAULT_TIMEOUT = 200  #: check timeout in milliseconds (CHECK_TIMEOUT)
DEFAULT_PREFORK = 3  #: relay processes (RELAY_NUMPROC)
MAX_PREFORK = 32  #: PROC_MAX_INSTANCES
DEFAULT_SESSION_TIMEOUT = 600  #: seconds (RELAY_TIMEOUT)
DEFAULT_BACKLOG = 10  #: RELAY_BACKLOG
MAX_BACKLOG = 512  #: RELAY_MAX_BACKLOG
DEFAULT_HEADERLEN = 8192  #: RELAY_MAXHEADERLENGTH
MAX_HEADERLEN = 131072
DEFAULT_CIPHERS = "HIGH:!aNULL"
DEFAULT_TLS_PROTOCOLS = ("tlsv1.2", "tlsv1.3")
DEFAULT_SSL_DIR = "/etc/ssl"  #: certificates; keys live under ``private/``
MAX_PRIORITY = 63  #: RTP_MAX, the largest route priority for ``priority``


class Mode(StrEnum):
    """How a table's hosts are chosen (relay and redirect ``mode``)."""

    ROUNDROBIN = "roundrobin"
    RANDOM = "random"
    LEAST_STATES = "least-states"
    SOURCE_HASH = "source-hash"
    LOADBALANCE = "loadbalance"
    HASH = "hash"


RELAY_MODES = frozenset(
    {Mode.ROUNDROBIN, Mode.RANDOM, Mode.SOURCE_HASH, Mode.LOADBALANCE, Mode.HASH}
)
REDIRECT_MODES = frozenset({Mode.ROUNDROBIN, Mode.RANDOM, Mode.SOURCE_HASH, Mode.LEAST_STATES})
KEYED_MODES = frozenset({Mode.SOURCE_HASH, Mode.LOADBALANCE, Mode.HASH})


class CheckType(StrEnum):
    """A table's health check; ``NONE`` means hosts count as up without checks."""

    NONE = "none"
    ICMP = "icmp"
    TCP = "tcp"
    TLS = "tls"
    HTTP = "http"
    HTTPS = "https"
    SEND_EXPECT = "send"
    BINARY = "binary"
    SCRIPT = "script"


@dataclass(frozen=True, slots=True)
class Check:
    """One ``check ...`` clause.

    ``http``/``https``: ``path``, optional ``host`` (Host header, HTTP/1.1),
    and either ``code`` or ``digest`` (lower-case hex, 40 digits = SHA1,
    32 = MD5).  ``send``/``binary``: ``send`` (``""`` = send nothing, read a
    banner) and ``expect`` (an fnmatch glob, or hex bytes for ``binary``), with
    ``tls``.  ``script``: ``path`` is the program, run as ``script HOST``.
    """

    type: CheckType = CheckType.NONE
    path: str = ""
    host: str | None = None
    code: int | None = None
    digest: str | None = None
    send: str | None = None
    expect: str | None = None
    tls: bool = False

    @property
    def digest_type(self) -> str | None:
        if self.digest is None:
            return None
        return "sha1" if len(self.digest) == 40 else "md5"


@dataclass(frozen=True, slots=True)
class Host:
    """A table member.  ``id`` is relayd's host id, sequential from 1 in file order."""

    name: str  #: as written (after macro expansion)
    id: int
    kind: str  #: "ipv4", "ipv6" or "hostname"
    retry: int = 0  #: failed checks tolerated before the host is marked down
    parent: int | None = None  #: id of the host whose state this one copies
    priority: int | None = None  #: route priority (routers)
    ip_ttl: int | None = None  #: TTL of the check packets
    path: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class Table:
    """``table <name> [disable] { host ... }``."""

    name: str
    hosts: tuple[Host, ...]
    disabled: bool = False
    path: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class TableRef:
    """A table as used by ``forward to <name> ...`` with its per-use options.

    ``port`` defaults to the (first) listen port of the relay or redirect;
    ``timeout``/``interval`` to the global values; ``retry`` is not a table
    option in relayd (it belongs to hosts).
    """

    table: str
    port: int
    mode: Mode = Mode.ROUNDROBIN
    mode_key: str | None = None
    check: Check = field(default_factory=Check)
    timeout: int = DEFAULT_TIMEOUT  #: ms
    interval: int = DEFAULT_INTERVAL  #: s, a multiple of the global interval
    demote: str | None = None  #: carp demotion group
    line: int = 0

    @property
    def display_name(self) -> str:
        """The name relayctl shows: ``name:port``."""
        return f"{self.table}:{self.port}"


class ForwardTarget(StrEnum):
    TABLE = "table"
    ADDRESS = "address"
    DESTINATION = "destination"
    NAT_LOOKUP = "nat lookup"


@dataclass(frozen=True, slots=True)
class RelayForward:
    """One ``forward to`` line of a relay."""

    target: ForwardTarget
    table: TableRef | None = None
    address: str | None = None  #: for ADDRESS targets
    port: int | None = None  #: for ADDRESS targets (None: the listen port)
    retry: int = 0  #: connect retries (ADDRESS, DESTINATION, NAT_LOOKUP)
    line: int = 0


@dataclass(frozen=True, slots=True)
class Keypair:
    """Where a TLS listener's certificate and key are looked up."""

    name: str
    cert: str
    key: str


@dataclass(frozen=True, slots=True)
class Listen:
    """``listen on ADDRESS port N [tls]`` in a relay."""

    address: str
    port: int
    tls: bool = False
    keypairs: tuple[Keypair, ...] = ()  #: resolved for TLS listeners
    line: int = 0


@dataclass(frozen=True, slots=True)
class Relay:
    """``relay "name" { ... }`` (a layer-7 proxy)."""

    name: str
    listen: tuple[Listen, ...]
    forwards: tuple[RelayForward, ...]
    protocol: str = "default"
    forward_tls: bool = False  #: ``forward with tls``
    transparent: bool = False
    session_timeout: int = DEFAULT_SESSION_TIMEOUT
    disabled: bool = False
    inet6_prefix: str | None = None  #: ``forward ... inet6 PREFIX`` (NAT64-style)
    inet: bool = False  #: ``forward ... inet``
    proxy_protocol: str | None = None  #: "v1" or "v2"
    path: str = ""
    line: int = 0

    @property
    def tables(self) -> tuple[TableRef, ...]:
        """The tables in order: the first is the main table, later ones are backups."""
        return tuple(f.table for f in self.forwards if f.table is not None)


@dataclass(frozen=True, slots=True)
class RedirectListen:
    """``listen on ADDRESS [tcp|udp] port N[:M] [interface IF] [pflog]``."""

    address: str
    port: int
    port_end: int | None = None
    ip_proto: str = "tcp"
    interface: str | None = None
    pflog: bool = False
    line: int = 0


@dataclass(frozen=True, slots=True)
class Redirect:
    """``redirect "name" { ... }`` (a layer-3 redirection; nftables on Linux)."""

    name: str
    listen: tuple[RedirectListen, ...]
    table: TableRef
    backup: TableRef | None = None
    route_to: bool = False  #: ``route to`` (direct server return) instead of ``forward to``
    route_interface: str | None = None
    sticky_address: bool = False
    session_timeout: int = DEFAULT_SESSION_TIMEOUT
    tag: str | None = None  #: ``pftag``
    match_tag: bool = False  #: ``match pftag``: tag without deciding (``match in``)
    disabled: bool = False
    path: str = ""
    line: int = 0


class ProtocolType(StrEnum):
    TCP = "tcp"
    HTTP = "http"
    DNS = "dns"


@dataclass(frozen=True, slots=True)
class TcpOptions:
    nodelay: bool = False
    sack: bool = False
    splice: bool = True
    backlog: int = DEFAULT_BACKLOG
    socket_buffer: int | None = None
    ip_ttl: int | None = None
    ip_minttl: int | None = None


@dataclass(frozen=True, slots=True)
class TlsOptions:
    """``tls`` options.  ``protocols`` lists the enabled versions; sslv3, tlsv1.0
    and tlsv1.1 are accepted (with or without ``no``) and ignored, as relayd does."""

    ciphers: str = DEFAULT_CIPHERS
    protocols: tuple[str, ...] = DEFAULT_TLS_PROTOCOLS
    session_tickets: bool = False
    ecdhe: str = "default"
    edh: bool = False
    edh_params: str = "none"
    cipher_server_preference: bool = True
    client_renegotiation: bool = False
    ca_file: str | None = None
    ca_cert: str | None = None
    ca_key: str | None = None
    ca_key_password: str | None = field(default=None, repr=False)
    client_ca: str | None = None
    keypairs: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HttpOptions:
    headerlen: int = DEFAULT_HEADERLEN
    websockets: bool = False


class RuleAction(StrEnum):
    PASS = "pass"
    BLOCK = "block"
    MATCH = "match"


class Direction(StrEnum):
    REQUEST = "request"
    RESPONSE = "response"


class KeyField(StrEnum):
    COOKIE = "cookie"
    HEADER = "header"
    PATH = "path"
    QUERY = "query"
    URL = "url"
    FILE = "file"


class KeyAction(StrEnum):
    NONE = "none"  #: only match
    APPEND = "append"
    SET = "set"
    REMOVE = "remove"
    HASH = "hash"
    LOG = "log"


@dataclass(frozen=True, slots=True)
class KeyValue:
    """``header|cookie|path|query|url [append|set|remove|hash|log] [digest] [KEY [value V]]``.

    For ``file``, ``key`` is the path of a file holding one key per line.
    ``value`` may hold relayd's run-time macros (``$REMOTE_ADDR`` ...), kept as written.
    """

    field: KeyField
    action: KeyAction = KeyAction.NONE
    key: str | None = None
    value: str | None = None
    digest: bool = False


@dataclass(frozen=True, slots=True)
class Rule:
    """A ``pass``/``block``/``match`` filter rule of a protocol."""

    action: RuleAction
    direction: Direction = Direction.REQUEST
    quick: bool = False
    family: str | None = None  #: "inet" or "inet6"
    source: str | None = None  #: ``from ADDR[/LEN]``
    destination: str | None = None  #: ``to ADDR[/LEN]``
    method: str | None = None
    keys: tuple[KeyValue, ...] = ()
    path_strip: int | None = None
    forward_to: str | None = None  #: table name
    tag: str | None = None
    untag: bool = False  #: ``no tag``
    tagged: str | None = None
    label: str | None = None
    unlabel: bool = False  #: ``no label``
    line: int = 0


@dataclass(frozen=True, slots=True)
class Protocol:
    """``[tcp|http|dns] protocol "name" { ... }`` (``tcp`` when no type is written)."""

    name: str
    type: ProtocolType = ProtocolType.TCP
    tcp: TcpOptions = field(default_factory=TcpOptions)
    tls: TlsOptions = field(default_factory=TlsOptions)
    http: HttpOptions = field(default_factory=HttpOptions)
    rules: tuple[Rule, ...] = ()
    return_error: bool = False  #: send an error page instead of dropping
    return_error_style: str | None = None
    path: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class LogOptions:
    state_changes: bool = False
    host_checks: bool = False
    connection: bool = False
    connection_errors: bool = False


@dataclass(frozen=True, slots=True)
class AgentX:
    """``agentx [context C] [path P]``: accepted, not served by carpool."""

    context: str | None = None
    path: str = "/var/agentx/master"


@dataclass(frozen=True, slots=True)
class RelaydConfig:
    """A whole relayd.conf with every default filled in."""

    path: str
    interval: int = DEFAULT_INTERVAL
    timeout: int = DEFAULT_TIMEOUT
    prefork: int = DEFAULT_PREFORK
    log: LogOptions = field(default_factory=LogOptions)
    agentx: AgentX | None = None
    socket: str | None = None  #: ``socket PATH``; None: the daemon's default
    tables: tuple[Table, ...] = ()
    protocols: tuple[Protocol, ...] = ()
    relays: tuple[Relay, ...] = ()
    redirects: tuple[Redirect, ...] = ()
    macros: tuple[tuple[str, str], ...] = ()  #: the final macro table (name, value)
    warnings: tuple[str, ...] = ()  #: what ``relayd -v`` would warn about

    def table(self, name: str) -> Table:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def protocol(self, name: str) -> Protocol:
        for p in self.protocols:
            if p.name == name:
                return p
        if name == "default":
            return Protocol(name="default")
        raise KeyError(name)

    def relay(self, name: str) -> Relay:
        for r in self.relays:
            if r.name == name:
                return r
        raise KeyError(name)

    def redirect(self, name: str) -> Redirect:
        for r in self.redirects:
            if r.name == name:
                return r
        raise KeyError(name)
