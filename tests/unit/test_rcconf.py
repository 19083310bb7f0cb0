"""rc.conf-style syntax (carpool.rcconf)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.errors import ConfigError
from carpool.rcconf import RcAssignment, effective_assignments, load_rcconf, parse_rcconf


def one(text: str) -> RcAssignment:
    (assignment,) = parse_rcconf(text, "rc.conf")
    return assignment


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_rcconf(text, "rc.conf")
    return info.value


def test_double_quoted_value_and_positions() -> None:
    assignment = one('ifconfig_em0="inet 10.0.0.1 netmask 255.255.255.0"')
    assert assignment.name == "ifconfig_em0"
    assert assignment.value == "inet 10.0.0.1 netmask 255.255.255.0"
    assert (assignment.path, assignment.line, assignment.column) == ("rc.conf", 1, 14)
    assert assignment.name_column == 1
    assert assignment.column_of(0) == 15  # the "i" of inet
    assert assignment.column_of(5) == 20  # the "1" of 10.0.0.1


def test_sysrc_prefix_as_the_guide_writes_it() -> None:
    text = 'sysrc ifconfig_em0_alias0="vhid 1 advskew 0 pass secretpass alias 10.0.0.100/32"'
    assignment = one(text)
    assert assignment.name == "ifconfig_em0_alias0"
    assert assignment.value == "vhid 1 advskew 0 pass secretpass alias 10.0.0.100/32"
    assert assignment.name_column == 7
    assert assignment.column == 27


def test_sysctl_lines() -> None:
    assert one("net.inet.carp.preempt=1") == RcAssignment(
        "net.inet.carp.preempt", "1", "rc.conf", 1, 23
    )
    assert one("sysrc net.inet.carp.preempt=1").value == "1"
    assert one("sysctl net.inet.carp.demotion=-240").value == "-240"
    assert one("dev.em.0.fc=3").name == "dev.em.0.fc"


def test_quoting_forms() -> None:
    assert one("pfsync_syncdev='em1'").value == "em1"
    assert one("pfsync_enable=YES").value == "YES"
    assert one("a='$literal \"x\"'").value == '$literal "x"'
    assert one('a="x\\"y\\\\z\\$"').value == 'x"y\\z$'
    assert one('a="keep \\n"').value == "keep \\n"  # sh keeps unknown escapes in "..."
    assert one("a=one\\ two").value == "one two"
    assert one("a=pre'mid'\"post\"").value == "premidpost"
    assert one("a=").value == ""
    assert one('a=""').value == ""
    assert one("a=x#not-a-comment").value == "x#not-a-comment"
    assert one("a=cost$").value == "cost$"  # a lone $ is literal in sh


def test_positions_follow_escapes() -> None:
    assignment = one('x="a\\"b"')
    assert assignment.value == 'a"b'
    assert [assignment.column_of(i) for i in range(3)] == [4, 6, 7]
    assert assignment.column_of(99) == 8


def test_comments_blank_lines_and_trailing_comments() -> None:
    text = """
# a comment
   # indented comment

ifconfig_em0="up"   # trailing comment
sysrc a=1 # another
"""
    assignments = parse_rcconf(text)
    assert [(a.name, a.value, a.line) for a in assignments] == [
        ("ifconfig_em0", "up", 5),
        ("a", "1", 6),
    ]
    assert assignments[0].path == "<string>"


def test_several_assignments_on_one_line() -> None:
    assignments = parse_rcconf("sysrc pfsync_enable=YES pfsync_syncdev=em1")
    assert [(a.name, a.value, a.column) for a in assignments] == [
        ("pfsync_enable", "YES", 21),
        ("pfsync_syncdev", "em1", 40),
    ]


def test_crlf_line_endings() -> None:
    assignments = parse_rcconf("a=1\r\nb='2'\r\n")
    assert [(a.name, a.value, a.line) for a in assignments] == [("a", "1", 1), ("b", "2", 2)]


def test_duplicates_are_kept_and_the_last_wins() -> None:
    assignments = parse_rcconf("a=1\nb=2\na=3\n")
    assert [a.value for a in assignments] == ["1", "2", "3"]
    winners = effective_assignments(assignments)
    assert list(winners) == ["b", "a"]
    assert (winners["a"].value, winners["a"].line) == ("3", 3)


@pytest.mark.parametrize(
    ("text", "column", "token", "message"),
    [
        ('a="unterminated', 3, '"unterminated', "unterminated double quote"),
        ("a='unterminated", 3, "'unterminated", "unterminated single quote"),
        ('a="vhid 1 pass secret', 3, '"vhid', "unterminated double quote"),
        ("  sysrc", 3, "sysrc", "sysrc needs NAME=value"),
        ("echo 'x' >> /etc/sysctl.conf", 1, "echo", "expected NAME=value"),
        ("1abc=2", 1, "1abc", "bad variable name"),
        ("if-em0=2", 1, "if-em0", "bad variable name"),
        ("=2", 1, "=2", "needs a name"),
        ("a = 1", 1, "a", "spaces around '='"),
        ("a=1 b", 5, "b", "expected NAME=value"),
        ("a=$HOME", 3, "$HOME", "shell expansion"),
        ('a="${x}"', 4, '${x}"', "shell expansion"),
        ("a=`id`", 3, "`id`", "shell expansion"),
        ("a=1;b=2", 4, ";", "shell syntax"),
        ("a=x\\", 4, "\\", "line continuation"),
    ],
)
def test_errors_point_at_the_offending_token(
    text: str, column: int, token: str, message: str
) -> None:
    exc = error("\n" + text)
    assert (exc.path, exc.line, exc.column, exc.token) == ("rc.conf", 2, column, token)
    assert message in exc.message
    assert str(exc).startswith(f"rc.conf:2:{column}: ")


def test_assignment_error_helper() -> None:
    assignment = one('ifconfig_em0_alias0="vhid 1 bogus"')
    exc = assignment.error("bad word", offset=7, token="bogus")
    assert (exc.line, exc.column, exc.token) == (1, 29, "bogus")
    assert assignment.error("whole value").column == 21


def test_load_rcconf(tmp_path: Path) -> None:
    path = tmp_path / "rc.conf"
    path.write_text('ifconfig_em0="up"\n', encoding="utf-8")
    (assignment,) = load_rcconf(str(path))
    assert assignment.path == str(path)
    with pytest.raises(ConfigError, match="cannot read the file") as info:
        load_rcconf(str(tmp_path / "missing.conf"))
    assert info.value.path == str(tmp_path / "missing.conf")
    path.write_bytes(b"a=\xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_rcconf(str(path))


names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)
plain_values = st.text(alphabet=st.characters(blacklist_characters="\n'"), max_size=30)


@given(st.lists(st.tuples(names, plain_values), max_size=6))
def test_single_quoted_values_round_trip(pairs: list[tuple[str, str]]) -> None:
    text = "\n".join(f"{name}='{value}'" for name, value in pairs)
    assignments = parse_rcconf(text)
    assert [(a.name, a.value) for a in assignments] == pairs
    for assignment in assignments:
        for offset, char in enumerate(assignment.value):
            line = text.split("\n")[assignment.line - 1]
            assert line[assignment.column_of(offset) - 1] == char


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_garbage_only_raises_config_errors(text: str) -> None:
    try:
        parse_rcconf(text, "fuzz.conf")
    except ConfigError as exc:
        assert exc.path == "fuzz.conf"
        assert exc.line >= 1 and exc.column >= 1


@settings(max_examples=300)
@given(st.text(alphabet="ab_=.'\"\\$#` \t-19;\n", max_size=60))
def test_shell_like_garbage_only_raises_config_errors(text: str) -> None:
    try:
        parse_rcconf(text)
    except ConfigError as exc:
        assert exc.line >= 1 and exc.column >= 1
