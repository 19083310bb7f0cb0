"""relayd: relays, redirections, tables and health checks from relayd.conf.

So far the configuration layer: :func:`parse_relayd_config` and
:func:`load_relayd_config` return a :class:`RelaydConfig`; :func:`render_relayd_config`
prints one back in relayd.conf form (``relayd -nv``).
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
