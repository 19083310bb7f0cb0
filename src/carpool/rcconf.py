"""Parser for rc.conf-style files: ``NAME="value"`` lines as FreeBSD's sh reads them.

This module owns the *syntax* of ``/etc/carpool/rc.conf``: comments, quoting,
the optional ``sysrc``/``sysctl`` command word the guide writes in front of its
lines, and the position of every value so that callers can point at the exact
column of a bad token.  It knows nothing about what the names mean; carpd
(``carpool.carp.config``) and pfsyncd read the assignments they care about and
ignore the rest.

Accepted, one or more assignments per line::

    ifconfig_em0="inet 10.0.0.1 netmask 255.255.255.0"
    sysrc ifconfig_em0_alias0="vhid 1 advskew 0 pass secretpass alias 10.0.0.100/32"
    net.inet.carp.preempt=1            # sysctl.conf style, with a comment
    pfsync_syncdev='em1' pfsync_enable=YES

Quoting follows sh: ``'...'`` is literal, ``"..."`` honours the backslash
escapes ``\\" \\\\ \\$ \\```, an unquoted backslash quotes the next character, and
``#`` starts a comment only at the start of a word.  What sh would *expand*
(``$var``, ``$(cmd)``, backticks) or treat as a command (``;``, ``|``, ``&``,
redirections) is refused with a :class:`~carpool.errors.ConfigError`, because
carpd cannot honour it and silently taking it literally would be worse.

Assigning the same name twice is legal; like sh, the last assignment wins.
:func:`parse_rcconf` keeps every assignment in file order (callers may want to
warn), :func:`effective_assignments` returns the winners.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from carpool.configfile import read_config_text
from carpool.errors import ConfigError

__all__ = [
    "COMMAND_WORDS",
    "RcAssignment",
    "effective_assignments",
    "load_rcconf",
    "parse_rcconf",
]

#: Command words that may precede the assignments of a line and are skipped.
COMMAND_WORDS = frozenset({"sysrc", "sysctl"})

# An sh variable name, or a sysctl name (dot-separated components).
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_%-]+)*")
_BLANK = " \t"
_SHELL_OPERATORS = ";|&<>()"


@dataclass(frozen=True, slots=True)
class RcAssignment:
    """One ``name=value`` assignment with the place it came from.

    ``column`` is the 1-based column of the first character of the value (the
    opening quote when the value is quoted).  ``value_columns[i]`` is the
    column of the source character that produced ``value[i]``, so that a
    caller can report the exact column of a token inside the value.
    """

    name: str
    value: str
    path: str
    line: int
    column: int
    name_column: int = 1
    value_columns: tuple[int, ...] = field(default=(), repr=False, compare=False)

    def column_of(self, offset: int) -> int:
        """Source column of the character at ``offset`` in :attr:`value`."""
        if 0 <= offset < len(self.value_columns):
            return self.value_columns[offset]
        if self.value_columns:
            return self.value_columns[-1] + 1
        return self.column

    def error(
        self, message: str, *, offset: int | None = None, token: str | None = None
    ) -> ConfigError:
        """A :class:`ConfigError` pointing into this assignment's value.

        With ``offset`` the column is that of the value character at ``offset``;
        without it, the column of the value itself.
        """
        column = self.column if offset is None else self.column_of(offset)
        return ConfigError(message, path=self.path, line=self.line, column=column, token=token)


def parse_rcconf(text: str, path: str = "<string>") -> tuple[RcAssignment, ...]:
    """Every assignment of ``text`` in file order (duplicates included)."""
    assignments: list[RcAssignment] = []
    # sh ends lines at "\n" only (not at "\v", "\f" or Unicode breaks); "\r\n" is tolerated
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        assignments.extend(_LineParser(line, path, number).parse())
    return tuple(assignments)


def load_rcconf(path: str) -> tuple[RcAssignment, ...]:
    """Read and parse the file at ``path``; unreadable files raise ConfigError."""
    return parse_rcconf(read_config_text(path), path)


def effective_assignments(assignments: Iterable[RcAssignment]) -> dict[str, RcAssignment]:
    """The assignment that wins for each name (the last one, as in sh).

    The dict is ordered by the position of each winning assignment.
    """
    winners: dict[str, RcAssignment] = {}
    for assignment in assignments:
        winners.pop(assignment.name, None)
        winners[assignment.name] = assignment
    return winners


class _LineParser:
    """Scans one physical line; positions are 0-based, columns 1-based."""

    __slots__ = ("line", "number", "path", "pos")

    def __init__(self, line: str, path: str, number: int) -> None:
        self.line = line
        self.path = path
        self.number = number
        self.pos = 0

    def error(self, message: str, pos: int, token: str | None) -> ConfigError:
        return ConfigError(message, path=self.path, line=self.number, column=pos + 1, token=token)

    def skip_blanks(self) -> None:
        while self.pos < len(self.line) and self.line[self.pos] in _BLANK:
            self.pos += 1

    def at_end(self) -> bool:
        """True at the end of the line or at a comment."""
        return self.pos >= len(self.line) or self.line[self.pos] == "#"

    def word_at(self, pos: int) -> str:
        end = pos
        while end < len(self.line) and self.line[end] not in _BLANK:
            end += 1
        return self.line[pos:end]

    def parse(self) -> list[RcAssignment]:
        self.skip_blanks()
        if self.at_end():
            return []
        first = self.word_at(self.pos)
        if first in COMMAND_WORDS:
            command_pos = self.pos
            self.pos += len(first)
            self.skip_blanks()
            if self.at_end():
                raise self.error(f"{first} needs NAME=value arguments", command_pos, first)
        found: list[RcAssignment] = []
        while not self.at_end():
            found.append(self.assignment())
            self.skip_blanks()
        return found

    def assignment(self) -> RcAssignment:
        start = self.pos
        match = _NAME.match(self.line, start)
        end = match.end() if match else start
        if end < len(self.line) and self.line[end] == "=" and match:
            name = match.group()
            self.pos = end + 1
            value, columns = self.value()
            return RcAssignment(
                name=name,
                value=value,
                path=self.path,
                line=self.number,
                column=end + 2,
                name_column=start + 1,
                value_columns=columns,
            )
        word = self.word_at(start)
        if "=" in word:
            bad = word.split("=", 1)[0]
            if not bad:
                raise self.error("an assignment needs a name before '='", start, word)
            raise self.error(
                "bad variable name: use letters, digits and '_' (sysctl names may contain dots)",
                start,
                bad,
            )
        rest = self.line[start + len(word) :].lstrip(_BLANK)
        if match and end == start + len(word) and rest.startswith("="):
            raise self.error(
                "spaces around '=' are not allowed (sh reads them as a command); write NAME=value",
                start,
                word,
            )
        raise self.error("expected NAME=value", start, word)

    def value(self) -> tuple[str, tuple[int, ...]]:
        chars: list[str] = []
        columns: list[int] = []
        line = self.line
        while self.pos < len(line) and line[self.pos] not in _BLANK:
            char = line[self.pos]
            if char == "'":
                close = line.find("'", self.pos + 1)
                if close < 0:
                    raise self.error("unterminated single quote", self.pos, self.word_at(self.pos))
                for index in range(self.pos + 1, close):
                    chars.append(line[index])
                    columns.append(index + 1)
                self.pos = close + 1
            elif char == '"':
                self.double_quoted(chars, columns)
            elif char == "\\":
                if self.pos + 1 >= len(line):
                    raise self.error(
                        "a backslash at the end of the line (line continuation) is not supported",
                        self.pos,
                        "\\",
                    )
                chars.append(line[self.pos + 1])
                columns.append(self.pos + 2)
                self.pos += 2
            else:
                self.check_plain(char)
                chars.append(char)
                columns.append(self.pos + 1)
                self.pos += 1
        return "".join(chars), tuple(columns)

    def double_quoted(self, chars: list[str], columns: list[int]) -> None:
        line = self.line
        opening = self.pos
        self.pos += 1
        while True:
            if self.pos >= len(line):
                raise self.error("unterminated double quote", opening, self.word_at(opening))
            char = line[self.pos]
            if char == '"':
                self.pos += 1
                return
            if char == "\\" and self.pos + 1 < len(line) and line[self.pos + 1] in '"\\$`':
                chars.append(line[self.pos + 1])
                columns.append(self.pos + 2)
                self.pos += 2
                continue
            if char in "$`":
                self.check_expansion(char)
            chars.append(char)
            columns.append(self.pos + 1)
            self.pos += 1

    def check_plain(self, char: str) -> None:
        if char in "$`":
            self.check_expansion(char)
        elif char in _SHELL_OPERATORS:
            raise self.error(
                f"shell syntax {char!r} is not supported in rc.conf values; quote the value",
                self.pos,
                char,
            )

    def check_expansion(self, char: str) -> None:
        following = self.line[self.pos + 1 : self.pos + 2]
        if char == "`" or following in ("{", "(") or (following.isalnum() or following == "_"):
            raise self.error(
                "shell expansion is not supported; write the value literally "
                "(or put it in single quotes)",
                self.pos,
                self.word_at(self.pos),
            )
