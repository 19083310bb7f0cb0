"""A :class:`~carpool.relayd.model.RelaydConfig` printed back as relayd.conf (``relayd -nv``).

The output is canonical: macros are expanded, every statement is on its own
line, strings are quoted, and options equal to their defaults are left out
except the global ``interval``, ``timeout`` and ``prefork``.  Parsing the
output gives the same configuration again (the unit tests check this).
"""

from __future__ import annotations

import ipaddress

from carpool.relayd.model import (
    DEFAULT_CIPHERS,
    Check,
    CheckType,
    ForwardTarget,
    KeyField,
    KeyValue,
    Protocol,
    Redirect,
    Relay,
    RelaydConfig,
    Rule,
    Table,
    TableRef,
    TcpOptions,
    TlsOptions,
)

__all__ = ["render_relayd_config"]


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _addr(text: str) -> str:
    try:
        ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return _q(text)
    return text


def _check(check: Check) -> str:
    t = check.type
    if t in (CheckType.ICMP, CheckType.TCP, CheckType.TLS):
        return f" check {t}"
    if t is CheckType.SCRIPT:
        return f" check script {_q(check.path)}"
    if t in (CheckType.HTTP, CheckType.HTTPS):
        out = f" check {t} {_q(check.path)}"
        if check.host is not None:
            out += f" host {_q(check.host)}"
        if check.digest is not None:
            return out + f" digest {_q(check.digest)}"
        return out + f" code {check.code}"
    tls = " tls" if check.tls else ""
    if t is CheckType.BINARY:
        return f" check binary send {_q(check.send or '')} expect {_q(check.expect or '')}{tls}"
    send = _q(check.send) if check.send else "nothing"
    return f" check send {send} expect {_q(check.expect or '')}{tls}"


def _tablespec(ref: TableRef, cfg: RelaydConfig) -> str:
    out = f"<{ref.table}> port {ref.port}"
    if ref.mode != "roundrobin" or ref.mode_key is not None:
        out += f" mode {ref.mode}"
        if ref.mode_key is not None:
            out += f" {_q(ref.mode_key)}"
    if ref.check.type is not CheckType.NONE:
        out += _check(ref.check)
    if ref.timeout != cfg.timeout:
        out += f" timeout {ref.timeout}"
    if ref.interval != cfg.interval:
        out += f" interval {ref.interval}"
    if ref.demote is not None:
        out += f" demote {ref.demote}"
    return out


def _table(table: Table) -> list[str]:
    head = f"table <{table.name}>" + (" disable" if table.disabled else "")
    if not table.hosts:
        return [head]
    lines = [head + " {"]
    for host in table.hosts:
        line = "\t" + _addr(host.name)
        if host.retry:
            line += f" retry {host.retry}"
        if host.parent is not None:
            line += f" parent {host.parent}"
        if host.priority is not None:
            line += f" priority {host.priority}"
        if host.ip_ttl is not None:
            line += f" ip ttl {host.ip_ttl}"
        lines.append(line)
    return [*lines, "}"]


def _tcp(tcp: TcpOptions) -> list[str]:
    default = TcpOptions()
    opts: list[str] = []
    for flag in ("nodelay", "sack", "splice"):
        value = getattr(tcp, flag)
        if value != getattr(default, flag):
            opts.append(flag if value else f"no {flag}")
    if tcp.backlog != default.backlog:
        opts.append(f"backlog {tcp.backlog}")
    if tcp.socket_buffer is not None:
        opts.append(f"socket buffer {tcp.socket_buffer}")
    if tcp.ip_ttl is not None:
        opts.append(f"ip ttl {tcp.ip_ttl}")
    if tcp.ip_minttl is not None:
        opts.append(f"ip minttl {tcp.ip_minttl}")
    return opts


def _tls(tls: TlsOptions) -> list[str]:
    default = TlsOptions()
    opts: list[str] = []
    if tls.ciphers != DEFAULT_CIPHERS:
        opts.append(f"ciphers {_q(tls.ciphers)}")
    for version in ("tlsv1.2", "tlsv1.3"):
        if version not in tls.protocols:
            opts.append(f"no {version}")
    if tls.session_tickets:
        opts.append("session tickets")
    if tls.ecdhe != default.ecdhe:
        opts.append(f"ecdhe {_q(tls.ecdhe)}")
    if tls.edh_params != "none":
        opts.append(f"edh params {tls.edh_params}")
    if not tls.cipher_server_preference:
        opts.append("no cipher-server-preference")
    if tls.client_renegotiation:
        opts.append("client-renegotiation")
    for name, value in (("ca file", tls.ca_file), ("ca cert", tls.ca_cert)):
        if value is not None:
            opts.append(f"{name} {_q(value)}")
    if tls.ca_key is not None:
        opts.append(f"ca key {_q(tls.ca_key)} password {_q(tls.ca_key_password or '')}")
    if tls.client_ca is not None:
        opts.append(f"client ca {_q(tls.client_ca)}")
    opts.extend(f"keypair {_q(name)}" for name in tls.keypairs)
    return opts


def _kv(kv: KeyValue) -> str:
    if kv.field is KeyField.FILE:
        out = f" file {_q(kv.key or '')}"
    else:
        out = f" {kv.field}"
        if kv.action != "none":
            out += f" {kv.action}"
        if kv.digest:
            out += " digest"
        if kv.key is not None:
            out += f" {_q(kv.key)}"
    if kv.value is not None:
        out += f" value {_q(kv.value)}"
    return out


def _rule(rule: Rule) -> str:
    out = f"{rule.action} {rule.direction}"
    if rule.quick:
        out += " quick"
    if rule.family is not None:
        out += f" {rule.family}"
    if rule.source is not None:
        out += f" from {rule.source}"
    if rule.destination is not None:
        out += f" to {rule.destination}"
    if rule.method is not None:
        out += f" method {rule.method}"
    out += "".join(_kv(kv) for kv in rule.keys)
    if rule.path_strip is not None:
        out += f" path strip {rule.path_strip}"
    if rule.forward_to is not None:
        out += f" forward to <{rule.forward_to}>"
    if rule.tag is not None:
        out += f" tag {_q(rule.tag)}"
    if rule.untag:
        out += " no tag"
    if rule.tagged is not None:
        out += f" tagged {_q(rule.tagged)}"
    if rule.label is not None:
        out += f" label {_q(rule.label)}"
    if rule.unlabel:
        out += " no label"
    return out


def _protocol(proto: Protocol) -> list[str]:
    lines = [f"{proto.type} protocol {_q(proto.name)} {{"]
    tcp = _tcp(proto.tcp)
    if tcp:
        lines.append("\ttcp { " + ", ".join(tcp) + " }")
    tls = _tls(proto.tls)
    if tls:
        lines.append("\ttls { " + ", ".join(tls) + " }")
    http: list[str] = []
    if proto.http.headerlen != 8192:
        http.append(f"headerlen {proto.http.headerlen}")
    if proto.http.websockets:
        http.append("websockets")
    if http:
        lines.append("\thttp { " + ", ".join(http) + " }")
    if proto.return_error:
        style = proto.return_error_style
        lines.append("\treturn error" + (f" style {_q(style)}" if style is not None else ""))
    lines.extend("\t" + _rule(rule) for rule in proto.rules)
    return [*lines, "}"]


def _relay(relay: Relay, cfg: RelaydConfig) -> list[str]:
    lines = [f"relay {_q(relay.name)} {{"]
    for lst in relay.listen:
        lines.append(
            f"\tlisten on {_addr(lst.address)} port {lst.port}" + (" tls" if lst.tls else "")
        )
    if relay.protocol != "default":
        lines.append(f"\tprotocol {_q(relay.protocol)}")
    for i, fwd in enumerate(relay.forwards):
        line = "\t"
        if i == 0 and relay.transparent:
            line += "transparent "
        line += "forward "
        if i == 0 and relay.forward_tls:
            line += "with tls "
        line += "to "
        if fwd.target is ForwardTarget.TABLE and fwd.table is not None:
            line += _tablespec(fwd.table, cfg)
        else:
            if fwd.target is ForwardTarget.ADDRESS:
                line += _addr(fwd.address or "")
                if fwd.port is not None:
                    line += f" port {fwd.port}"
            else:
                line += str(fwd.target)
            if fwd.retry:
                line += f" retry {fwd.retry}"
        if i == 0:
            if relay.inet:
                line += " inet"
            if relay.inet6_prefix is not None:
                line += f" inet6 {relay.inet6_prefix}"
            if relay.proxy_protocol is not None:
                line += f" proxy-protocol {relay.proxy_protocol}"
        lines.append(line)
    if relay.session_timeout != 600:
        lines.append(f"\tsession timeout {relay.session_timeout}")
    if relay.disabled:
        lines.append("\tdisable")
    return [*lines, "}"]


def _redirect(rdr: Redirect, cfg: RelaydConfig) -> list[str]:
    lines = [f"redirect {_q(rdr.name)} {{"]
    for lst in rdr.listen:
        line = f"\tlisten on {_addr(lst.address)}"
        if lst.ip_proto != "tcp":
            line += f" {lst.ip_proto}"
        line += f" port {lst.port}"
        if lst.port_end is not None:
            line += f":{lst.port_end}"
        if lst.interface is not None:
            line += f" interface {_q(lst.interface)}"
        if lst.pflog:
            line += " pflog"
        lines.append(line)
    verb = "route" if rdr.route_to else "forward"
    suffix = f" interface {_q(rdr.route_interface or '')}" if rdr.route_to else ""
    for ref in (rdr.table, rdr.backup):
        if ref is not None:
            lines.append(f"\t{verb} to {_tablespec(ref, cfg)}{suffix}")
    if rdr.sticky_address:
        lines.append("\tsticky-address")
    if rdr.tag is not None:
        lines.append(("\tmatch " if rdr.match_tag else "\t") + f"pftag {_q(rdr.tag)}")
    if rdr.session_timeout != 600:
        lines.append(f"\tsession timeout {rdr.session_timeout}")
    if rdr.disabled:
        lines.append("\tdisable")
    return [*lines, "}"]


def render_relayd_config(cfg: RelaydConfig) -> str:
    """``cfg`` as relayd.conf text that parses back to the same configuration."""
    lines = [
        f"# {cfg.path}, as carpool reads it",
        f"interval {cfg.interval}",
        f"timeout {cfg.timeout}",
        f"prefork {cfg.prefork}",
    ]
    log = cfg.log
    for on, words in (
        (log.state_changes, "state changes"),
        (log.host_checks, "host checks"),
        (log.connection, "connection"),
        (log.connection_errors, "connection errors"),
    ):
        if on:
            lines.append(f"log {words}")
    if cfg.agentx is not None:
        ctx = f" context {_q(cfg.agentx.context)}" if cfg.agentx.context is not None else ""
        lines.append(f"agentx{ctx} path {_q(cfg.agentx.path)}")
    if cfg.socket is not None:
        lines.append(f"socket {_q(cfg.socket)}")
    for table in cfg.tables:
        lines += ["", *_table(table)]
    for proto in cfg.protocols:
        lines += ["", *_protocol(proto)]
    for relay in cfg.relays:
        lines += ["", *_relay(relay, cfg)]
    for rdr in cfg.redirects:
        lines += ["", *_redirect(rdr, cfg)]
    return "\n".join(lines) + "\n"
