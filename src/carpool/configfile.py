"""Reading configuration files, with errors that name the file and say what is wrong."""

from __future__ import annotations

from carpool.errors import ConfigError


def read_config_text(path: str) -> str:
    """The text of the configuration file at ``path``; ConfigError if unreadable or not UTF-8."""
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read the file: {exc.strerror or exc}", path=path) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"the file is not UTF-8 text ({exc.reason})", path=path) from exc
