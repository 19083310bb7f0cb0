"""relayd: relays, redirections, tables and health checks from relayd.conf.

Configuration: :func:`parse_relayd_config` and :func:`load_relayd_config` return a
:class:`RelaydConfig`; :func:`render_relayd_config` prints one back in relayd.conf
form (``relayd -nv``).  Health: ``health`` (states) and ``checks`` (the checks).
Data path: ``relay`` (listeners, TCP sessions), ``http_relay`` (HTTP sessions,
with ``http`` and ``http_fast`` for messages and rules), ``tls`` and
``proxy_protocol``.  Redirects: ``redirect`` (nftables).  ``daemon`` runs it all;
``ctl`` is relayctl.
"""

from carpool.relayd.config import DEFAULT_CONFIG_PATH, load_relayd_config, parse_relayd_config
from carpool.relayd.model import RelaydConfig
from carpool.relayd.render import render_relayd_config

__all__ = [
    "DEFAULT_CONFIG_PATH",
    "RelaydConfig",
    "load_relayd_config",
    "parse_relayd_config",
    "render_relayd_config",
]
