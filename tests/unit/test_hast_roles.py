"""hastctl role / create: allowed transitions, metadata effects and refusals."""

from __future__ import annotations

import itertools

import pytest

from carpool.hast.common import Role
from carpool.hast.metadata import Metadata
from carpool.hast.roles import RoleError, change_role, check_create, parse_role

MD = Metadata("shared", 1 << 20, 65536, localoff=4608)


def _never() -> int:
    raise AssertionError("no resuid should be generated")


@pytest.mark.parametrize(("old", "new"), list(itertools.permutations(list(Role), 2)))
def test_every_role_may_go_to_every_other(old: Role, new: Role) -> None:
    ch = change_role("shared", old, new, MD.replace(resuid=7), new_resuid=_never)
    assert ch.changed and ch.old is old and ch.new is new
    assert ch.event == ("role", "shared", old.value, new.value)
    if new is Role.INIT:
        assert ch.metadata is None and ch.worker is None
    else:
        assert ch.metadata is not None and ch.metadata.prevrole is new
        assert ch.worker is new and ch.start_now == (new is Role.PRIMARY)
        assert (ch.metadata.localcnt, ch.metadata.remotecnt) == (0, 0)


@pytest.mark.parametrize("role", list(Role))
def test_same_role_is_a_no_op(role: Role) -> None:
    ch = change_role("shared", role, role.value, MD, new_resuid=_never)
    assert not ch.changed and ch.metadata is None and ch.event == ()


def test_first_primary_gets_a_resuid_and_is_virgin() -> None:
    ch = change_role("shared", Role.INIT, Role.PRIMARY, MD, new_resuid=lambda: 0xABCDEF)
    assert ch.metadata is not None and ch.metadata.resuid == 0xABCDEF and ch.virgin
    again = change_role("shared", Role.INIT, Role.PRIMARY, ch.metadata, new_resuid=_never)
    assert again.metadata is not None and again.metadata.resuid == 0xABCDEF and not again.virgin
    # a fresh secondary keeps resuid 0 (it adopts the primary's at connect)
    sec = change_role("shared", Role.INIT, Role.SECONDARY, MD, new_resuid=_never)
    assert sec.metadata is not None and sec.metadata.resuid == 0 and not sec.virgin


def test_resuid_zero_from_the_generator_is_refused() -> None:
    with pytest.raises(RoleError, match="try again"):
        change_role("shared", Role.INIT, Role.PRIMARY, MD, new_resuid=lambda: 2**64)


def test_no_metadata_or_wrong_resource_is_refused() -> None:
    with pytest.raises(RoleError, match="hastctl create shared"):
        change_role("shared", Role.INIT, Role.PRIMARY, None, new_resuid=lambda: 1)
    with pytest.raises(RoleError, match="belongs to resource 'other'"):
        change_role("shared", Role.INIT, Role.SECONDARY, MD.replace(resource="other"),
                    new_resuid=lambda: 1)  # fmt: skip
    # going to init needs no metadata
    assert change_role("shared", Role.PRIMARY, Role.INIT, None, new_resuid=_never).changed


def test_unknown_role_word() -> None:
    assert parse_role("secondary") is Role.SECONDARY
    with pytest.raises(RoleError, match="use init, primary or secondary"):
        change_role("shared", Role.INIT, "master", MD, new_resuid=_never)


def test_create_only_in_init_and_the_split_brain_recovery_path() -> None:
    with pytest.raises(RoleError, match="hastctl role init shared"):
        check_create("shared", Role.PRIMARY)
    with pytest.raises(RoleError):
        check_create("shared", Role.SECONDARY)
    # the loser: role init, create (fresh metadata), role secondary
    loser = MD.replace(resuid=9, localcnt=4, remotecnt=2, prevrole=Role.PRIMARY)
    ch = change_role("shared", Role.PRIMARY, Role.INIT, loser, new_resuid=_never)
    check_create("shared", ch.new)
    fresh = Metadata("shared", MD.datasize, MD.extentsize, localoff=MD.localoff)
    ch = change_role("shared", Role.INIT, Role.SECONDARY, fresh, new_resuid=_never)
    assert ch.metadata is not None and ch.metadata.resuid == 0 and ch.metadata.localcnt == 0
