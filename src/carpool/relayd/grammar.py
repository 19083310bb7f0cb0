"""relayd.conf's grammar (OpenBSD parse.y, relayd.conf(5)) as a lark LALR grammar.

The tokens come from :mod:`carpool.relayd.lexer` (macros and includes are
already resolved there); this module turns them into a lark parse tree and
turns lark's syntax errors into ``file:line:column: syntax error`` messages
that say what was found and what could have come instead.  Building the
dataclasses from the tree is :mod:`carpool.relayd.config`'s job.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cache
from typing import Any

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.lexer import Lexer, LexerState

from carpool.errors import ConfigError
from carpool.relayd.lexer import Loc, Tok

__all__ = ["GRAMMAR", "parse_tokens"]

GRAMMAR = r"""
start: _stmt*
_stmt: macro | interval | timeout | prefork | log | agentx | socket
     | table | redirect | relay | protocol | router

macro: STRING "=" (STRING | NUMBER)
interval: "interval" NUMBER
timeout: "timeout" NUMBER
prefork: "prefork" NUMBER
log: "log" log_what
!log_what: "state" "changes" | "host" "checks" | "connection" ["errors"] | "updates" | "all"
agentx: "agentx" agentx_opt*
agentx_opt: "context" STRING  -> agentx_context
          | "path" STRING     -> agentx_path
socket: "socket" STRING

// ---------------------------------------------------------------- tables
table: "table" "<" STRING ">" table_body+
?table_body: "disable"                  -> table_disable
           | "{" (host ","?)+ "}"      -> table_hosts
host: host_addr host_opt*
host_addr: STRING | NUMBER
host_opt: "retry" NUMBER                -> host_retry
        | "parent" NUMBER               -> host_parent
        | "priority" NUMBER             -> host_priority
        | "ip" "ttl" NUMBER             -> host_ttl

tablespec: "<" STRING ">" tablespec_opt*
tablespec_opt: "port" port              -> ts_port
             | "check" check            -> ts_check
             | "timeout" NUMBER         -> ts_timeout
             | "interval" NUMBER        -> ts_interval
             | "demote" STRING          -> ts_demote
             | "mode" mode_name [STRING] -> ts_mode
!mode_name: "roundrobin" | "random" | "least-states" | "source-hash" | "loadbalance" | "hash"

port: NUMBER | STRING | port_kw
!port_kw: "http" | "https"

check: "icmp"                                        -> check_icmp
     | "tcp"                                         -> check_tcp
     | "tls"                                         -> check_tls
     | "http" STRING [check_host] check_result       -> check_http
     | "https" STRING [check_host] check_result      -> check_https
     | "send" send_data "expect" STRING [tls_flag]   -> check_send
     | "binary" "send" STRING "expect" STRING [tls_flag] -> check_binary
     | "script" STRING                               -> check_script
send_data: STRING | nothing
nothing: "nothing"
check_host: "host" STRING
check_result: "code" NUMBER                          -> check_code
            | "digest" (STRING | NUMBER)             -> check_digest
tls_flag: "tls"

// ------------------------------------------------------------- redirects
redirect: "redirect" STRING "{" rdr_opt* "}"
rdr_opt: "listen" "on" STRING [ip_proto] "port" port [interface] [pflog] -> rdr_listen
       | "forward" "to" tablespec                      -> rdr_forward
       | "route" "to" tablespec interface              -> rdr_route
       | [match_kw] tag_kw STRING                      -> rdr_tag
       | "sticky-address"                              -> rdr_sticky
       | "session" "timeout" NUMBER                    -> session_timeout
       | "disable"                                     -> disable
!ip_proto: "tcp" | STRING
interface: "interface" STRING
pflog: "pflog"
match_kw: "match"
!tag_kw: "pftag" | "tag"

// ---------------------------------------------------------------- relays
relay: "relay" STRING "{" relay_opt* "}"
relay_opt: "listen" "on" STRING "port" port [tls_flag]                  -> relay_listen
         | [transparent] "forward" [with_tls] "to" fwdspec fwd_extra*  -> relay_forward
         | "protocol" STRING                                           -> relay_protocol
         | "session" "timeout" NUMBER                                  -> session_timeout
         | "disable"                                                   -> disable
transparent: "transparent"
with_tls: "with" "tls"
fwdspec: tablespec                                   -> fwd_table
       | STRING ["port" port] [retry]                -> fwd_address
       | "destination" [retry]                       -> fwd_destination
       | "nat" "lookup" [retry]                      -> fwd_natlookup
retry: "retry" NUMBER
fwd_extra: "inet"                                    -> fwd_inet
         | "inet6" STRING                            -> fwd_inet6
         | "proxy-protocol" STRING                   -> fwd_proxy_protocol

// ------------------------------------------------------------- protocols
protocol: [proto_type] "protocol" STRING ["{" proto_opt* "}"]
!proto_type: "tcp" | "http" | "dns"
?proto_opt: "tcp" tcp_opt                             -> p_tcp
          | "tcp" "{" (tcp_opt ","?)* "}"             -> p_tcp
          | "tls" tls_opt                             -> p_tls
          | "tls" "{" (tls_opt ","?)* "}"             -> p_tls
          | "http" http_opt                           -> p_http
          | "http" "{" (http_opt ","?)* "}"           -> p_http
          | "return" "error" [return_style]           -> p_return
          | "return" "error" "{" return_style "}"     -> p_return
          | filter_rule
return_style: "style" STRING
no: "no"
tcp_opt: [no] "nodelay"                       -> tcp_nodelay
       | [no] "sack"                          -> tcp_sack
       | [no] "splice"                        -> tcp_splice
       | "backlog" NUMBER                     -> tcp_backlog
       | "socket" "buffer" NUMBER             -> tcp_socket_buffer
       | "ip" "ttl" NUMBER                    -> tcp_ip_ttl
       | "ip" "minttl" NUMBER                 -> tcp_ip_minttl
tls_opt: [no] "session" "tickets"             -> tls_tickets
       | "ciphers" STRING                     -> tls_ciphers
       | "ecdhe" STRING                       -> tls_ecdhe
       | [no] "edh"                           -> tls_edh
       | "edh" "params" STRING                -> tls_edh_params
       | "ca" "file" STRING                   -> tls_ca_file
       | "ca" "cert" STRING                   -> tls_ca_cert
       | "ca" "key" STRING "password" STRING  -> tls_ca_key
       | "client" "ca" STRING                 -> tls_client_ca
       | "keypair" STRING                     -> tls_keypair
       | [no] STRING                          -> tls_flag_opt
http_opt: "headerlen" NUMBER                  -> http_headerlen
        | [no] "websockets"                   -> http_websockets

filter_rule: rule_action [rule_dir] [quick] [family] [rule_from] [rule_to] rule_opt*
!rule_action: "pass" | "block" | "match"
!rule_dir: "request" | "response"
quick: "quick"
!family: "inet" | "inet6"
rule_from: "from" addr_mask
rule_to: "to" addr_mask
addr_mask: STRING ["/" NUMBER]
rule_opt: "method" STRING                                  -> r_method
        | kv_field [key_action] [digest] [STRING] [value]  -> r_kv
        | "file" STRING [value]                            -> r_file
        | "path" "strip" NUMBER                            -> r_path_strip
        | "forward" "to" "<" STRING ">"                    -> r_forward
        | "tag" STRING                                     -> r_tag
        | "no" "tag"                                       -> r_untag
        | "tagged" STRING                                  -> r_tagged
        | "label" STRING                                   -> r_label
        | "no" "label"                                     -> r_unlabel
!kv_field: "cookie" | "header" | "path" | "query" | "url"
!key_action: "append" | "set" | "remove" | "hash" | "log"
digest: "digest"
value: "value" STRING

// --------------------------------------------------------------- routers
router: "router" STRING "{" router_opt* "}"
router_opt: "route" STRING "/" NUMBER
          | "forward" "to" tablespec
          | "rtable" NUMBER
          | "rtlabel" STRING
          | "disable"

%declare STRING NUMBER
"""


class _TokenList(Lexer):
    """lark's side of the hand-written lexer: hands over tokens made in advance."""

    __future_interface__ = 2

    def __init__(self, lexer_conf: Any) -> None:
        pass

    def lex(self, lexer_state: LexerState, parser_state: Any) -> Iterator[Token]:
        data: Any = lexer_state.text
        yield from data.tokens


class _Feed:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens


@cache
def _parser() -> tuple[Lark, dict[str, str], dict[str, str]]:
    lark = Lark(
        GRAMMAR, parser="lalr", lexer=_TokenList, maybe_placeholders=True, propagate_positions=True
    )
    by_text: dict[str, str] = {}
    for term in lark.terminals:
        if term.pattern.type == "str":
            by_text[term.pattern.value] = term.name
    by_name = {name: text for text, name in by_text.items()}
    return lark, by_text, by_name


def _describe(name: str, by_name: dict[str, str]) -> str:
    if name in by_name:
        return repr(by_name[name])
    if name == "STRING":
        return "a string"
    if name == "NUMBER":
        return "a number"
    if name == "$END":
        return "end of file"
    return name


def parse_tokens(tokens: list[Tok], path: str) -> tuple[Tree[Token], list[Loc]]:
    """The parse tree of ``tokens``; every Token's ``start_pos`` indexes the returned locations."""
    lark, by_text, by_name = _parser()
    feed: list[Token] = []
    locs: list[Loc] = []
    for i, tok in enumerate(tokens):
        if tok.kind in ("STRING", "NUMBER"):
            kind = tok.kind
        else:
            kind = by_text.get(tok.text, "")
            if not kind:
                raise ConfigError(
                    f"syntax error: {tok.text!r} is not expected anywhere here",
                    path=tok.loc.path,
                    line=tok.loc.line,
                    column=tok.loc.column,
                    token=tok.text,
                )
        feed.append(Token(kind, tok.text, start_pos=i, line=tok.loc.line, column=tok.loc.column))
        locs.append(tok.loc)
    try:
        tree = lark.parse(_Feed(feed))  # type: ignore[arg-type,unused-ignore]
    except UnexpectedToken as exc:
        expected = sorted(_describe(n, by_name) for n in exc.accepts or exc.expected)
        hint = ""
        if expected:
            shown = ", ".join(expected[:8]) + (", ..." if len(expected) > 8 else "")
            hint = f"; expected {shown}"
        if exc.token.type == "$END":
            last = locs[-1] if locs else Loc(path, 1, 1)
            raise ConfigError(
                f"syntax error: unexpected end of file (missing '}}'?){hint}",
                path=last.path,
                line=last.line,
                column=last.column,
            ) from None
        loc = locs[exc.token.start_pos or 0]
        what = "keyword" if exc.token.type in by_name else "word"
        if exc.token.type == "NUMBER":
            what = "number"
        if exc.token.type in by_name and not by_name[exc.token.type].isalpha():
            what = "character"
        raise ConfigError(
            f"syntax error: unexpected {what} {str(exc.token)!r}{hint}",
            path=loc.path,
            line=loc.line,
            column=loc.column,
            token=str(exc.token),
        ) from None
    except UnexpectedEOF as exc:
        last = locs[-1] if locs else Loc(path, 1, 1)
        expected = sorted(_describe(n, by_name) for n in exc.expected)
        raise ConfigError(
            "syntax error: unexpected end of file; expected " + ", ".join(expected[:8]),
            path=last.path,
            line=last.line,
            column=last.column,
        ) from None
    except UnexpectedInput as exc:  # pragma: no cover - other lark input errors
        raise ConfigError(f"syntax error: {exc}", path=path) from None
    return tree, locs
