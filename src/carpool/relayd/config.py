"""relayd.conf → :class:`~carpool.relayd.model.RelaydConfig`, checked as relayd checks it.

:func:`parse_relayd_config` lexes (:mod:`~carpool.relayd.lexer`: macros,
includes, comments), parses (:mod:`~carpool.relayd.grammar`: lark LALR) and
then builds the frozen dataclasses of :mod:`~carpool.relayd.model` here,
filling in relayd's defaults and applying its checks: names defined once and
before use (tables and protocols, as parse.y looks them up while parsing),
ports 1..65535 (or a service name), hosts that are IPv4/IPv6 addresses or
host names, modes valid for relays or redirections, ``timeout`` below
``interval``, table intervals that are multiples of the global one, backup
tables matching their main table, ``parent`` ids that exist, and TLS
listeners whose certificate and key can be found.

Every error is a :class:`~carpool.errors.ConfigError` printed as relayd
prints it, ``file:line: message``, with our column and the token added.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import replace
from typing import Any

from lark import Token, Tree

from carpool.configfile import read_config_text
from carpool.errors import ConfigError
from carpool.relayd.grammar import parse_tokens
from carpool.relayd.lexer import Loc, Tok, tokenize
from carpool.relayd.model import (
    DEFAULT_SSL_DIR,
    KEYED_MODES,
    MAX_BACKLOG,
    MAX_HEADERLEN,
    MAX_PREFORK,
    MAX_PRIORITY,
    REDIRECT_MODES,
    RELAY_MODES,
    AgentX,
    Check,
    CheckType,
    Direction,
    ForwardTarget,
    Host,
    KeyAction,
    KeyField,
    Keypair,
    KeyValue,
    Listen,
    LogOptions,
    Mode,
    Protocol,
    ProtocolType,
    Redirect,
    RedirectListen,
    Relay,
    RelaydConfig,
    RelayForward,
    Rule,
    RuleAction,
    Table,
    TableRef,
    TcpOptions,
    TlsOptions,
)

__all__ = ["DEFAULT_CONFIG_PATH", "load_relayd_config", "parse_relayd_config"]

DEFAULT_CONFIG_PATH = "/etc/relayd.conf"
INT_MAX = 2**31 - 1

#: relayd's http.h method table (HTTP/1.1 and WebDAV).
_METHODS = """
    GET HEAD POST PUT DELETE OPTIONS TRACE CONNECT PATCH PROPFIND PROPPATCH
    MKCOL COPY MOVE LOCK UNLOCK VERSION-CONTROL REPORT CHECKOUT CHECKIN
    UNCHECKOUT MKWORKSPACE UPDATE LABEL MERGE BASELINE-CONTROL MKACTIVITY
    ORDERPATCH ACL MKREDIRECTREF UPDATEREDIRECTREF SEARCH
"""
HTTP_METHODS = frozenset(_METHODS.split())
TLS_FLAGS = (
    "tlsv1",
    "tlsv1.0",
    "tlsv1.1",
    "tlsv1.2",
    "tlsv1.3",
    "sslv3",
    "cipher-server-preference",
    "client-renegotiation",
)
_SERVICES = {"http": 80, "https": 443, "ftp": 21, "ssh": 22, "smtp": 25, "domain": 53}
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_-]{1,63})*\.?")
_HEX = re.compile(r"[0-9a-fA-F]+")


# ------------------------------------------------------------------ helpers


#: A lark parse-tree node: the tree's shape is fixed by the grammar, so it is walked untyped.
_Node = Any


def _children(tree: _Node) -> list[Any]:
    return [c for c in tree.children if c is not None]


class _Builder:
    def __init__(
        self, path: str, toks: list[Tok], locs: list[Loc], ssl_dir: str, check_certs: bool
    ) -> None:
        self.path = path
        self.toks = toks
        self.locs = locs
        self.ssl_dir = ssl_dir
        self.check_certs = check_certs
        self.interval = 10
        self.timeout = 200
        self.timing_loc = Loc(path, 0, 0)  # the later of ``interval`` and ``timeout``
        self.prefork = 3
        self.log = LogOptions()
        self.agentx: AgentX | None = None
        self.socket: str | None = None
        self.tables: dict[str, Table] = {}
        self.protocols: dict[str, Protocol] = {}
        self.relays: dict[str, Relay] = {}
        self.redirects: dict[str, Redirect] = {}
        self.used_tables: set[str] = set()
        self.used_protocols: set[str] = set()
        self.table_refs: list[tuple[TableRef, Loc]] = []
        self.next_host_id = 1
        self.warnings: list[str] = []

    # ------------------------------------------------------------ locations

    def loc(self, tok: Token) -> Loc:
        return self.locs[tok.start_pos or 0]

    def tree_loc(self, tree: _Node) -> Loc:
        meta = tree.meta
        if not meta.empty and meta.start_pos is not None:
            loc: Loc = self.locs[meta.start_pos]
            return loc
        for tok in tree.scan_values(lambda v: isinstance(v, Token)):
            return self.loc(tok)
        return Loc(self.path, 0, 0)

    def error(self, message: str, at: Any, token: str | None = None) -> ConfigError:
        if isinstance(at, Token):
            loc = self.loc(at)
            token = str(at) if token is None else token
        elif isinstance(at, Tree):
            loc = self.tree_loc(at)
            if token is None and not at.meta.empty and at.meta.start_pos is not None:
                token = self.toks[at.meta.start_pos].text
        else:
            loc = at
        return ConfigError(message, path=loc.path, line=loc.line, column=loc.column, token=token)

    def where(self, loc: Loc) -> str:
        return f"{loc.path}:{loc.line}"

    # --------------------------------------------------------------- values

    def number(self, tok: Token, what: str, low: int, high: int) -> int:
        if tok.type != "NUMBER":
            raise self.error(f"{what} must be a number", tok)
        value = int(tok)
        if not low <= value <= high:
            raise self.error(f"invalid {what}: {value} (allowed {low}..{high})", tok)
        return value

    def port(self, tree: _Node) -> int:
        (item,) = tree.children
        tok: Any = item.children[0] if isinstance(item, Tree) else item
        if tok.type == "NUMBER":
            return self.number(tok, "port", 1, 65535)
        return self.service(tok)

    def service(self, tok: Token) -> int:
        name = str(tok)
        if name in _SERVICES:
            return _SERVICES[name]
        try:
            return socket.getservbyname(name, "tcp")
        except (OSError, UnicodeError):
            raise self.error(
                f"invalid port: {name!r} is neither a number in 1..65535 nor a service name",
                tok,
            ) from None

    def address(self, tok: Token, what: str = "host") -> tuple[str, str]:
        text = str(tok)
        try:
            ip = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            if _HOSTNAME.fullmatch(text) and not re.fullmatch(r"[0-9.]+", text):
                return text, "hostname"
            raise self.error(
                f"invalid {what} address {text!r}: expected an IPv4 or IPv6 address or a host name",
                tok,
            ) from None
        return text, "ipv4" if ip.version == 4 else "ipv6"

    def prefix(self, tree: _Node) -> str:
        addr_tok = tree.children[0]
        length = tree.children[1] if len(tree.children) > 1 else None
        text, kind = self.address(addr_tok, "rule")
        if kind == "hostname":
            raise self.error(f"invalid address {text!r}: expected an IP address", addr_tok)
        if length is None:
            return text
        bits = 32 if kind == "ipv4" else 128
        n = self.number(length, "prefix length", 0, bits)
        try:
            return str(ipaddress.ip_network(f"{text}/{n}", strict=False))
        except ValueError:  # pragma: no cover - scoped addresses
            raise self.error(f"invalid network {text}/{n}", addr_tok) from None

    # ------------------------------------------------------------- globals

    def build(self, tree: _Node) -> None:
        for stmt in _children(tree):
            method = getattr(self, "stmt_" + str(stmt.data))
            method(stmt)

    def stmt_macro(self, tree: _Node) -> None:
        return  # defined by the lexer as it read the file

    def stmt_interval(self, tree: _Node) -> None:
        self.interval = self.number(tree.children[0], "interval", 1, INT_MAX)
        self.timing_loc = self.tree_loc(tree)

    def stmt_timeout(self, tree: _Node) -> None:
        self.timeout = self.number(tree.children[0], "timeout", 0, INT_MAX)
        self.timing_loc = self.tree_loc(tree)

    def stmt_prefork(self, tree: _Node) -> None:
        self.prefork = self.number(tree.children[0], "number of preforked relays", 1, MAX_PREFORK)

    def stmt_log(self, tree: _Node) -> None:
        words = [str(t) for t in _children(tree.children[0])]
        log = self.log
        if words == ["state", "changes"] or words == ["updates"]:
            log = replace(log, state_changes=True)
        elif words == ["host", "checks"]:
            log = replace(log, host_checks=True)
        elif words == ["connection"]:
            log = replace(log, connection=True)
        elif words == ["connection", "errors"]:
            log = replace(log, connection_errors=True)
        else:  # "all": the pre-2019 word for every state notification
            log = replace(log, state_changes=True, host_checks=True)
        self.log = log

    def stmt_agentx(self, tree: _Node) -> None:
        ax = AgentX()
        for opt in _children(tree):
            if opt.data == "agentx_context":
                ax = replace(ax, context=str(opt.children[0]))
            else:
                ax = replace(ax, path=str(opt.children[0]))
        self.agentx = ax
        loc = self.tree_loc(tree)
        self.warnings.append(
            f"{self.where(loc)}: agentx is accepted and ignored: carpool exports "
            "Prometheus metrics (--metrics) instead of SNMP"
        )

    def stmt_socket(self, tree: _Node) -> None:
        self.socket = str(tree.children[0])

    def stmt_router(self, tree: _Node) -> None:
        name = tree.children[0]
        raise self.error(
            f"router {str(name)!r}: routers are not supported by carpool "
            "(remove the router block; use routes of the system instead)",
            name,
        )

    # --------------------------------------------------------------- tables

    def stmt_table(self, tree: _Node) -> None:
        name_tok = tree.children[0]
        name = str(name_tok)
        if name in self.tables:
            first = self.tables[name]
            raise self.error(
                f"table <{name}> defined twice (first at {first.path}:{first.line})", name_tok
            )
        disabled = False
        hosts: list[Host] = []
        seen: dict[str, Host] = {}
        for body in _children(tree)[1:]:
            if body.data == "table_disable":
                disabled = True
                continue
            for host_tree in _children(body):
                host = self.host(host_tree)
                if host.name in seen:
                    raise self.error(
                        f"host {host.name} appears twice in table <{name}>",
                        host_tree.children[0],
                    )
                seen[host.name] = host
                hosts.append(host)
        loc = self.loc(name_tok)
        self.tables[name] = Table(name, tuple(hosts), disabled, loc.path, loc.line)

    def host(self, tree: _Node) -> Host:
        addr_tok = tree.children[0].children[0]
        text, kind = self.address(addr_tok)
        loc = self.loc(addr_tok)
        host = Host(text, self.next_host_id, kind, path=loc.path, line=loc.line)
        self.next_host_id += 1
        given: set[str] = set()
        for opt in _children(tree)[1:]:
            kind_name = str(opt.data)
            if kind_name in given:
                raise self.error(f"{kind_name.split('_', 1)[1]} given twice for host {text}", opt)
            given.add(kind_name)
            num = opt.children[0]
            if kind_name == "host_retry":
                host = replace(host, retry=self.number(num, "retry", 0, INT_MAX))
            elif kind_name == "host_parent":
                host = replace(host, parent=self.number(num, "parent id", 1, INT_MAX))
            elif kind_name == "host_priority":
                host = replace(host, priority=self.number(num, "priority", 0, MAX_PRIORITY))
            else:
                host = replace(host, ip_ttl=self.number(num, "ip ttl", 1, 255))
        return host

    def tablespec(self, tree: _Node, owner: str) -> tuple[TableRef, Token]:
        """A ``<name> options`` use of a table; ``port`` 0 means "the listen port"."""
        name_tok = tree.children[0]
        name = str(name_tok)
        if name not in self.tables:
            raise self.error(
                f"no such table: <{name}> (define it with 'table <{name}> {{ ... }}' "
                "before it is used)",
                name_tok,
                f"<{name}>",
            )
        self.used_tables.add(name)
        ref = TableRef(
            name, 0, timeout=self.timeout, interval=self.interval, line=self.loc(name_tok).line
        )
        given: dict[str, _Node] = {}
        explicit_interval = explicit_timeout = False
        for opt in _children(tree)[1:]:
            kind = str(opt.data)
            if kind in given:
                raise self.error(f"{kind[3:]} given twice for table <{name}> in {owner}", opt)
            given[kind] = opt
            if kind == "ts_port":
                ref = replace(ref, port=self.port(opt.children[0]))
            elif kind == "ts_check":
                ref = replace(ref, check=self.check(opt.children[0]))
            elif kind == "ts_timeout":
                ref = replace(ref, timeout=self.number(opt.children[0], "timeout", 0, INT_MAX))
                explicit_timeout = True
            elif kind == "ts_interval":
                ref = replace(ref, interval=self.number(opt.children[0], "interval", 1, INT_MAX))
                explicit_interval = True
            elif kind == "ts_demote":
                group = str(opt.children[0])
                if len(group) >= 16 or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", group):
                    raise self.error(f"invalid demote group name {group!r}", opt.children[0])
                ref = replace(ref, demote=group)
            else:
                mode = Mode(str(opt.children[0].children[0]))
                key_tok = opt.children[1]
                key = None
                if key_tok is not None:
                    if mode not in KEYED_MODES:
                        raise self.error(f"mode {mode} does not take a key", key_tok)
                    key = str(key_tok)
                    if key.startswith("0x") and not (len(key) == 34 and _HEX.fullmatch(key[2:])):
                        raise self.error(
                            "invalid hash key: 0x needs exactly 32 hex digits "
                            "(or give any other string, which is hashed)",
                            key_tok,
                        )
                ref = replace(ref, mode=mode, mode_key=key)
        if explicit_interval or explicit_timeout:
            self.table_refs.append((ref, self.loc(name_tok)))
        return ref, name_tok

    def check(self, tree: _Node) -> Check:
        kind = str(tree.data)
        args = tree.children
        if kind == "check_icmp":
            return Check(CheckType.ICMP)
        if kind == "check_tcp":
            return Check(CheckType.TCP)
        if kind == "check_tls":
            return Check(CheckType.TLS)
        if kind == "check_script":
            return Check(CheckType.SCRIPT, path=str(args[0]))
        if kind in ("check_http", "check_https"):
            ctype = CheckType.HTTP if kind == "check_http" else CheckType.HTTPS
            path_tok, host_tree, result = args
            if not str(path_tok):
                raise self.error('http check needs a path, such as "/"', path_tok, '""')
            host = str(host_tree.children[0]) if host_tree is not None else None
            val = result.children[0]
            if result.data == "check_code":
                code = self.number(val, "http code", 100, 599)
                return Check(ctype, path=str(path_tok), host=host, code=code)
            digest = str(val).lower()
            if len(digest) not in (32, 40) or not _HEX.fullmatch(digest):
                raise self.error("invalid digest: expected 40 hex digits (SHA1) or 32 (MD5)", val)
            return Check(ctype, path=str(path_tok), host=host, digest=digest)
        if kind == "check_send":
            data_tree, expect, tls = args
            item = data_tree.children[0]
            send = "" if isinstance(item, Tree) else str(item)
            return Check(CheckType.SEND_EXPECT, send=send, expect=str(expect), tls=tls is not None)
        send_tok, expect_tok, tls = args
        for tok in (send_tok, expect_tok):
            text = str(tok)
            if not text or len(text) % 2 or not _HEX.fullmatch(text):
                raise self.error("invalid hex data: expected an even number of hex digits", tok)
        return Check(
            CheckType.BINARY,
            send=str(send_tok).lower(),
            expect=str(expect_tok).lower(),
            tls=tls is not None,
        )

    # -------------------------------------------------------------- protocols

    def stmt_protocol(self, tree: _Node) -> None:
        type_tree, name_tok, *opts = tree.children
        name = str(name_tok)
        loc = self.loc(name_tok)
        if name == "default":
            raise self.error("protocol name 'default' is reserved; choose another", name_tok)
        if name in self.protocols:
            first = self.protocols[name]
            raise self.error(
                f"protocol {name!r} defined twice (first at {first.path}:{first.line})", name_tok
            )
        ptype = (
            ProtocolType(str(type_tree.children[0])) if type_tree is not None else ProtocolType.TCP
        )
        proto = Protocol(name, ptype, path=loc.path, line=loc.line)
        tcp = proto.tcp
        tls = proto.tls
        http = proto.http
        rules: list[Rule] = []
        for opt in opts:
            if opt is None:
                continue
            kind = str(opt.data)
            if kind == "p_tcp":
                if ptype is ProtocolType.DNS:
                    raise self.error("tcp options are only valid in tcp or http protocols", opt)
                for sub in _children(opt):
                    tcp = self.tcp_opt(tcp, sub)
            elif kind == "p_tls":
                if ptype is ProtocolType.DNS:
                    raise self.error("tls options are only valid in tcp or http protocols", opt)
                for sub in _children(opt):
                    tls = self.tls_opt(tls, sub)
            elif kind == "p_http":
                if ptype is not ProtocolType.HTTP:
                    raise self.error(
                        f"http options need an http protocol (write 'http protocol {name!r}')",
                        opt,
                    )
                for sub in _children(opt):
                    if sub.data == "http_headerlen":
                        http = replace(
                            http,
                            headerlen=self.number(sub.children[0], "headerlen", 0, MAX_HEADERLEN),
                        )
                    else:
                        http = replace(http, websockets=sub.children[0] is None)
            elif kind == "p_return":
                style = opt.children[0] if opt.children else None
                proto = replace(
                    proto,
                    return_error=True,
                    return_error_style=str(style.children[0]) if style is not None else None,
                )
            else:
                rules.append(self.rule(opt, ptype, name))
        self.protocols[name] = replace(proto, tcp=tcp, tls=tls, http=http, rules=tuple(rules))

    def tcp_opt(self, tcp: TcpOptions, tree: _Node) -> TcpOptions:
        kind = str(tree.data)
        arg: Any = tree.children[0] if tree.children else None
        if kind in ("tcp_nodelay", "tcp_sack", "tcp_splice"):
            return replace(tcp, **{kind[4:]: arg is None})
        if kind == "tcp_backlog":
            return replace(tcp, backlog=self.number(arg, "backlog", 0, MAX_BACKLOG))
        if kind == "tcp_socket_buffer":
            return replace(tcp, socket_buffer=self.number(arg, "socket buffer", 1, INT_MAX))
        if kind == "tcp_ip_ttl":
            return replace(tcp, ip_ttl=self.number(arg, "ip ttl", 1, 255))
        return replace(tcp, ip_minttl=self.number(arg, "ip minttl", 1, 255))

    def tls_opt(self, tls: TlsOptions, tree: _Node) -> TlsOptions:
        kind = str(tree.data)
        args = tree.children
        if kind == "tls_tickets":
            return replace(tls, session_tickets=args[0] is None)
        if kind == "tls_ciphers":
            if not str(args[0]):
                raise self.error("empty cipher list", args[0], '""')
            return replace(tls, ciphers=str(args[0]))
        if kind == "tls_ecdhe":
            return replace(tls, ecdhe=str(args[0]))
        if kind == "tls_edh":
            on = args[0] is None
            return replace(tls, edh=on, edh_params="auto" if on else "none")
        if kind == "tls_edh_params":
            params = str(args[0])
            if params not in ("none", "auto", "legacy"):
                raise self.error("edh params must be none, auto or legacy", args[0])
            return replace(tls, edh=params != "none", edh_params=params)
        if kind == "tls_ca_file":
            return replace(tls, ca_file=str(args[0]))
        if kind == "tls_ca_cert":
            return replace(tls, ca_cert=str(args[0]))
        if kind == "tls_ca_key":
            return replace(tls, ca_key=str(args[0]), ca_key_password=str(args[1]))
        if kind == "tls_client_ca":
            return replace(tls, client_ca=str(args[0]))
        if kind == "tls_keypair":
            name = str(args[0])
            if not name or "/" in name:
                raise self.error("invalid keypair name (a file name without '/')", args[0])
            if name in tls.keypairs:
                raise self.error(f"keypair {name} given twice", args[0])
            return replace(tls, keypairs=(*tls.keypairs, name))
        negate, flag_tok = args
        flag = str(flag_tok)
        if flag not in TLS_FLAGS:
            raise self.error(
                f"unknown tls option {flag!r} (expected keypair, ciphers, ecdhe, edh, ca, "
                "client ca, session tickets or one of " + ", ".join(TLS_FLAGS) + ")",
                flag_tok,
            )
        on = negate is None
        if flag == "cipher-server-preference":
            return replace(tls, cipher_server_preference=on)
        if flag == "client-renegotiation":
            return replace(tls, client_renegotiation=on)
        if flag in ("sslv3", "tlsv1.0", "tlsv1.1"):
            return tls  # accepted and ignored, as relayd does since 2024
        versions = {"tlsv1.2", "tlsv1.3"} if flag == "tlsv1" else {flag}
        current = set(tls.protocols)
        current = current | versions if on else current - versions
        return replace(tls, protocols=tuple(sorted(current)))

    def rule(self, tree: _Node, ptype: ProtocolType, proto: str) -> Rule:
        action_t, dir_t, quick_t, fam_t, from_t, to_t, *opts = tree.children
        loc = self.tree_loc(tree)
        rule = Rule(
            RuleAction(str(action_t.children[0])),
            Direction(str(dir_t.children[0])) if dir_t is not None else Direction.REQUEST,
            quick=quick_t is not None,
            family=str(fam_t.children[0]) if fam_t is not None else None,
            source=self.prefix(from_t.children[0]) if from_t is not None else None,
            destination=self.prefix(to_t.children[0]) if to_t is not None else None,
            line=loc.line,
        )
        keys: list[KeyValue] = []
        seen: set[str] = set()
        for opt in opts:
            if opt is None:
                continue
            kind = str(opt.data)
            once = kind if kind != "r_kv" else str(opt.children[0].children[0])
            if once in seen:
                raise self.error(f"{once.removeprefix('r_')} given twice in one rule", opt)
            seen.add(once)
            if kind in ("r_method", "r_kv", "r_file", "r_path_strip") and (
                ptype is not ProtocolType.HTTP
            ):
                raise self.error(
                    f"http rules need an http protocol (write 'http protocol {proto!r}')", opt
                )
            args = opt.children
            if kind == "r_method":
                method = str(args[0]).upper()
                if method not in HTTP_METHODS:
                    raise self.error(f"unknown HTTP method {str(args[0])!r}", args[0])
                rule = replace(rule, method=method)
            elif kind == "r_kv":
                keys.append(self.key_value(opt, rule.direction))
            elif kind == "r_file":
                value = args[1]
                keys.append(
                    KeyValue(
                        KeyField.FILE,
                        key=str(args[0]),
                        value=str(value.children[0]) if value is not None else None,
                    )
                )
            elif kind == "r_path_strip":
                rule = replace(rule, path_strip=self.number(args[0], "path strip", 0, INT_MAX))
            elif kind == "r_forward":
                table = str(args[0])
                if table not in self.tables:
                    raise self.error(f"no such table: <{table}>", args[0])
                self.used_tables.add(table)
                rule = replace(rule, forward_to=table)
            elif kind == "r_tag":
                rule = replace(rule, tag=str(args[0]))
            elif kind == "r_untag":
                rule = replace(rule, untag=True)
            elif kind == "r_tagged":
                rule = replace(rule, tagged=str(args[0]))
            elif kind == "r_label":
                rule = replace(rule, label=str(args[0]))
            else:
                rule = replace(rule, unlabel=True)
        return replace(rule, keys=tuple(keys))

    def key_value(self, tree: _Node, direction: Direction) -> KeyValue:
        field_t, action_t, digest_t, key_tok, value_t = tree.children
        kfield = KeyField(str(field_t.children[0]))
        action = KeyAction(str(action_t.children[0])) if action_t is not None else KeyAction.NONE
        key = str(key_tok) if key_tok is not None else None
        value = str(value_t.children[0]) if value_t is not None else None
        if kfield is not KeyField.HEADER and direction is Direction.RESPONSE:
            raise self.error(f"{kfield} rules apply to requests only", field_t)
        if kfield in (KeyField.QUERY, KeyField.URL) and action in (
            KeyAction.APPEND,
            KeyAction.SET,
            KeyAction.REMOVE,
        ):
            raise self.error(f"{kfield} cannot be changed with {action}", action_t)
        if action in (KeyAction.APPEND, KeyAction.SET) and (key is None or value is None):
            raise self.error(
                f"{kfield} {action} needs a name and a value: "
                f'{kfield} {action} "NAME" value "VALUE"',
                field_t,
            )
        if action is KeyAction.REMOVE and key is None:
            raise self.error(f'{kfield} remove needs a name: {kfield} remove "NAME"', field_t)
        if value is not None and key is None:
            raise self.error(f"value without a {kfield} name", value_t)
        return KeyValue(kfield, action, key, value, digest=digest_t is not None)

    # ----------------------------------------------------------------- relays

    def stmt_relay(self, tree: _Node) -> None:
        name_tok, *opts = tree.children
        name = str(name_tok)
        loc = self.loc(name_tok)
        if name in self.relays:
            first = self.relays[name]
            raise self.error(
                f"relay {name!r} defined twice (first at {first.path}:{first.line})", name_tok
            )
        listens: list[tuple[Listen, Token]] = []
        forwards: list[tuple[RelayForward, Token | None]] = []
        relay = Relay(name, (), (), path=loc.path, line=loc.line)
        protocol_given = False
        for opt in opts:
            if opt is None:
                continue
            kind = str(opt.data)
            args = opt.children
            if kind == "relay_listen":
                addr, _ = self.address(args[0], "listen")
                port = self.port(args[1])
                listens.append(
                    (
                        Listen(addr, port, tls=args[2] is not None, line=self.loc(args[0]).line),
                        args[0],
                    )
                )
            elif kind == "relay_protocol":
                pname = str(args[0])
                if protocol_given:
                    raise self.error(f"relay {name!r}: protocol given twice", args[0])
                protocol_given = True
                if pname != "default" and pname not in self.protocols:
                    raise self.error(
                        f"no such protocol: {pname!r} (define it before the relay that uses it)",
                        args[0],
                    )
                self.used_protocols.add(pname)
                relay = replace(relay, protocol=pname)
            elif kind == "session_timeout":
                relay = replace(
                    relay, session_timeout=self.number(args[0], "session timeout", 0, INT_MAX)
                )
            elif kind == "disable":
                relay = replace(relay, disabled=True)
            else:
                relay = self.relay_forward(relay, opt, forwards)
        if not listens:
            raise self.error(
                f"relay {name!r} has no listener: add 'listen on ADDRESS port N'", name_tok
            )
        if not forwards:
            raise self.error(
                f"relay {name!r} has no target: add 'forward to <table> port N' "
                "or 'forward to ADDRESS port N'",
                name_tok,
            )
        kinds = {f.target for f, _ in forwards}
        if {ForwardTarget.DESTINATION, ForwardTarget.NAT_LOOKUP} <= kinds:
            raise self.error(
                f"relay {name!r}: nat lookup and destination are mutually exclusive", name_tok
            )
        if sum(1 for f, _ in forwards if f.target is not ForwardTarget.TABLE) > 1:
            raise self.error(f"relay {name!r} has more than one non-table target", name_tok)
        default_port = listens[0][0].port
        final: list[RelayForward] = []
        for fwd, tok in forwards:
            if fwd.table is not None:
                if fwd.table.mode not in RELAY_MODES:
                    raise self.error(
                        f"mode {fwd.table.mode} is only for redirections, not relays",
                        tok or name_tok,
                    )
                if fwd.table.port == 0:
                    fwd = replace(fwd, table=replace(fwd.table, port=default_port))
            final.append(fwd)
        protocol = self.protocols.get(relay.protocol, Protocol("default"))
        final_listens = tuple(
            replace(lst, keypairs=self.keypairs(lst, protocol, tok, name)) if lst.tls else lst
            for lst, tok in listens
        )
        self.relays[name] = replace(relay, listen=final_listens, forwards=tuple(final))

    def relay_forward(
        self,
        relay: Relay,
        opt: _Node,
        forwards: list[tuple[RelayForward, Token | None]],
    ) -> Relay:
        transparent, with_tls, spec, *extras = opt.children
        if transparent is not None:
            relay = replace(relay, transparent=True)
        if with_tls is not None:
            relay = replace(relay, forward_tls=True)
        kind = str(spec.data)
        line = self.tree_loc(spec).line
        tok: Token | None = None
        if kind == "fwd_table":
            ref, tok = self.tablespec(spec.children[0], f"relay {relay.name!r}")
            fwd = RelayForward(ForwardTarget.TABLE, table=ref, line=line)
        else:
            retry_t = spec.children[-1]
            retry = (
                self.number(retry_t.children[0], "retry", 0, INT_MAX) if retry_t is not None else 0
            )
            if kind == "fwd_address":
                addr, _ = self.address(spec.children[0], "forward")
                port_t = spec.children[1]
                port = self.port(port_t) if port_t is not None else None
                fwd = RelayForward(
                    ForwardTarget.ADDRESS, address=addr, port=port, retry=retry, line=line
                )
            elif kind == "fwd_destination":
                fwd = RelayForward(ForwardTarget.DESTINATION, retry=retry, line=line)
            else:
                fwd = RelayForward(ForwardTarget.NAT_LOOKUP, retry=retry, line=line)
        forwards.append((fwd, tok))
        for extra in extras:
            if extra is None:
                continue
            if extra.data == "fwd_inet":
                relay = replace(relay, inet=True)
            elif extra.data == "fwd_inet6":
                text, akind = self.address(extra.children[0], "inet6 prefix")
                if akind != "ipv6":
                    raise self.error("inet6 needs an IPv6 prefix address", extra.children[0])
                relay = replace(relay, inet6_prefix=text)
            else:
                version = str(extra.children[0])
                if version not in ("v1", "v2"):
                    raise self.error("proxy-protocol must be v1 or v2", extra.children[0])
                relay = replace(relay, proxy_protocol=version)
        return relay

    def keypairs(self, lst: Listen, proto: Protocol, tok: Token, relay: str) -> tuple[Keypair, ...]:
        names = proto.tls.keypairs or (lst.address,)
        out: list[Keypair] = []
        for name in names:
            certs = [
                os.path.join(self.ssl_dir, f"{name}:{lst.port}.crt"),
                os.path.join(self.ssl_dir, f"{name}.crt"),
            ]
            keys = [
                os.path.join(self.ssl_dir, "private", f"{name}:{lst.port}.key"),
                os.path.join(self.ssl_dir, "private", f"{name}.key"),
            ]
            cert = next((p for p in certs if os.path.isfile(p)), None)
            key = next((p for p in keys if os.path.isfile(p)), None)
            if self.check_certs and (cert is None or key is None):
                missing = (
                    f"certificate ({certs[0]} or {certs[1]})"
                    if cert is None
                    else f"key ({keys[0]} or {keys[1]})"
                )
                hint = (
                    ""
                    if proto.tls.keypairs
                    else "; or name one with 'tls keypair NAME' in the relay's protocol"
                )
                raise self.error(
                    f"relay {relay!r}: cannot load certificates for {name} port {lst.port}: "
                    f"no {missing}{hint}",
                    tok,
                )
            out.append(Keypair(name, cert or certs[1], key or keys[1]))
        return tuple(out)

    # -------------------------------------------------------------- redirects

    def stmt_redirect(self, tree: _Node) -> None:
        name_tok, *opts = tree.children
        name = str(name_tok)
        loc = self.loc(name_tok)
        if name in self.redirects:
            first = self.redirects[name]
            raise self.error(
                f"redirection {name!r} defined twice (first at {first.path}:{first.line})",
                name_tok,
            )
        listens: list[RedirectListen] = []
        tables: list[tuple[TableRef, Token]] = []
        route_to = False
        route_if: str | None = None
        fields: dict[str, Any] = {}
        for opt in opts:
            if opt is None:
                continue
            kind = str(opt.data)
            args = opt.children
            if kind == "rdr_listen":
                listens.append(self.redirect_listen(opt))
            elif kind in ("rdr_forward", "rdr_route"):
                is_route = kind == "rdr_route"
                if tables and is_route != route_to:
                    raise self.error(
                        f"redirection {name!r}: 'route to' and 'forward to' cannot be mixed", opt
                    )
                route_to = is_route
                ref, tok = self.tablespec(args[0], f"redirection {name!r}")
                if len(tables) == 2:
                    raise self.error(
                        f"redirection {name!r} has too many tables (one main and one backup)",
                        tok,
                    )
                if is_route:
                    route_if = str(args[1].children[0])
                tables.append((ref, tok))
            elif kind == "rdr_tag":
                fields["tag"] = str(args[2])
                fields["match_tag"] = args[0] is not None
            elif kind == "rdr_sticky":
                fields["sticky_address"] = True
            elif kind == "session_timeout":
                fields["session_timeout"] = self.number(args[0], "session timeout", 0, INT_MAX)
            else:
                fields["disabled"] = True
        if not listens:
            raise self.error(
                f"redirection {name!r} has no virtual address: add 'listen on ADDRESS port N'",
                name_tok,
            )
        if not tables:
            raise self.error(
                f"redirection {name!r} has no table: add 'forward to <table> check ...'", name_tok
            )
        final: list[TableRef] = []
        for ref, tok in tables:
            if ref.mode not in REDIRECT_MODES:
                raise self.error(f"mode {ref.mode} is only for relays, not redirections", tok)
            if ref.check.type is CheckType.NONE:
                raise self.error(
                    f"redirection {name!r}: table <{ref.table}> needs a check "
                    "(add 'check icmp', 'check tcp' or 'check http \"/\" code 200')",
                    tok,
                )
            if ref.port == 0:
                ref = replace(ref, port=listens[0].port)
            final.append(ref)
        if len(final) == 2 and (final[0].mode != final[1].mode or final[0].port != final[1].port):
            raise self.error(
                f"redirection {name!r}: the backup table must use the same mode and port "
                f"as the main table ({final[0].mode}, port {final[0].port})",
                tables[1][1],
            )
        self.redirects[name] = Redirect(
            name,
            tuple(listens),
            final[0],
            final[1] if len(final) > 1 else None,
            route_to=route_to,
            route_interface=route_if,
            path=loc.path,
            line=loc.line,
            **fields,
        )

    def redirect_listen(self, opt: _Node) -> RedirectListen:
        addr_tok, proto_t, port_t, if_t, pflog_t = opt.children
        addr, _ = self.address(addr_tok, "listen")
        ip_proto = "tcp"
        if proto_t is not None:
            ip_proto = str(proto_t.children[0])
            if ip_proto not in ("tcp", "udp"):
                raise self.error(
                    f"unknown protocol {ip_proto!r} (use tcp or udp)", proto_t.children[0]
                )
        port_end: int | None = None
        item = port_t.children[0]
        if isinstance(item, Token) and item.type == "STRING" and ":" in str(item):
            low, _, high = str(item).partition(":")
            try:
                port, port_end = int(low), int(high)
            except ValueError:
                raise self.error("invalid port range: expected LOW:HIGH", item) from None
            if not (1 <= port <= port_end <= 65535):
                raise self.error("invalid port range: expected 1 <= LOW <= HIGH <= 65535", item)
        else:
            port = self.port(port_t)
        return RedirectListen(
            addr,
            port,
            port_end,
            ip_proto,
            interface=str(if_t.children[0]) if if_t is not None else None,
            pflog=pflog_t is not None,
            line=self.loc(addr_tok).line,
        )

    # ------------------------------------------------------------ final checks

    def finish(self) -> None:
        if self.timeout >= self.interval * 1000:
            raise self.error(
                f"global timeout {self.timeout} ms exceeds the interval of {self.interval} s "
                "(the check timeout is in milliseconds and must be below the interval)",
                self.timing_loc,
            )
        for ref, loc in self.table_refs:
            if ref.interval % self.interval or ref.interval < self.interval:
                raise self.error(
                    f"table <{ref.table}>: interval {ref.interval} must be a multiple of "
                    f"the global interval {self.interval}",
                    loc,
                )
            if ref.timeout >= ref.interval * 1000:
                raise self.error(
                    f"table <{ref.table}>: timeout {ref.timeout} ms exceeds its interval "
                    f"of {ref.interval} s",
                    loc,
                )
        hosts = {h.id: h for t in self.tables.values() for h in t.hosts}
        for host in hosts.values():
            if host.parent is None:
                continue
            parent = hosts.get(host.parent)
            where = Loc(host.path, host.line, 0)
            if parent is None or parent.id == host.id:
                raise self.error(
                    f"host {host.name}: parent id {host.parent} is not another host "
                    f"(host ids run from 1 to {len(hosts)} in file order)",
                    where,
                )
            if parent.parent is not None:
                raise self.error(
                    f"host {host.name}: parent {parent.name} (id {parent.id}) has a parent itself",
                    where,
                )
        for relay in self.relays.values():
            proto = self.protocols.get(relay.protocol)
            if proto is None:
                continue
            listed = {t.table for t in relay.tables}
            for rule in proto.rules:
                if rule.forward_to is not None and rule.forward_to not in listed:
                    raise ConfigError(
                        f"relay {relay.name!r}: protocol {proto.name!r} forwards to "
                        f"<{rule.forward_to}>, which the relay does not use; add "
                        f"'forward to <{rule.forward_to}>' to the relay",
                        path=relay.path,
                        line=relay.line,
                    )
        for table in self.tables.values():
            if table.name not in self.used_tables:
                self.warnings.append(f"{table.path}:{table.line}: unused table: {table.name}")
        for proto in self.protocols.values():
            if proto.name not in self.used_protocols:
                self.warnings.append(f"{proto.path}:{proto.line}: unused protocol: {proto.name}")


# ------------------------------------------------------------------ public API


def parse_relayd_config(
    text: str,
    path: str = DEFAULT_CONFIG_PATH,
    macros: dict[str, str] | None = None,
    base_dir: str | None = None,
    *,
    check_certs: bool = True,
) -> RelaydConfig:
    """Parse relayd.conf ``text`` (read from ``path``, which names it in messages
    and anchors relative ``include`` names).

    ``macros`` are ``relayd -D name=value`` macros: they win over definitions
    in the file.  ``base_dir`` is where TLS certificates are looked up
    (relayd's ``/etc/ssl``: ``NAME[:PORT].crt``, keys in ``private/NAME[:PORT].key``);
    ``check_certs=False`` skips the existence check (the daemon loads them later).
    """
    lexed = tokenize(text, path, macros=macros, read_file=read_config_text)
    tree, locs = parse_tokens(lexed.tokens, path)
    builder = _Builder(path, lexed.tokens, locs, base_dir or DEFAULT_SSL_DIR, check_certs)
    builder.build(tree)
    builder.finish()
    for name in sorted(set(lexed.macros) - lexed.used - set(macros or {})):
        builder.warnings.append(f"macro '{name}' not used")
    return RelaydConfig(
        path=path,
        interval=builder.interval,
        timeout=builder.timeout,
        prefork=builder.prefork,
        log=builder.log,
        agentx=builder.agentx,
        socket=builder.socket,
        tables=tuple(builder.tables.values()),
        protocols=tuple(builder.protocols.values()),
        relays=tuple(builder.relays.values()),
        redirects=tuple(builder.redirects.values()),
        macros=tuple(sorted(lexed.macros.items())),
        warnings=tuple(builder.warnings),
    )


def load_relayd_config(
    path: str = DEFAULT_CONFIG_PATH,
    macros: dict[str, str] | None = None,
    base_dir: str | None = None,
    *,
    check_certs: bool = True,
) -> RelaydConfig:
    """Read and parse the relayd.conf at ``path`` (see :func:`parse_relayd_config`)."""
    return parse_relayd_config(
        read_config_text(path), path, macros, base_dir, check_certs=check_certs
    )
