"""Error types shared by every carpool component.

A ``CarpoolError`` is an error meant for the user: its message says what is
wrong and what to do, and the command-line entry points print it on one line
without a traceback.
"""

from __future__ import annotations


class CarpoolError(Exception):
    """An error whose message is fit to show the user as it is."""


class ProtocolError(CarpoolError):
    """Bytes from the network that do not form a valid message.

    Each component subclasses it; ``stat`` names the counter the daemon
    increments when it drops such a message.
    """

    stat: str = "bad_packets"


class ConfigError(CarpoolError):
    """A configuration file that cannot be used, pointing at file:line:column."""

    def __init__(
        self,
        message: str,
        *,
        path: str = "<config>",
        line: int = 0,
        column: int = 0,
        token: str | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.column = column
        self.token = token
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path
        if self.line:
            where += f":{self.line}"
            if self.column:
                where += f":{self.column}"
        near = f" (near {self.token!r})" if self.token else ""
        return f"{where}: {self.message}{near}"


class CommandError(CarpoolError):
    """A refused control command (unknown vhid, bad value, wrong state...)."""
