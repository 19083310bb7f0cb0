"""Automation over carpool's events: devd.conf rules and ifstated.conf state machines.

* :mod:`carpool.devd.devdconf` — devd.conf(5) parsing, rule matching, action expansion.
* :mod:`carpool.devd.ifstatedconf` — ifstated.conf(5) parsing into a frozen AST.
* :mod:`carpool.devd.ifstated_machine` — the sans-I/O ifstated state machine.
"""

from carpool.devd.devdconf import (
    DevdConfig,
    DevdRule,
    Match,
    expand_action,
    load_devd_config,
    parse_devd_config,
)
from carpool.devd.ifstated_machine import (
    CancelExternal,
    IfstatedMachine,
    LoopDetected,
    MachineAction,
    RunCommand,
    ScheduleExternal,
    StateEntered,
)
from carpool.devd.ifstatedconf import (
    IfstatedConfig,
    load_ifstated_config,
    parse_ifstated_config,
)

__all__ = [
    "CancelExternal",
    "DevdConfig",
    "DevdRule",
    "IfstatedConfig",
    "IfstatedMachine",
    "LoopDetected",
    "MachineAction",
    "Match",
    "RunCommand",
    "ScheduleExternal",
    "StateEntered",
    "expand_action",
    "load_devd_config",
    "load_ifstated_config",
    "parse_devd_config",
    "parse_ifstated_config",
]
