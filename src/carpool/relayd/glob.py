"""fnmatch(3) globs as relayd uses them (flags 0 or FNM_CASEFOLD).

Python's :mod:`fnmatch` knows no backslash escapes and no ``[^...]``; OpenBSD's
fnmatch has both.  ``*`` and ``?`` match any character, ``/`` and newlines
included (no FNM_PATHNAME, no FNM_PERIOD).  Patterns compile once to a regex.
"""

from __future__ import annotations

import functools
import re

__all__ = ["glob_match", "glob_regex"]


@functools.lru_cache(maxsize=1024)
def glob_regex(pattern: str, casefold: bool = False) -> re.Pattern[str]:
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            while i < n and pattern[i] == "*":
                i += 1
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "\\" and i < n:
            out.append(re.escape(pattern[i]))
            i += 1
        elif c == "[":
            j = i
            negate = j < n and pattern[j] in "!^"
            if negate:
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a literal '['
                out.append(re.escape(c))
                continue
            body = pattern[i + (1 if negate else 0) : j]
            i = j + 1
            parts: list[str] = []
            k = 0
            while k < len(body):
                if k + 2 < len(body) and body[k + 1] == "-":
                    lo, hi = body[k], body[k + 2]
                    if lo <= hi:
                        parts.append(f"{re.escape(lo)}-{re.escape(hi)}")
                    k += 3
                else:
                    parts.append(re.escape(body[k]))
                    k += 1
            cls = "".join(parts)
            if not cls:
                out.append("[^\\s\\S]" if not negate else "[\\s\\S]")
            else:
                out.append(("[^" if negate else "[") + cls + "]")
        else:
            out.append(re.escape(c))
    flags = re.DOTALL | (re.IGNORECASE if casefold else 0)
    return re.compile("".join(out), flags)


def glob_match(pattern: str, text: str, casefold: bool = False) -> bool:
    """``fnmatch(pattern, text, casefold ? FNM_CASEFOLD : 0) == 0``."""
    return glob_regex(pattern, casefold).fullmatch(text) is not None
