"""ifstated.conf(5): OpenBSD's interface-state machine configuration.

Grammar (OpenBSD ``usr.sbin/ifstated/parse.y``; newlines are plain white space here)::

    config    = { macro | "init-state" NAME | action | state } ;
    macro     = NAME "=" (STRING | WORD) ;          (defined before use, $NAME expands textually)
    state     = "state" NAME "{" { "init" block | action } "}" ;
    action    = "run" STRING | "set-state" NAME | "if" expr block ;
    block     = "{" { action } "}" | action ;
    expr      = expr "||" expr | expr "&&" expr | "!" expr | "(" expr ")" | test ;
    test      = IFACE ".link." ("up" | "down" | "unknown")
              | STRING "every" SECONDS                    (external test: exit 0 = true)
              | VHID "@" IFACE ".carp." ("master" | "backup" | "init")   (carpool) ;

``&&`` binds tighter than ``||``; ``!`` tighter than both. There is no
``else``. Top-level actions form the global block, evaluated in every state;
``set-state`` is not allowed there. Comments start with ``#``. Strings are
``"..."`` or ``'...'``; ``$macro`` is expanded outside strings only.

CARP state, carpool form: ``1@em0.carp.master`` (also ``vhid1@em0.carp.master``)
— the vhid and interface exactly as FreeBSD's devd subsystem names them
(``1@em0``). ``1@em0.link.up|down|unknown`` means MASTER|BACKUP|INIT, as an
OpenBSD ``carp0.link.up`` does for a carp interface, so old configs port by
renaming ``carp0`` to ``1@em0`` (or by the machine's ``carp_aliases``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from carpool.configfile import read_config_text
from carpool.errors import ConfigError

LinkState = Literal["up", "down", "unknown"]
CarpState = Literal["master", "backup", "init"]

# ----------------------------------------------------------------------------- AST


@dataclass(frozen=True)
class LinkTest:
    """``IFACE.link.up|down|unknown``."""

    ifname: str
    state: LinkState


@dataclass(frozen=True)
class CarpTest:
    """``VHID@IFACE.carp.master|backup|init`` (carpool)."""

    ifname: str
    vhid: int
    state: CarpState


@dataclass(frozen=True)
class ExternalTest:
    """``"command" every N``: true while the command's last exit status was 0."""

    command: str
    every: int


@dataclass(frozen=True)
class Not:
    operand: Expr


@dataclass(frozen=True)
class And:
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Or:
    left: Expr
    right: Expr


Expr = LinkTest | CarpTest | ExternalTest | Not | And | Or


@dataclass(frozen=True)
class Run:
    command: str
    line: int = 0


@dataclass(frozen=True)
class SetState:
    state: str
    line: int = 0


@dataclass(frozen=True)
class If:
    condition: Expr
    body: tuple[Action, ...]
    line: int = 0


Action = Run | SetState | If


@dataclass(frozen=True)
class State:
    name: str
    init: tuple[Action, ...]
    body: tuple[Action, ...]
    line: int = 0


@dataclass(frozen=True)
class IfstatedConfig:
    init_state: str | None
    states: dict[str, State]
    global_body: tuple[Action, ...]
    macros: dict[str, str]
    path: str = "<ifstated.conf>"


def tests_of(expr: Expr) -> list[LinkTest | CarpTest | ExternalTest]:
    """The leaf tests of an expression, left to right."""
    if isinstance(expr, Not):
        return tests_of(expr.operand)
    if isinstance(expr, And | Or):
        return tests_of(expr.left) + tests_of(expr.right)
    return [expr]


def external_tests(actions: tuple[Action, ...]) -> list[ExternalTest]:
    """Every external test used by a block, nested ifs included, without duplicates."""
    found: list[ExternalTest] = []
    for action in actions:
        if isinstance(action, If):
            for test in tests_of(action.condition):
                if isinstance(test, ExternalTest) and test not in found:
                    found.append(test)
            for test in external_tests(action.body):
                if test not in found:
                    found.append(test)
    return found


# ----------------------------------------------------------------------------- lexer


@dataclass(frozen=True)
class _Tok:
    kind: Literal["string", "word", "punct", "eof"]
    text: str
    line: int
    column: int


_WORD_CHARS = re.compile(r"[A-Za-z0-9_.@:/\-]+")
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LINK_RE = re.compile(r"^(?P<if>[A-Za-z0-9_:\-@]+)\.link\.(?P<st>[a-z]+)$")
_CARP_RE = re.compile(
    r"^(?:vhid)?(?P<vhid>[0-9]+)@(?P<if>[A-Za-z0-9_:\-.]+)\.carp\.(?P<st>[a-z]+)$"
)
KEYWORDS = frozenset({"init-state", "state", "init", "if", "run", "set-state", "every"})
_MAX_MACRO_DEPTH = 16


def _lex(
    text: str, path: str, macros: dict[str, str], depth: int = 0, at: tuple[int, int] | None = None
) -> list[_Tok]:
    """Tokens of ``text``; ``macros`` fills as definitions are seen (defined before use)."""
    toks: list[_Tok] = []
    i, line, line_start, n = 0, 1, 0, len(text)

    def pos(p: int) -> tuple[int, int]:
        return at if at is not None else (line, p - line_start + 1)

    def err(message: str, p: int, token: str | None) -> ConfigError:
        ln, cl = pos(p)
        return ConfigError(message, path=path, line=ln, column=cl, token=token)

    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
            i += 1
            line_start = i
        elif ch in " \t\r\f\v":
            i += 1
        elif ch == "\\" and i + 1 < n and text[i + 1] == "\n":
            i += 2
            line += 1
            line_start = i
        elif ch == "#":
            end = text.find("\n", i)
            i = n if end == -1 else end
        elif ch in "\"'":
            ln, cl = pos(i)
            end = i + 1
            buf: list[str] = []
            while end < n and text[end] != ch:
                if text[end] == "\\" and end + 1 < n and text[end + 1] in (ch, "\\"):
                    buf.append(text[end + 1])
                    end += 2
                    continue
                if text[end] == "\n":
                    raise err("unterminated string: add the closing quote", i, text[i : i + 20])
                buf.append(text[end])
                end += 1
            if end >= n:
                raise err("unterminated string: add the closing quote", i, text[i : i + 20])
            toks.append(_Tok("string", "".join(buf), ln, cl))
            i = end + 1
        elif text.startswith("&&", i) or text.startswith("||", i):
            ln, cl = pos(i)
            toks.append(_Tok("punct", text[i : i + 2], ln, cl))
            i += 2
        elif ch in "{}()!=":
            ln, cl = pos(i)
            toks.append(_Tok("punct", ch, ln, cl))
            i += 1
        elif ch == "$":
            m = _NAME_RE.match(text, i + 1)
            if not m:
                raise err("expected a macro name after '$'", i, "$")
            name = m.group()
            if name not in macros:
                raise err(f"macro {name!r} is not defined (define it before use)", i, "$" + name)
            if depth >= _MAX_MACRO_DEPTH:
                raise err(f"macro {name!r} expands too deeply", i, "$" + name)
            value = macros[name]
            tail = _WORD_CHARS.match(text, m.end())
            if tail and _WORD_CHARS.fullmatch(value):
                # Textual substitution: "$sync.link.up" is one word once expanded.
                ln, cl = pos(i)
                toks.append(_Tok("word", value + tail.group(), ln, cl))
                i = tail.end()
                continue
            sub = _lex(value, path, macros, depth + 1, pos(i))
            toks.extend(sub[:-1])
            i = m.end()
        else:
            m = _WORD_CHARS.match(text, i)
            if not m:
                raise err(f"unexpected character {ch!r}", i, ch)
            ln, cl = pos(i)
            toks.append(_Tok("word", m.group(), ln, cl))
            i = m.end()
            # A macro definition is seen at lex time so later $references expand.
            if depth == 0 and _NAME_RE.fullmatch(m.group()) and m.group() not in KEYWORDS:
                j = i
                while j < n and text[j] in " \t":
                    j += 1
                if j < n and text[j] == "=":
                    k = j + 1
                    while k < n and text[k] in " \t":
                        k += 1
                    defined, _ = _value_at(text, k)
                    if defined is not None:
                        macros[m.group()] = defined
    ln, cl = pos(i)
    toks.append(_Tok("eof", "", ln, cl))
    return toks


def _value_at(text: str, k: int) -> tuple[str | None, int]:
    if k < len(text) and text[k] in "\"'":
        q = text[k]
        end = k + 1
        buf: list[str] = []
        while end < len(text) and text[end] != q and text[end] != "\n":
            if text[end] == "\\" and end + 1 < len(text) and text[end + 1] in (q, "\\"):
                buf.append(text[end + 1])
                end += 2
                continue
            buf.append(text[end])
            end += 1
        return "".join(buf), end
    m = _WORD_CHARS.match(text, k)
    return (m.group(), m.end()) if m else (None, k)


# ----------------------------------------------------------------------------- parser


class _Parser:
    def __init__(self, text: str, path: str) -> None:
        self.path = path
        self.macros: dict[str, str] = {}
        self.toks = _lex(text, path, self.macros)
        self.pos = 0
        self.set_states: list[tuple[str, _Tok]] = []

    def error(self, message: str, tok: _Tok) -> ConfigError:
        return ConfigError(
            message,
            path=self.path,
            line=tok.line,
            column=tok.column,
            token=tok.text if tok.kind != "eof" else None,
        )

    def peek(self, k: int = 0) -> _Tok:
        return self.toks[min(self.pos + k, len(self.toks) - 1)]

    def next(self) -> _Tok:
        tok = self.toks[self.pos]
        if tok.kind != "eof":
            self.pos += 1
        return tok

    def is_punct(self, ch: str, k: int = 0) -> bool:
        tok = self.peek(k)
        return tok.kind == "punct" and tok.text == ch

    def expect_punct(self, ch: str, context: str) -> None:
        tok = self.next()
        if tok.kind != "punct" or tok.text != ch:
            raise self.error(f"expected '{ch}' {context}, found {self.shown(tok)}", tok)

    @staticmethod
    def shown(tok: _Tok) -> str:
        return "end of file" if tok.kind == "eof" else repr(tok.text)

    def name(self, context: str) -> str:
        tok = self.next()
        if tok.kind not in ("word", "string") or (tok.kind == "word" and tok.text in KEYWORDS):
            raise self.error(f"expected a state name {context}, found {self.shown(tok)}", tok)
        return tok.text

    def parse(self) -> IfstatedConfig:
        init_state: str | None = None
        states: dict[str, State] = {}
        global_body: list[Action] = []
        while self.peek().kind != "eof":
            tok = self.peek()
            if tok.kind == "word" and tok.text == "init-state":
                self.next()
                init_tok = self.peek()
                init_state = self.name("after 'init-state'")
                self.set_states.append((init_state, init_tok))
            elif tok.kind == "word" and tok.text == "state":
                self.next()
                state = self.parse_state(tok)
                if state.name in states:
                    raise self.error(f"state {state.name!r} is defined twice", tok)
                states[state.name] = state
            elif tok.kind == "word" and self.is_punct("=", 1):
                if tok.text in KEYWORDS or not _NAME_RE.fullmatch(tok.text):
                    raise self.error("a macro name is letters, digits and '_'", tok)
                self.next()
                self.next()
                value = self.next()
                if value.kind not in ("string", "word"):
                    raise self.error(f"expected a value for macro {tok.text!r}", value)
            elif tok.kind == "word" and tok.text in ("run", "if", "set-state"):
                action = self.parse_action()
                if _has_set_state(action):
                    raise self.error(
                        "set-state is not allowed in the global block; put it in a state", tok
                    )
                global_body.append(action)
            else:
                raise self.error(
                    "expected a macro, init-state, state, if or run, found " + self.shown(tok), tok
                )
        if init_state is None and states:
            init_state = next(iter(states))
        for target, where in self.set_states:
            if target not in states:
                raise self.error(f"state {target!r} is not defined", where)
        return IfstatedConfig(init_state, states, tuple(global_body), dict(self.macros), self.path)

    def parse_state(self, head: _Tok) -> State:
        name = self.name("after 'state'")
        self.expect_punct("{", f"after 'state {name}'")
        init: list[Action] = []
        body: list[Action] = []
        while not self.is_punct("}"):
            tok = self.peek()
            if tok.kind == "eof":
                raise self.error(f"state {name!r} is not closed: add '}}'", tok)
            if tok.kind == "word" and tok.text == "init":
                self.next()
                init.extend(self.parse_block())
            else:
                body.append(self.parse_action())
        self.next()
        return State(name, tuple(init), tuple(body), head.line)

    def parse_block(self) -> tuple[Action, ...]:
        if self.is_punct("{"):
            self.next()
            actions: list[Action] = []
            while not self.is_punct("}"):
                if self.peek().kind == "eof":
                    raise self.error("block is not closed: add '}'", self.peek())
                actions.append(self.parse_action())
            self.next()
            return tuple(actions)
        return (self.parse_action(),)

    def parse_action(self) -> Action:
        tok = self.next()
        if tok.kind == "word" and tok.text == "run":
            cmd = self.next()
            if cmd.kind != "string" and (cmd.kind != "word" or cmd.text in KEYWORDS):
                raise self.error(f"expected a command after 'run', found {self.shown(cmd)}", cmd)
            return Run(cmd.text, tok.line)
        if tok.kind == "word" and tok.text == "set-state":
            where = self.peek()
            target = self.name("after 'set-state'")
            self.set_states.append((target, where))
            return SetState(target, tok.line)
        if tok.kind == "word" and tok.text == "if":
            cond = self.parse_or()
            return If(cond, self.parse_block(), tok.line)
        raise self.error(f"expected run, set-state or if, found {self.shown(tok)}", tok)

    def parse_or(self) -> Expr:
        left = self.parse_and()
        while self.is_punct("||"):
            self.next()
            left = Or(left, self.parse_and())
        return left

    def parse_and(self) -> Expr:
        left = self.parse_unary()
        while self.is_punct("&&"):
            self.next()
            left = And(left, self.parse_unary())
        return left

    def parse_unary(self) -> Expr:
        tok = self.next()
        if tok.kind == "punct" and tok.text == "!":
            return Not(self.parse_unary())
        if tok.kind == "punct" and tok.text == "(":
            inner = self.parse_or()
            self.expect_punct(")", "to close '('")
            return inner
        if tok.kind == "string":
            every = self.next()
            if every.kind != "word" or every.text != "every":
                raise self.error(
                    "an external test is '\"command\" every SECONDS': expected 'every'", every
                )
            secs = self.next()
            if secs.kind != "word" or not secs.text.isdigit() or int(secs.text) <= 0:
                raise self.error("expected a positive number of seconds after 'every'", secs)
            return ExternalTest(tok.text, int(secs.text))
        if tok.kind == "word":
            m = _CARP_RE.match(tok.text)
            if m:
                st = m.group("st")
                if st not in ("master", "backup", "init"):
                    raise self.error(
                        "a CARP test ends in .carp.master, .carp.backup or .carp.init", tok
                    )
                vhid = int(m.group("vhid"))
                if not 1 <= vhid <= 255:
                    raise self.error("a vhid is 1 to 255", tok)
                return CarpTest(m.group("if"), vhid, st)  # type: ignore[arg-type]
            m = _LINK_RE.match(tok.text)
            if m:
                st = m.group("st")
                if st not in ("up", "down", "unknown"):
                    raise self.error(
                        "a link test ends in .link.up, .link.down or .link.unknown", tok
                    )
                return LinkTest(m.group("if"), st)  # type: ignore[arg-type]
        raise self.error(
            "expected a test (IFACE.link.up|down|unknown, VHID@IFACE.carp.master|backup|init, "
            '"command" every N), '
            "'!' or '(', found " + self.shown(tok),
            tok,
        )


def _has_set_state(action: Action) -> bool:
    if isinstance(action, SetState):
        return True
    if isinstance(action, If):
        return any(_has_set_state(a) for a in action.body)
    return False


def parse_ifstated_config(text: str, path: str = "<ifstated.conf>") -> IfstatedConfig:
    """Parse an ifstated.conf text; ConfigError with file:line:column on the first fault."""
    return _Parser(text, path).parse()


def load_ifstated_config(path: str) -> IfstatedConfig:
    """Read and parse the ifstated.conf at ``path``."""
    return parse_ifstated_config(read_config_text(path), path)
