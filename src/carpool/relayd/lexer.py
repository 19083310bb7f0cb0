"""relayd.conf's lexical layer, after OpenBSD's ``yylex``/``lgetc`` in parse.y.

* ``#`` comments run to the end of the line; a backslash before a newline
  joins two lines (outside and inside quotes).
* ``"..."`` and ``'...'`` strings: ``\\"`` (the quote), ``\\ `` and ``\\\\``
  escape; a newline inside quotes is an error (unterminated string).
* Bare words: ASCII letters, digits and punctuation except ``( ) { } < > ! = # , /``.
  A bare word that is in :data:`KEYWORDS` is that keyword; quoted text never is.
* Numbers: an optional ``-`` and digits, in the 64-bit range, ended by
  whitespace or one of ``) , / } =``; anything else is a word (``10.0.0.1``,
  ``8080:8090``).
* ``$name`` outside quotes expands a macro: its value is pushed back into the
  input and lexed again (so it may hold several tokens, or glue onto the
  following characters), without expanding ``$`` inside it.  ``$NAME`` inside
  quotes stays as written (relayd's run-time ``$REMOTE_ADDR`` and friends).
* ``name = value`` at the top level defines a macro as soon as it is read;
  ``-D`` macros (``persistent``) are not overridden by the file.
* ``include "file"`` splices the file's tokens in place; a relative name is
  taken relative to the including file; loops are errors.

Newlines end statements in relayd; carpool's grammar does not need them, so
the lexer drops them (a statement may then continue on the next line, and
several statements may share a line, as the seed's one-line form needs).
"""

from __future__ import annotations

import os
import string
from collections.abc import Callable
from dataclasses import dataclass, field

from carpool.errors import ConfigError

__all__ = ["KEYWORDS", "Lexed", "Loc", "Tok", "tokenize"]

_KEYWORD_TEXT = """
    agentx all append backlog binary block buffer ca cert changes check checks
    ciphers client code connection context cookie demote destination digest
    disable dns ecdhe edh error errors expect file forward from hash header
    headerlen host http https icmp include inet inet6 interface interval ip
    key keypair label least-states listen loadbalance log lookup match method
    minttl mode nat no nodelay nothing on params parent pass password path
    pflog pftag port prefork priority protocol proxy-protocol query quick
    random redirect relay remove request response retry return roundrobin
    route router rtable rtlabel sack script send session set socket
    source-hash splice state sticky-address strip style table tag tagged tcp
    tickets timeout tls to transparent ttl updates url value websockets with
"""
#: relayd's reserved words (parse.y ``keywords[]``), plus carpool's few extras
#: (``minttl``, ``updates``, ``all``); a bare word in this set is a keyword.
KEYWORDS = frozenset(_KEYWORD_TEXT.split())

_NOT_IN_WORD = frozenset("(){}<>!=#,/")
_WORD_CHARS = frozenset(
    c for c in string.ascii_letters + string.digits + string.punctuation if c not in _NOT_IN_WORD
)
_ENDS_NUMBER = frozenset(" \t\r\n),/}=")
_MACRO_CHARS = frozenset(string.ascii_letters + string.digits + "_")
_INT64 = 2**63
_MAX_INCLUDE_DEPTH = 32


@dataclass(frozen=True, slots=True)
class Loc:
    path: str
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class Tok:
    """A token: ``kind`` is ``STRING``, ``NUMBER``, ``KW`` (``text`` is the
    keyword) or ``PUNCT`` (``text`` is the character)."""

    kind: str
    text: str
    loc: Loc
    quoted: bool = False


@dataclass(slots=True)
class Lexed:
    tokens: list[Tok]
    macros: dict[str, str]
    used: set[str] = field(default_factory=set)


@dataclass(slots=True)
class _Char:
    ch: str
    loc: Loc
    expanded: bool  # came from a macro's value: no further ``$`` expansion


class _Reader:
    """Characters of one file, with relayd's pushback buffer and ``\\``-newline joining."""

    def __init__(self, text: str, path: str) -> None:
        self.text = text
        self.path = path
        self.pos = 0
        self.line = 1
        self.col = 1
        self.pushback: list[_Char] = []

    def _raw(self) -> _Char | None:
        if self.pushback:
            return self.pushback.pop()
        if self.pos >= len(self.text):
            return None
        ch = self.text[self.pos]
        c = _Char(ch, Loc(self.path, self.line, self.col), False)
        self.pos += 1
        if ch == "\n":
            self.line += 1
            self.col = 1
        else:
            self.col += 1
        return c

    def getc(self, quoted: bool = False) -> _Char | None:
        c = self._raw()
        if c is None or quoted or c.ch != "\\":
            return c
        nxt = self._raw()
        if nxt is not None and nxt.ch == "\n":
            return self.getc()  # line continuation
        if nxt is not None:
            self.pushback.append(nxt)
        return c

    def ungetc(self, c: _Char) -> None:
        self.pushback.append(c)

    def push_text(self, text: str, loc: Loc) -> None:
        for ch in reversed(text):
            self.pushback.append(_Char(ch, loc, True))


def _error(message: str, loc: Loc, token: str | None = None) -> ConfigError:
    return ConfigError(message, path=loc.path, line=loc.line, column=loc.column, token=token)


class _Lexer:
    def __init__(
        self,
        macros: dict[str, str],
        persistent: frozenset[str],
        read_file: Callable[[str], str],
    ) -> None:
        self.macros = macros
        self.persistent = persistent
        self.read_file = read_file
        self.used: set[str] = set()
        self.out: list[Tok] = []
        self.depth = 0  # brace depth, for top-level macro definitions
        self.stack: list[str] = []  # real paths of the files being read

    # ----------------------------------------------------------------- one file

    def run(self, text: str, path: str, include_loc: Loc | None = None) -> None:
        real = os.path.realpath(path)
        if real in self.stack:
            chain = " -> ".join([*self.stack[self.stack.index(real) :], real])
            loc = include_loc or Loc(path, 0, 0)
            raise _error(f"include loop: {chain}", loc, path)
        if len(self.stack) >= _MAX_INCLUDE_DEPTH:
            raise _error("includes nested too deeply", include_loc or Loc(path, 0, 0), path)
        self.stack.append(real)
        reader = _Reader(text, path)
        pending_include: Tok | None = None
        while True:
            tok = self._next(reader)
            if tok is None:
                break
            if pending_include is not None:
                if tok.kind not in ("STRING", "NUMBER"):
                    raise _error('include needs a file name: include "file"', tok.loc, tok.text)
                self._include(tok, pending_include.loc)
                pending_include = None
                continue
            if tok.kind == "KW" and tok.text == "include":
                pending_include = tok
                continue
            self._emit(tok)
        if pending_include is not None:
            raise _error(
                'include needs a file name: include "file"', pending_include.loc, "include"
            )
        self.stack.pop()

    def _include(self, name: Tok, loc: Loc) -> None:
        target = name.text
        if not os.path.isabs(target):
            target = os.path.join(os.path.dirname(loc.path), target)
        try:
            text = self.read_file(target)
        except ConfigError as exc:
            raise _error(f"cannot include {target}: {exc.message}", name.loc, name.text) from exc
        self.run(text, target, loc)

    def _emit(self, tok: Tok) -> None:
        if tok.kind == "PUNCT" and tok.text == "{":
            self.depth += 1
        elif tok.kind == "PUNCT" and tok.text == "}":
            self.depth = max(0, self.depth - 1)
        out = self.out
        out.append(tok)
        # ``NAME = VALUE`` at the top level: define the macro now, as relayd's
        # grammar action does before the next token is read.
        if (
            self.depth == 0
            and len(out) >= 3
            and tok.kind in ("STRING", "NUMBER")
            and out[-2].kind == "PUNCT"
            and out[-2].text == "="
            and out[-3].kind == "STRING"
        ):
            name = out[-3].text
            if any(c.isspace() for c in name) or not name:
                raise _error("macro name cannot contain whitespace", out[-3].loc, name)
            if name not in self.persistent:
                self.macros[name] = tok.text

    # ------------------------------------------------------------------ tokens

    def _next(self, r: _Reader) -> Tok | None:
        while True:
            c = r.getc()
            if c is None:
                return None
            ch = c.ch
            if ch in " \t\r\n\f\v":
                continue
            if ch == "#":
                while True:
                    c2 = r.getc(quoted=True)
                    if c2 is None:
                        return None
                    if c2.ch == "\n":
                        break
                continue
            if ch == "$" and not c.expanded:
                self._expand(r, c)
                continue
            if ch in "\"'":
                return self._quoted(r, c)
            if ch == "-" or ch.isdigit():
                num = self._number(r, c)
                if num is not None:
                    return num
                if ch == "-":
                    return Tok("PUNCT", ch, c.loc)
            if ch in _WORD_CHARS:
                return self._word(r, c)
            if ch == "\0":
                raise _error("syntax error: NUL character", c.loc)
            if ch in _NOT_IN_WORD or ch == "-":
                return Tok("PUNCT", ch, c.loc)
            raise _error("syntax error: unexpected character", c.loc, ch)

    def _expand(self, r: _Reader, dollar: _Char) -> None:
        name = ""
        while True:
            c = r.getc()
            if c is None:
                break
            if c.ch not in _MACRO_CHARS:
                r.ungetc(c)
                break
            name += c.ch
        if not name:
            raise _error("macro name missing after '$'", dollar.loc, "$")
        if name not in self.macros:
            raise _error(f"macro '{name}' not defined", dollar.loc, "$" + name)
        self.used.add(name)
        r.push_text(self.macros[name], dollar.loc)

    def _quoted(self, r: _Reader, start: _Char) -> Tok:
        quote = start.ch
        buf: list[str] = []
        while True:
            c = r.getc(quoted=True)
            if c is None or c.ch == "\n":
                raise _error("unterminated quoted string", start.loc, quote + "".join(buf))
            if c.ch == quote:
                break
            if c.ch == "\\":
                nxt = r.getc(quoted=True)
                if nxt is None:
                    raise _error("unterminated quoted string", start.loc, quote + "".join(buf))
                if nxt.ch in (quote, " ", "\\"):
                    buf.append(nxt.ch)
                elif nxt.ch == "\n":
                    continue
                else:
                    buf.append("\\")
                    r.ungetc(nxt)
                continue
            if c.ch == "\0":
                raise _error("syntax error: NUL character in a string", c.loc)
            buf.append(c.ch)
        return Tok("STRING", "".join(buf), start.loc, quoted=True)

    def _number(self, r: _Reader, start: _Char) -> Tok | None:
        chars = [start]
        too_long = False
        while True:
            c = r.getc()
            if c is None:
                break
            if c.ch in _ENDS_NUMBER:
                r.ungetc(c)
                break
            chars.append(c)
            if len(chars) > 64:
                too_long = True
                break
        text = "".join(c.ch for c in chars)
        body = text[1:] if text.startswith("-") else text
        if not too_long and body.isascii() and body.isdigit() and -_INT64 <= int(text) < _INT64:
            return Tok("NUMBER", str(int(text)), start.loc)
        for c in reversed(chars[1:]):
            r.ungetc(c)
        return None

    def _word(self, r: _Reader, start: _Char) -> Tok:
        buf = [start.ch]
        while True:
            c = r.getc()
            if c is None:
                break
            if c.ch not in _WORD_CHARS:
                r.ungetc(c)
                break
            buf.append(c.ch)
        text = "".join(buf)
        if text in KEYWORDS:
            return Tok("KW", text, start.loc)
        return Tok("STRING", text, start.loc)


def tokenize(
    text: str,
    path: str,
    *,
    macros: dict[str, str] | None = None,
    read_file: Callable[[str], str],
) -> Lexed:
    """All tokens of ``text`` (and what it includes); ``macros`` are ``-D`` macros."""
    cmdline = dict(macros or {})
    for name in cmdline:
        if not name or not all(c in _MACRO_CHARS for c in name):
            raise ConfigError(f"invalid macro name in -D: {name!r}", path=path, token=name)
    lexer = _Lexer(dict(cmdline), frozenset(cmdline), read_file)
    lexer.run(text, path)
    return Lexed(lexer.out, lexer.macros, lexer.used)
