"""devd.conf(5): FreeBSD's device-event rules, parsed and matched as devd does.

Grammar (FreeBSD ``sbin/devd/parse.y``)::

    config    = { statement } ;
    statement = "options" "{" { option } "}" ";"
              | ("attach" | "detach" | "nomatch" | "notify") NUMBER "{" { sub } "}" ";" ;
    option    = "directory" STRING ";" | "pid-file" STRING ";" | "set" ID STRING ";" ;
    sub       = "match" STRING STRING ";" | "action" STRING ";"
              | "device-name" STRING ";" | "class" (NUMBER | STRING) ";"
              | "subdevice" (NUMBER | STRING) ";" | "media-type" STRING ";" ;

Comments in shell (``#``), C++ (``//``) and C (``/* */``) style. A string is
``"..."``; a backslash before a newline joins the lines (devd skips the newline
and the indentation after it), ``\\"`` is a quote; every other backslash is
kept as it is, so regexes keep theirs.

Matching follows ``devd.cc``: a ``match "key" "re"`` compiles ``^re$`` (after
expanding ``$name`` of an ``options { set name "re"; }``) as an extended,
case-insensitive regex, so ``"MASTER|BACKUP"`` means ``^MASTER`` or ``BACKUP$``
exactly as in POSIX; a leading ``!`` negates it. A key the event lacks matches
as the empty string. ``device-name``/``class``/``subdevice`` are shorthands for
``match`` on the variable of that name; ``media-type "ethernet"`` matches the
event variable ``media-type`` (the event source supplies it; FreeBSD asks the
interface with SIOCGIFMEDIA).

Statements are tried highest priority first (file order among equal
priorities) and **only the first that matches runs** (devd stops at the first
match); :meth:`DevdConfig.matching_rules` returns that rule, or every matching
rule with ``first_only=False``. All ``action`` lines of the chosen rule run, in
order.

Events are flat mappings of devd variables: ``system``, ``subsystem``, ``type``
plus the event's attributes (e.g. CARP: ``system=CARP subsystem=1@em0
type=MASTER``; a link: ``system=IFNET subsystem=em0 type=LINK_UP``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from carpool.configfile import read_config_text
from carpool.errors import ConfigError

RuleKind = Literal["notify", "attach", "detach", "nomatch"]
RULE_KINDS: tuple[RuleKind, ...] = ("attach", "detach", "nomatch", "notify")

#: The regex flags devd compiles ``match`` with (REG_EXTENDED | REG_ICASE).
MATCH_FLAGS = re.IGNORECASE

_POSIX_CLASSES = {
    "alpha": "a-zA-Z",
    "digit": "0-9",
    "alnum": "a-zA-Z0-9",
    "upper": "A-Z",
    "lower": "a-z",
    "space": r" \t\n\r\f\v",
    "blank": r" \t",
    "punct": r"!-/:-@\[-`{-~",
    "xdigit": "0-9A-Fa-f",
    "word": "A-Za-z0-9_",
    "cntrl": r"\x00-\x1f\x7f",
    "print": r"\x20-\x7e",
    "graph": r"\x21-\x7e",
}


@dataclass(frozen=True)
class Match:
    """One condition of a rule: the event variable ``key`` must (not) match ``regex``."""

    key: str
    regex: re.Pattern[str]
    negated: bool = False

    def matches(self, value: str) -> bool:
        hit = self.regex.search(value) is not None
        return hit != self.negated


@dataclass(frozen=True)
class DevdRule:
    """A notify/attach/detach/nomatch statement."""

    kind: RuleKind
    priority: int
    matches: tuple[Match, ...]
    actions: tuple[str, ...]
    line: int
    path: str

    def matches_event(self, event_vars: Mapping[str, str]) -> bool:
        return all(m.matches(event_vars.get(m.key, "")) for m in self.matches)


@dataclass(frozen=True)
class DevdConfig:
    """Every statement of one or more devd.conf files, plus the ``options`` block."""

    rules: tuple[DevdRule, ...]
    variables: dict[str, str] = field(default_factory=dict)
    directories: tuple[str, ...] = ()
    pid_file: str | None = None

    def matching_rules(
        self,
        event_vars: Mapping[str, str],
        *,
        kind: RuleKind = "notify",
        first_only: bool = True,
    ) -> list[DevdRule]:
        """The rules of ``kind`` to run for the event, highest priority first.

        devd runs only the first (highest-priority) matching statement, so by
        default the list holds at most one rule; ``first_only=False`` lists all
        that match (for ``devd -d``-style debugging).
        """
        lookup = {**self.variables, **event_vars}
        candidates = sorted((r for r in self.rules if r.kind == kind), key=lambda r: -r.priority)
        found: list[DevdRule] = []
        for rule in candidates:
            if rule.matches_event(lookup):
                found.append(rule)
                if first_only:
                    break
        return found

    def expand(self, action: str, event_vars: Mapping[str, str], *, quote: bool = False) -> str:
        """``action`` expanded with the event's variables over the ``set`` options."""
        return expand_action(action, {**self.variables, **event_vars}, quote=quote)


def _is_id_char(ch: str) -> bool:
    return ch.isalnum() or ch in "_-"


def _shell_quote(value: str) -> str:
    """Quote like current devd: ``$'...'`` with backslash escapes."""
    out = []
    for ch in value:
        if ch in "\\'":
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "$'" + "".join(out) + "'"


def expand_action(action: str, variables: Mapping[str, str], *, quote: bool = False) -> str:
    """Expand ``$var`` (devd) and ``${var}`` (carpool) in ``action``.

    As devd: ``$$`` is ``$``; ``$(...)`` is passed to the shell untouched; a
    ``$`` not followed by a name character stays; a name is letters, digits,
    ``_`` and ``-`` (``$device-name``), or ``*`` alone; unknown names expand to
    nothing. Values go in raw (old devd) unless ``quote`` is set, which quotes
    them as ``$'...'`` like FreeBSD 13's devd.
    """
    out: list[str] = []
    i = 0
    n = len(action)

    def value_of(name: str) -> str:
        value = variables.get(name, "")
        return _shell_quote(value) if quote else value

    while i < n:
        ch = action[i]
        if ch != "$":
            out.append(ch)
            i += 1
            continue
        i += 1
        if i >= n:
            out.append("$")
            break
        nxt = action[i]
        if nxt == "$":
            out.append("$")
            i += 1
        elif nxt == "(":
            depth = 0
            start = i
            while i < n:
                if action[i] == "(":
                    depth += 1
                elif action[i] == ")":
                    depth -= 1
                i += 1
                if depth == 0:
                    break
            out.append("$" + action[start:i])
        elif nxt == "{":
            end = action.find("}", i + 1)
            name = action[i + 1 : end] if end != -1 else ""
            if end != -1 and name and (name == "*" or all(_is_id_char(c) for c in name)):
                out.append(value_of(name))
                i = end + 1
            else:
                out.append("${")
                i += 1
        elif nxt == "*":
            out.append(value_of("*"))
            i += 1
        elif nxt.isalpha() or nxt in "_-":
            start = i
            while i < n and _is_id_char(action[i]):
                i += 1
            out.append(value_of(action[start:i]))
        else:
            out.append("$")
    return "".join(out)


# --------------------------------------------------------------------------- lexer


@dataclass(frozen=True)
class _Tok:
    kind: Literal["string", "word", "number", "punct", "eof"]
    text: str
    line: int
    column: int


_WORD_RE = re.compile(r"[A-Za-z][-_A-Za-z0-9]*")
_NUMBER_RE = re.compile(r"-?(?:0[xX][0-9a-fA-F]+|[0-9]+)")


def _lex(text: str, path: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i = 0
    line = 1
    line_start = 0
    n = len(text)

    def col(pos: int) -> int:
        return pos - line_start + 1

    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
            line_start = i
        elif ch in " \t\r\f\v":
            i += 1
        elif ch == "#" or text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end == -1 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end == -1:
                raise ConfigError(
                    "unterminated /* comment", path=path, line=line, column=col(i), token="/*"
                )
            chunk = text[i : end + 2]
            newlines = chunk.count("\n")
            if newlines:
                line += newlines
                line_start = i + chunk.rfind("\n") + 1
            i = end + 2
        elif ch in "{};":
            toks.append(_Tok("punct", ch, line, col(i)))
            i += 1
        elif ch == '"':
            start_line, start_col = line, col(i)
            i += 1
            buf: list[str] = []
            while True:
                if i >= n:
                    raise ConfigError(
                        "unterminated string: add the closing '\"'",
                        path=path,
                        line=start_line,
                        column=start_col,
                        token=text[start_col - 1 : start_col + 19],
                    )
                c = text[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and i + 1 < n and text[i + 1] == '"':
                    buf.append('"')
                    i += 2
                    continue
                if c == "\\" and i + 1 < n and text[i + 1] == "\n":
                    i += 2
                    line += 1
                    line_start = i
                    while i < n and text[i] in " \t":
                        i += 1
                    continue
                if c == "\n":
                    line += 1
                    line_start = i + 1
                buf.append(c)
                i += 1
            toks.append(_Tok("string", "".join(buf), start_line, start_col))
        else:
            m = _NUMBER_RE.match(text, i)
            if m and (m.end() >= n or not _is_id_char(text[m.end()])):
                toks.append(_Tok("number", m.group(), line, col(i)))
                i = m.end()
                continue
            m = _WORD_RE.match(text, i)
            if m:
                toks.append(_Tok("word", m.group(), line, col(i)))
                i = m.end()
                continue
            raise ConfigError(
                f"unexpected character {ch!r}", path=path, line=line, column=col(i), token=ch
            )
    toks.append(_Tok("eof", "", line, col(i)))
    return toks


# --------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str, path: str) -> None:
        self.path = path
        self.toks = _lex(text, path)
        self.pos = 0
        self.rules: list[DevdRule] = []
        self.variables: dict[str, str] = {}
        self.directories: list[str] = []
        self.pid_file: str | None = None

    def error(self, message: str, tok: _Tok) -> ConfigError:
        return ConfigError(
            message,
            path=self.path,
            line=tok.line,
            column=tok.column,
            token=tok.text if tok.kind != "eof" else None,
        )

    def peek(self) -> _Tok:
        return self.toks[self.pos]

    def next(self) -> _Tok:
        tok = self.toks[self.pos]
        if tok.kind != "eof":
            self.pos += 1
        return tok

    def expect_punct(self, ch: str, context: str) -> _Tok:
        tok = self.next()
        if tok.kind != "punct" or tok.text != ch:
            shown = "end of file" if tok.kind == "eof" else repr(tok.text)
            raise self.error(f"expected '{ch}' {context}, found {shown}", tok)
        return tok

    def expect_string(self, context: str) -> _Tok:
        tok = self.next()
        if tok.kind != "string":
            shown = "end of file" if tok.kind == "eof" else repr(tok.text)
            raise self.error(f'expected a quoted "string" {context}, found {shown}', tok)
        return tok

    def parse(self) -> None:
        while self.peek().kind != "eof":
            tok = self.next()
            if tok.kind == "word" and tok.text == "options":
                self.parse_options()
            elif tok.kind == "word" and tok.text in RULE_KINDS:
                self.parse_rule(tok)
            elif tok.kind == "punct" and tok.text == ";":
                continue  # an empty statement, as the seed's "};" runs produce
            else:
                raise self.error(
                    "expected a statement: options, notify, attach, detach or nomatch", tok
                )

    def parse_options(self) -> None:
        self.expect_punct("{", "after 'options'")
        while True:
            tok = self.next()
            if tok.kind == "punct" and tok.text == "}":
                break
            if tok.kind == "word" and tok.text == "directory":
                self.directories.append(self.expect_string("after 'directory'").text)
            elif tok.kind == "word" and tok.text == "pid-file":
                self.pid_file = self.expect_string("after 'pid-file'").text
            elif tok.kind == "word" and tok.text == "set":
                name = self.next()
                if name.kind != "word":
                    raise self.error("expected a variable name after 'set'", name)
                value = self.expect_string(f"as the value of 'set {name.text}'")
                self.variables[name.text] = value.text
            else:
                raise self.error(
                    "expected an option: directory, pid-file or set (or '}' to end options)", tok
                )
            self.expect_punct(";", "after the option")
        self.expect_punct(";", "after the options block's '}' (devd wants '};')")

    def compile_match(self, key: str, tok: _Tok) -> Match:
        raw = expand_action(tok.text, self.variables)
        negated = raw.startswith("!")
        if negated:
            raw = raw[1:]
        try:
            regex = re.compile("^" + _posix_to_python(raw) + r"\Z", MATCH_FLAGS)
        except re.error as exc:
            raise self.error(f"bad regular expression for {key!r}: {exc}", tok) from None
        return Match(key, regex, negated)

    def parse_rule(self, head: _Tok) -> None:
        prio = self.next()
        if prio.kind != "number":
            raise self.error(f"expected a priority number after '{head.text}'", prio)
        priority = int(prio.text, 0)
        self.expect_punct("{", f"after '{head.text} {prio.text}'")
        matches: list[Match] = []
        actions: list[str] = []
        while True:
            tok = self.next()
            if tok.kind == "punct" and tok.text == "}":
                break
            word = tok.text if tok.kind == "word" else ""
            if word == "match":
                key = self.expect_string("(the variable) after 'match'")
                rex = self.expect_string(f"(the regex) after 'match \"{key.text}\"'")
                matches.append(self.compile_match(key.text, rex))
            elif word == "action":
                actions.append(self.expect_string("(the command) after 'action'").text)
            elif word in ("device-name", "class", "subdevice"):
                val = self.next()
                if val.kind not in ("string", "number") or (
                    word == "device-name" and val.kind != "string"
                ):
                    raise self.error(f"expected a value after '{word}'", val)
                matches.append(self.compile_match(word, val))
            elif word == "media-type":
                val = self.expect_string("after 'media-type'")
                regex = re.compile("^" + re.escape(val.text) + r"\Z", re.IGNORECASE)
                matches.append(Match("media-type", regex, False))
            else:
                raise self.error(
                    "expected match, action, device-name, class, subdevice or media-type "
                    f"(or '}}' to end the {head.text} block)",
                    tok,
                )
            self.expect_punct(";", f"after the '{word}' statement")
        self.expect_punct(";", f"after the {head.text} block's '}}' (devd wants '}};')")
        kind: RuleKind = head.text  # type: ignore[assignment]
        self.rules.append(
            DevdRule(kind, priority, tuple(matches), tuple(actions), head.line, self.path)
        )


def _posix_to_python(regex: str) -> str:
    """Rewrite POSIX bracket classes (``[[:digit:]]``) for Python's ``re``."""

    def repl(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in _POSIX_CLASSES:
            raise re.error(f"unknown character class [:{name}:]")
        return _POSIX_CLASSES[name]

    return re.sub(r"\[:([a-z]+):\]", repl, regex)


def parse_devd_config(text: str, path: str = "<devd.conf>") -> DevdConfig:
    """Parse one devd.conf text; ConfigError with file:line:column on the first fault."""
    parser = _Parser(text, path)
    parser.parse()
    return DevdConfig(
        tuple(parser.rules), dict(parser.variables), tuple(parser.directories), parser.pid_file
    )


def _files_of(path: str) -> list[str]:
    if os.path.isdir(path):
        try:
            names = sorted(os.listdir(path))
        except OSError as exc:
            raise ConfigError(f"cannot list the directory: {exc.strerror}", path=path) from exc
        return [
            os.path.join(path, name)
            for name in names
            if name.endswith(".conf") and os.path.isfile(os.path.join(path, name))
        ]
    return [path]


def load_devd_config(paths: Iterable[str], *, follow_directories: bool = True) -> DevdConfig:
    """Load files and directories (their ``*.conf`` files, sorted) like devd.

    With ``follow_directories``, each ``options { directory "..."; }`` is read
    too (a missing directory is skipped, as devd does). Later ``set`` options
    override earlier ones.
    """
    rules: list[DevdRule] = []
    variables: dict[str, str] = {}
    directories: list[str] = []
    pid_file: str | None = None
    seen: set[str] = set()
    queue = list(paths)
    while queue:
        item = queue.pop(0)
        real = os.path.realpath(item)
        if real in seen:
            continue
        seen.add(real)
        for file in _files_of(item):
            real_file = os.path.realpath(file)
            if real_file != real and real_file in seen:
                continue
            seen.add(real_file)
            cfg = parse_devd_config(read_config_text(file), file)
            rules.extend(cfg.rules)
            variables.update(cfg.variables)
            pid_file = cfg.pid_file or pid_file
            for d in cfg.directories:
                directories.append(d)
                if follow_directories and os.path.isdir(d):
                    queue.append(d)
    return DevdConfig(tuple(rules), variables, tuple(directories), pid_file)
