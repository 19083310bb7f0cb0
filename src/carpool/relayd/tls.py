"""TLS for relays: the server context of a ``listen on ... tls`` and the client context of
``forward with tls``, from the protocol's ``tls`` options (stdlib ``ssl``).

Keypairs follow relayd: ``tls keypair NAME`` (repeatable; the first is the
default, the others are chosen by SNI when the client asks for NAME), else the
listen address; files ``<ssl dir>/NAME[:PORT].crt`` and
``<ssl dir>/private/NAME[:PORT].key``, resolved by the configuration layer.
"""

from __future__ import annotations

import ssl

from carpool.errors import ConfigError
from carpool.relayd.model import Keypair, Listen, TlsOptions

_VERSIONS = {"tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3}


def _versions(context: ssl.SSLContext, options: TlsOptions, where: str) -> None:
    enabled = sorted(_VERSIONS[p] for p in options.protocols if p in _VERSIONS)
    if not enabled:
        raise ConfigError(f"{where}: no TLS version left enabled; allow tlsv1.2 or tlsv1.3")
    context.minimum_version = enabled[0]
    context.maximum_version = enabled[-1]


def _load(context: ssl.SSLContext, keypair: Keypair, where: str) -> None:
    try:
        context.load_cert_chain(keypair.cert, keypair.key)
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(
            f"{where}: cannot load keypair {keypair.name} ({keypair.cert}, {keypair.key}): "
            f"{getattr(error, 'strerror', None) or error}; check that the files exist and match"
        ) from None


def _server_context(options: TlsOptions, keypair: Keypair, where: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _versions(context, options, where)
    try:
        context.set_ciphers(options.ciphers)
    except ssl.SSLError:
        raise ConfigError(f"{where}: no usable cipher in {options.ciphers!r}") from None
    if options.session_tickets:
        context.num_tickets = 2
    else:
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
    if options.cipher_server_preference:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    if not options.client_renegotiation:
        context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    if options.ecdhe not in ("default", "auto") and ":" not in options.ecdhe \
            and "," not in options.ecdhe:
        try:
            context.set_ecdh_curve(options.ecdhe)
        except (ValueError, ssl.SSLError):
            raise ConfigError(f"{where}: unknown ecdhe curve {options.ecdhe!r}") from None
    if options.client_ca is not None:
        try:
            context.load_verify_locations(options.client_ca)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"{where}: cannot load client ca {options.client_ca}: {error}"
                              ) from None  # fmt: skip
        context.verify_mode = ssl.CERT_REQUIRED
    _load(context, keypair, where)
    return context


def server_context(listen: Listen, options: TlsOptions, relay: str) -> ssl.SSLContext:
    """The SSLContext of a TLS listener; several keypairs are told apart by SNI."""
    where = f'relay "{relay}" listen on {listen.address} port {listen.port}'
    if not listen.keypairs:
        raise ConfigError(f"{where}: no keypair to serve TLS with")
    contexts = [_server_context(options, kp, where) for kp in listen.keypairs]
    default = contexts[0]
    if len(contexts) > 1:
        by_name = {kp.name.lower(): c for kp, c in zip(listen.keypairs, contexts, strict=True)}

        def choose(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
            chosen = by_name.get((name or "").lower())
            if chosen is not None:
                sock.context = chosen

        default.sni_callback = choose
    return default


def client_context(options: TlsOptions, relay: str) -> ssl.SSLContext:
    """``forward with tls``: verify the backend with ``ca file`` when one is given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    _versions(context, options, f'relay "{relay}"')
    context.check_hostname = False
    if options.ca_file is not None:
        try:
            context.load_verify_locations(options.ca_file)
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f'relay "{relay}": cannot load ca file {options.ca_file}: {error}'
                              ) from None  # fmt: skip
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
