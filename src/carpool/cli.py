"""The ``carpool`` command: the lab and other project-wide tools."""

from __future__ import annotations

import argparse
import sys

from carpool import __version__, status, supervisor
from carpool.errors import CarpoolError
from carpool.lab import cli as lab_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carpool", description="The FreeBSD high-availability stack for Linux."
    )
    parser.add_argument("--version", action="version", version=f"carpool {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    lab_cli.add_parser(subparsers)
    supervisor.add_parser(subparsers)
    status.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    try:
        if arguments.command == "lab":
            return lab_cli.run(arguments)
        if arguments.command == "supervise":
            return supervisor.run(arguments)
        if arguments.command == "status":
            return status.run(arguments)
    except CarpoolError as error:
        print(f"carpool: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
