"""Rule-by-rule tests of the CARP state machine (carpool.carp.machine)."""

from __future__ import annotations

import itertools
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

import pytest

from carpool.carp.config import CarpConfig, InterfaceConfig, VhidConfig
from carpool.carp.machine import (
    LEAVE_ADVBASE,
    LEAVE_ADVSKEW,
    Action,
    Announce,
    CarpHost,
    CarpState,
    DemotionChanged,
    ReceivedAdvert,
    ReleaseAddresses,
    SendAdvert,
    StateChanged,
    TakeAddresses,
    advert_interval,
    advertised_skew,
    master_down_interval,
)
from carpool.errors import CommandError

VIP = IPv4Interface("10.0.0.100/32")
VIP2 = IPv4Interface("10.0.0.101/32")
VIP6 = IPv6Interface("2001:db8::100/64")
PEER = IPv4Address("10.0.0.2")
INIT, BACKUP, MASTER = CarpState.INIT, CarpState.BACKUP, CarpState.MASTER


def vhid(
    number: int = 1,
    *,
    advskew: int = 0,
    advbase: int = 1,
    ifname: str = "em0",
    addresses: tuple[IPv4Interface | IPv6Interface, ...] = (VIP,),
    password: bytes = b"secret",
) -> VhidConfig:
    return VhidConfig(
        ifname=ifname,
        vhid=number,
        advbase=advbase,
        advskew=advskew,
        password=password,
        addresses=addresses,
    )


def config(*vhids: VhidConfig, preempt: bool = False, demotion: int = 0) -> CarpConfig:
    return CarpConfig(vhids=vhids or (vhid(),), preempt=preempt, demotion=demotion)


def host_up(*vhids: VhidConfig, preempt: bool = False, demotion: int = 0) -> CarpHost:
    """A host whose interfaces all came up at t=0."""
    cfg = config(*vhids, preempt=preempt, demotion=demotion)
    host = CarpHost(cfg, 0.0)
    for ifname in cfg.ifnames:
        host.link_changed(ifname, True, 0.0)
    return host


def master(*vhids: VhidConfig, preempt: bool = False, demotion: int = 0) -> CarpHost:
    """A host whose vhids are all MASTER at t=10 (timed out at their deadline)."""
    host = host_up(*vhids, preempt=preempt, demotion=demotion)
    host.advance(10.0)
    assert all(s.state is MASTER for s in host.status())
    return host


def advert(
    advbase: int = 1, advskew: int = 0, *, number: int = 1, demote: int = 0, ifname: str = "em0"
) -> ReceivedAdvert:
    return ReceivedAdvert(
        ifname=ifname, vhid=number, advbase=advbase, advskew=advskew, demote=demote, source=PEER
    )


def kinds(actions: list[Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


def changes(actions: list[Action]) -> list[tuple[CarpState, CarpState, str]]:
    return [(a.old, a.new, a.reason) for a in actions if isinstance(a, StateChanged)]


def adverts(actions: list[Action]) -> list[SendAdvert]:
    return [a for a in actions if isinstance(a, SendAdvert)]


# -- timing formulas ---------------------------------------------------------


def test_timing_formulas_follow_freebsd_and_openbsd() -> None:
    assert advert_interval(1, 0) == 1.0
    assert advert_interval(1, 128) == 1.5
    assert advert_interval(0, 64) == 0.25  # OpenBSD sub-second mode
    assert advert_interval(0, 0) == 1 / 256
    assert master_down_interval(1, 100) == 3 + 100 / 256
    assert master_down_interval(2, 0) == 6.0
    assert master_down_interval(0, 100) == 300 / 256
    assert master_down_interval(0, 0) == 3 / 256


@pytest.mark.parametrize(
    ("advskew", "demotion", "expected"),
    [
        (0, 0, 0),
        (100, 0, 100),
        (100, 100, 200),
        (200, 100, 240),
        (250, 0, 240),
        (10, -50, 0),
        (254, -20, 234),
        (0, 240, 240),
    ],
)
def test_advertised_skew_is_clamped_like_demote_advskew(
    advskew: int, demotion: int, expected: int
) -> None:
    assert advertised_skew(advskew, demotion) == expected


# -- INIT and BACKUP ---------------------------------------------------------------


def test_new_host_is_init_with_no_timer() -> None:
    host = CarpHost(config(), 5.0)
    assert [s.state for s in host.status()] == [INIT]
    assert host.next_deadline() is None
    assert host.advance(100.0) == []
    assert host.link_state("em0") is None


def test_link_up_completes_initialization() -> None:
    host = CarpHost(config(vhid(advskew=100)), 0.0)
    actions = host.link_changed("em0", True, 2.0)
    assert actions == [StateChanged("em0", 1, INIT, BACKUP, "initialization complete")]
    assert host.next_deadline() == pytest.approx(2.0 + 3 + 100 / 256)
    status = host.status()[0]
    assert status.master_down_at == host.next_deadline()
    assert status.next_advert_at is None


def test_repeated_link_reports_are_ignored() -> None:
    host = host_up()
    assert host.link_changed("em0", True, 1.0) == []
    assert host.link_changed("em1", True, 1.0) == []  # no vhid there


def test_adverts_in_init_and_for_unknown_vhids_are_ignored() -> None:
    host = CarpHost(config(), 0.0)
    assert host.advert_received(advert(), 1.0) == []
    host = host_up()
    assert host.advert_received(advert(number=9), 1.0) == []
    assert host.advert_received(advert(ifname="em9"), 1.0) == []


def test_master_down_timer_makes_a_master() -> None:
    host = host_up(vhid(advskew=10, addresses=(VIP, VIP6)))
    deadline = host.next_deadline()
    assert deadline is not None
    assert host.advance(deadline - 0.001) == []
    actions = host.advance(deadline)
    assert kinds(actions) == ["StateChanged", "SendAdvert", "TakeAddresses"]
    assert changes(actions) == [(BACKUP, MASTER, "master timed out")]
    send = adverts(actions)[0]
    assert (send.advbase, send.advskew, send.demote) == (1, 10, 0)
    assert send.password == b"secret" and send.addresses == (VIP, VIP6)
    assert actions[2] == TakeAddresses("em0", 1, (VIP, VIP6))
    assert host.next_deadline() == pytest.approx(deadline + 1 + 10 / 256)


def test_backup_restarts_its_timer_on_a_valid_advert() -> None:
    host = host_up(vhid(advskew=100))
    assert host.advert_received(advert(advskew=0), 2.0) == []
    assert host.next_deadline() == pytest.approx(2.0 + 3 + 100 / 256)
    # a slower master without preempt: still only a timer restart
    assert host.advert_received(advert(advskew=200), 3.0) == []
    assert host.next_deadline() == pytest.approx(3.0 + 3 + 100 / 256)


def test_backup_timer_uses_its_own_configured_skew_not_the_demoted_one() -> None:
    host = host_up(vhid(advskew=10), demotion=100)
    assert host.next_deadline() == pytest.approx(3 + 10 / 256)
    assert host.status()[0].advertised_skew == 110


def test_preempt_takes_over_a_slower_master() -> None:
    host = host_up(vhid(advskew=50), preempt=True)
    actions = host.advert_received(advert(advskew=100), 1.0)
    assert changes(actions) == [(BACKUP, MASTER, "preempting a slower master")]
    assert kinds(actions) == ["StateChanged", "SendAdvert", "TakeAddresses"]


def test_preempt_does_not_take_over_an_equal_or_faster_master() -> None:
    host = host_up(vhid(advskew=50), preempt=True)
    assert host.advert_received(advert(advskew=50), 1.0) == []
    assert host.advert_received(advert(advskew=49), 1.0) == []
    assert host.advert_received(advert(advbase=0, advskew=255), 1.0) == []  # 255/256 < 1 + 50/256
    assert host.state("em0", 1) is BACKUP


def test_preempt_compares_with_the_demoted_skew() -> None:
    host = host_up(vhid(advskew=0), preempt=True, demotion=240)
    assert host.advert_received(advert(advskew=100), 1.0) == []
    assert host.state("em0", 1) is BACKUP


def test_leave_advert_is_an_instant_takeover_without_preempt() -> None:
    host = host_up(vhid(advskew=100))
    actions = host.advert_received(advert(LEAVE_ADVBASE, LEAVE_ADVSKEW), 1.0)
    assert changes(actions) == [(BACKUP, MASTER, "master will time out")]


def test_master_will_time_out_threshold_is_three_advbase() -> None:
    host = host_up(vhid(advskew=0))
    # 3*1 + 0/256 s vs a master advertising every 3 s + 1/256 s: it will time out
    actions = host.advert_received(advert(3, 1), 1.0)
    assert changes(actions) == [(BACKUP, MASTER, "master will time out")]
    host = host_up(vhid(advskew=0))
    assert host.advert_received(advert(3, 0), 1.0) == []  # exactly 3 s: not strictly slower


def test_master_will_time_out_uses_the_demoted_skew_like_freebsd() -> None:
    host = host_up(vhid(advskew=0), demotion=100)
    assert host.advert_received(advert(3, 100), 1.0) == []
    assert host.state("em0", 1) is BACKUP
    actions = host.advert_received(advert(3, 101), 1.0)
    assert changes(actions) == [(BACKUP, MASTER, "master will time out")]


def test_large_advbase_backups_do_not_honour_the_leave_advert_early() -> None:
    # 3*86 s > 255 + 255/256 s: FreeBSD's rule does not fire, the backup waits
    host = host_up(vhid(advbase=86))
    assert host.advert_received(advert(LEAVE_ADVBASE, LEAVE_ADVSKEW), 1.0) == []
    assert host.state("em0", 1) is BACKUP


# -- MASTER ---------------------------------------------------------------------


def test_master_advertises_periodically_with_the_advertised_skew() -> None:
    host = master(vhid(advskew=20), demotion=30)
    start = host.next_deadline()
    assert start is not None
    times = []
    for _ in range(4):
        deadline = host.next_deadline()
        assert deadline is not None
        actions = host.advance(deadline)
        assert [(a.advbase, a.advskew) for a in adverts(actions)] == [(1, 50)]
        times.append(deadline)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == pytest.approx([1 + 50 / 256] * 3)
    assert host.status()[0].next_advert_at == host.next_deadline()


def test_master_yields_to_a_more_frequent_advert() -> None:
    host = master(vhid(advskew=100, addresses=(VIP, VIP2)))
    actions = host.advert_received(advert(advskew=50), 20.0)
    assert actions == [
        StateChanged("em0", 1, MASTER, BACKUP, "more frequent advertisement received"),
        ReleaseAddresses("em0", 1, (VIP, VIP2)),
    ]
    assert host.next_deadline() == pytest.approx(20.0 + 3 + 100 / 256)


def test_master_yields_on_a_tie() -> None:
    host = master(vhid(advskew=100))
    actions = host.advert_received(advert(advskew=100), 20.0)
    assert changes(actions) == [(MASTER, BACKUP, "more frequent advertisement received")]


def test_master_compares_with_its_demoted_skew() -> None:
    host = master(vhid(advskew=0), demotion=240)
    actions = host.advert_received(advert(advskew=200), 20.0)
    assert changes(actions) == [(MASTER, BACKUP, "more frequent advertisement received")]


def test_master_keeps_mastership_against_a_slower_master_and_reasserts() -> None:
    host = master(vhid(advskew=0, addresses=(VIP, VIP2)))
    actions = host.advert_received(advert(advskew=100), 20.0)
    assert kinds(actions) == ["SendAdvert", "Announce"]
    assert actions[1] == Announce("em0", 1, (VIP, VIP2))
    assert host.state("em0", 1) is MASTER
    assert host.next_deadline() == pytest.approx(21.0)


# -- OpenBSD demote byte ------------------------------------------------------


def test_demoted_openbsd_master_is_taken_over_without_preempt() -> None:
    host = host_up(vhid(advskew=100))
    actions = host.advert_received(advert(advskew=0, demote=1), 1.0)
    assert changes(actions) == [(BACKUP, MASTER, "preempting a demoted master")]


def test_master_does_not_yield_to_a_demoted_openbsd_peer() -> None:
    host = master(vhid(advskew=100))
    actions = host.advert_received(advert(advskew=0, demote=5), 20.0)
    assert host.state("em0", 1) is MASTER
    assert kinds(actions) == ["SendAdvert", "Announce"]
    assert all(a.demote == 0 for a in adverts(actions))


# -- advbase 0 (OpenBSD sub-second mode) -------------------------------------------


def test_advbase_zero_timers() -> None:
    host = host_up(vhid(advbase=0, advskew=64))
    assert host.next_deadline() == pytest.approx(3 * 64 / 256)
    host.advance(1.0)
    assert host.state("em0", 1) is MASTER
    assert host.next_deadline() == pytest.approx(1.0 + 64 / 256)
    host = host_up(vhid(advbase=0, advskew=0))
    assert host.next_deadline() == pytest.approx(3 / 256)
    host.advance(1.0)
    assert host.next_deadline() == pytest.approx(1.0 + 1 / 256)


def test_advbase_zero_backup_honours_the_leave_advert() -> None:
    host = host_up(vhid(advbase=0, advskew=100))
    assert host.advert_received(advert(0, 0), 0.1) == []
    actions = host.advert_received(advert(LEAVE_ADVBASE, LEAVE_ADVSKEW), 0.2)
    assert changes(actions) == [(BACKUP, MASTER, "master will time out")]


def test_advbase_zero_master_will_time_out_uses_the_real_timeout() -> None:
    host = host_up(vhid(advbase=0, advskew=50))  # times out after 150/256 s
    assert host.advert_received(advert(0, 150), 0.1) == []
    actions = host.advert_received(advert(0, 151), 0.2)
    assert changes(actions) == [(BACKUP, MASTER, "master will time out")]


# -- links and demotion ------------------------------------------------------------


def test_link_down_goes_init_releases_and_demotes_and_masters_elsewhere_advertise() -> None:
    host = master(vhid(1, ifname="em0"), vhid(2, ifname="em1", advskew=10), preempt=True)
    actions = host.link_changed("em0", False, 20.0)
    assert actions[:3] == [
        StateChanged("em0", 1, MASTER, INIT, "hardware interface down"),
        ReleaseAddresses("em0", 1, (VIP,)),
        DemotionChanged(0, 240, "interface down"),
    ]
    assert [(a.ifname, a.vhid, a.advskew) for a in adverts(actions)] == [("em1", 2, 240)]
    assert host.demotion == 240
    assert host.status()[0].state is INIT and host.status()[0].master_down_at is None

    actions = host.link_changed("em0", True, 30.0)
    assert actions[:2] == [
        StateChanged("em0", 1, INIT, BACKUP, "initialization complete"),
        DemotionChanged(240, 0, "interface up"),
    ]
    assert [(a.ifname, a.vhid, a.advskew) for a in adverts(actions)] == [("em1", 2, 10)]
    assert host.demotion == 0


def test_link_down_demotes_once_per_vhid() -> None:
    host = host_up(vhid(1), vhid(2, addresses=(VIP2,)))
    actions = host.link_changed("em0", False, 1.0)
    assert [a for a in actions if isinstance(a, DemotionChanged)] == [
        DemotionChanged(0, 240, "interface down"),
        DemotionChanged(240, 480, "interface down"),
    ]
    assert host.link_changed("em0", False, 2.0) == []
    host.link_changed("em0", True, 3.0)
    assert host.demotion == 0


def test_link_known_down_at_start_demotes_like_freebsd_attach() -> None:
    host = CarpHost(config(), 0.0)
    actions = host.link_changed("em0", False, 0.0)
    assert actions == [DemotionChanged(0, 240, "interface down")]
    assert host.state("em0", 1) is INIT


def test_ifdown_factor_is_configurable_and_zero_disables_it() -> None:
    cfg = replace(config(), ifdown_demotion_factor=0)
    host = CarpHost(cfg, 0.0)
    assert host.link_changed("em0", False, 0.0) == []
    cfg = replace(config(), ifdown_demotion_factor=50)
    host = CarpHost(cfg, 0.0)
    assert host.link_changed("em0", False, 0.0) == [DemotionChanged(0, 50, "interface down")]


def test_adjust_demotion_makes_masters_advertise_at_once() -> None:
    host = master(vhid(1, advskew=5), vhid(2, ifname="em1"))
    host.force_state("em1", 2, BACKUP, 10.5)
    actions = host.adjust_demotion(50, "sysctl", 11.0)
    assert actions[0] == DemotionChanged(0, 50, "sysctl")
    assert [(a.vhid, a.advskew) for a in adverts(actions)] == [(1, 55)]
    assert host.next_deadline() == pytest.approx(11.0 + 1 + 55 / 256)
    assert host.adjust_demotion(0, "sysctl", 12.0) == []
    actions = host.adjust_demotion(-100, "sysctl", 12.0)
    assert actions[0] == DemotionChanged(50, -50, "sysctl")
    assert [(a.vhid, a.advskew) for a in adverts(actions)] == [(1, 0)]


def test_allow_off_acts_like_link_down_for_every_vhid() -> None:
    host = master(vhid(1), vhid(2, ifname="em1"))
    actions = host.set_allow(False, 20.0)
    assert [c[1] for c in changes(actions)] == [INIT, INIT]
    assert host.demotion == 480
    assert host.set_allow(False, 21.0) == []
    actions = host.set_allow(True, 22.0)
    assert [c[1] for c in changes(actions)] == [BACKUP, BACKUP]
    assert host.demotion == 0


def test_allow_off_in_the_configuration_keeps_everything_init() -> None:
    host = CarpHost(replace(config(), allow=False), 0.0)
    # FreeBSD's carp_sc_state treats allow=0 like a down link, demotion included
    assert host.link_changed("em0", True, 0.0) == [DemotionChanged(0, 240, "interface down")]
    assert host.state("em0", 1) is INIT
    assert host.advance(100.0) == []


# -- send errors -----------------------------------------------------------------


def test_three_send_errors_demote_and_three_successes_undo() -> None:
    host = master(vhid(1), vhid(2, ifname="em1"))
    assert host.send_failed("em0", 1, 11.0) == []
    assert host.send_failed("em0", 1, 12.0, error=101) == []
    actions = host.send_failed("em0", 1, 13.0, error=101)
    assert actions[0] == DemotionChanged(0, 240, "send error 101 on em0")
    assert sorted(a.vhid for a in adverts(actions)) == [1, 2]
    assert host.send_failed("em0", 1, 14.0) == []  # no second demotion
    assert host.send_succeeded("em0", 1, 15.0) == []
    assert host.send_succeeded("em0", 1, 16.0) == []
    actions = host.send_succeeded("em0", 1, 17.0)
    assert actions[0] == DemotionChanged(240, 0, "send ok on em0")
    assert host.send_succeeded("em0", 1, 18.0) == []


def test_an_error_resets_the_success_count() -> None:
    host = master()
    for t in (11.0, 12.0, 13.0):
        host.send_failed("em0", 1, t)
    host.send_succeeded("em0", 1, 14.0)
    host.send_succeeded("em0", 1, 15.0)
    host.send_failed("em0", 1, 16.0)
    assert host.send_succeeded("em0", 1, 17.0) == []
    assert host.send_succeeded("em0", 1, 18.0) == []
    assert host.demotion == 240
    assert host.send_succeeded("em0", 1, 19.0)[0] == DemotionChanged(240, 0, "send ok on em0")


def test_fewer_than_three_errors_then_successes_never_demote() -> None:
    host = master()
    host.send_failed("em0", 1, 11.0)
    host.send_failed("em0", 1, 12.0)
    for t in (13.0, 14.0, 15.0):
        assert host.send_succeeded("em0", 1, t) == []
    assert host.demotion == 0
    assert host.send_failed("em9", 1, 16.0) == []  # unknown vhid: ignored


# -- operator commands -------------------------------------------------------------


def test_force_state_follows_freebsd_and_bows_out() -> None:
    host = CarpHost(config(), 0.0)
    assert host.force_state("em0", 1, MASTER, 0.0) == []  # INIT: nothing happens
    host.link_changed("em0", True, 0.0)
    actions = host.force_state("em0", 1, MASTER, 1.0)
    assert changes(actions) == [(BACKUP, MASTER, "user requested via ifconfig")]
    assert kinds(actions) == ["StateChanged", "SendAdvert", "TakeAddresses"]
    assert host.force_state("em0", 1, MASTER, 1.5) == []
    actions = host.force_state("em0", 1, BACKUP, 2.0)
    leave = adverts(actions)
    assert [(a.advbase, a.advskew, a.leaving) for a in leave] == [(255, 255, True)]
    assert actions[1:] == [
        StateChanged("em0", 1, MASTER, BACKUP, "user requested via ifconfig"),
        ReleaseAddresses("em0", 1, (VIP,)),
    ]
    assert host.next_deadline() == pytest.approx(5.0)
    with pytest.raises(CommandError):
        host.force_state("em0", 1, INIT, 3.0)
    with pytest.raises(CommandError, match="vhid 7 is not configured on em0"):
        host.force_state("em0", 7, MASTER, 3.0)


def test_set_advskew_and_advbase() -> None:
    host = master(vhid(advskew=0))
    actions = host.set_advskew("em0", 1, 100, 20.0)
    assert [(a.advbase, a.advskew) for a in adverts(actions)] == [(1, 100)]
    assert host.status()[0].advskew == 100
    actions = host.set_advbase("em0", 1, 2, 21.0)
    assert [(a.advbase, a.advskew) for a in adverts(actions)] == [(2, 100)]
    assert host.next_deadline() == pytest.approx(21.0 + 2 + 100 / 256)
    for bad in (-1, 255):
        with pytest.raises(CommandError):
            host.set_advskew("em0", 1, bad, 22.0)
    with pytest.raises(CommandError):
        host.set_advbase("em0", 1, 256, 22.0)
    backup = host_up(vhid(advskew=100))
    assert backup.set_advskew("em0", 1, 0, 1.0) == []
    # the seed's "attract traffic" recipe: the new skew wins the next comparison
    backup.set_preempt(True)
    assert backup.preempt is True
    actions = backup.advert_received(advert(advskew=100), 2.0)
    assert changes(actions) == [(BACKUP, MASTER, "preempting a slower master")]


# -- reconfigure and shutdown -----------------------------------------------------------


def test_reconfigure_keeps_unchanged_vhids_and_adds_new_ones() -> None:
    old = config(vhid(1))
    host = CarpHost(old, 0.0)
    host.link_changed("em0", True, 0.0)
    host.advance(5.0)
    deadline = host.next_deadline()
    new = config(vhid(1), vhid(2, addresses=(VIP2,)), preempt=True)
    actions = host.reconfigure(new, 5.5)
    assert actions == [StateChanged("em0", 2, INIT, BACKUP, "initialization complete")]
    assert host.state("em0", 1) is MASTER
    assert host.status()[0].next_advert_at == deadline
    assert host.preempt is True
    assert host.reconfigure(new, 6.0) == []


def test_reconfigure_new_vhid_on_a_down_link_is_demoted() -> None:
    host = host_up(vhid(1))
    host.link_changed("em1", False, 1.0)
    actions = host.reconfigure(config(vhid(1), vhid(2, ifname="em1", addresses=(VIP2,))), 2.0)
    assert actions == [DemotionChanged(0, 240, "interface down")]


def test_reconfigure_removing_a_master_bows_out() -> None:
    host = master(vhid(1), vhid(2, addresses=(VIP2,)))
    actions = host.reconfigure(config(vhid(1)), 20.0)
    assert kinds(actions) == ["SendAdvert", "StateChanged", "ReleaseAddresses"]
    leave = adverts(actions)[0]
    assert (leave.vhid, leave.advbase, leave.advskew, leave.leaving) == (2, 255, 255, True)
    assert leave.addresses == (VIP2,)
    assert changes(actions) == [(MASTER, INIT, "vhid removed")]
    assert actions[2] == ReleaseAddresses("em0", 2, (VIP2,))
    assert [s.vhid for s in host.status()] == [1]


def test_reconfigure_removing_a_demoted_vhid_takes_its_demotion_back() -> None:
    host = master(vhid(1), vhid(2, ifname="em1", addresses=(VIP2,)))
    host.link_changed("em1", False, 20.0)
    assert host.demotion == 240
    actions = host.reconfigure(config(vhid(1)), 21.0)
    assert DemotionChanged(240, 0, "vhid removed") in actions
    assert host.demotion == 0


def test_reconfigure_changed_addresses_on_a_master() -> None:
    host = master(vhid(1, addresses=(VIP, VIP2)))
    new_vip = IPv4Interface("10.0.0.102/32")
    actions = host.reconfigure(config(vhid(1, addresses=(VIP, new_vip))), 20.0)
    assert actions[:2] == [
        ReleaseAddresses("em0", 1, (VIP2,)),
        TakeAddresses("em0", 1, (VIP, new_vip)),
    ]
    assert adverts(actions)[0].addresses == (VIP, new_vip)
    assert host.state("em0", 1) is MASTER


def test_reconfigure_changed_settings_replace_runtime_overrides() -> None:
    host = master(vhid(1, advskew=0))
    host.set_advskew("em0", 1, 77, 20.0)
    host.reconfigure(config(vhid(1, advskew=10, password=b"other")), 21.0)
    status = host.status()[0]
    assert (status.state, status.advskew) == (MASTER, 10)


def test_reconfigure_applies_the_demotion_difference() -> None:
    host = master(vhid(1))
    host.adjust_demotion(5, "sysctl", 20.0)
    actions = host.reconfigure(config(vhid(1), demotion=20), 21.0)
    assert actions[0] == DemotionChanged(5, 25, "configuration reloaded")
    assert host.demotion == 25


def test_shutdown_bows_out_and_goes_silent() -> None:
    host = master(vhid(1), vhid(2, ifname="em1", addresses=(VIP2,)))
    host.force_state("em1", 2, BACKUP, 10.5)
    actions = host.shutdown(11.0)
    assert actions == [
        SendAdvert("em0", 1, 255, 255, 0, b"secret", (VIP,)),
        StateChanged("em0", 1, MASTER, INIT, "leaving"),
        ReleaseAddresses("em0", 1, (VIP,)),
        StateChanged("em1", 2, BACKUP, INIT, "leaving"),
    ]
    assert host.stopped
    assert host.next_deadline() is None
    assert host.advance(100.0) == []
    assert host.link_changed("em0", False, 100.0) == []
    assert host.advert_received(advert(), 100.0) == []
    assert host.adjust_demotion(5, "x", 100.0) == []
    assert host.shutdown(101.0) == []


def test_status_reports_configuration_and_timers() -> None:
    peer_config = replace(vhid(3, advskew=200), peer=IPv4Address("192.0.2.2"))
    host = host_up(peer_config, demotion=100)
    (status,) = host.status()
    assert (status.ifname, status.vhid, status.state) == ("em0", 3, BACKUP)
    assert (status.advbase, status.advskew, status.advertised_skew) == (1, 200, 240)
    assert status.addresses == (VIP,)
    assert status.peer == IPv4Address("192.0.2.2") and status.peer6 is None


def test_advance_fires_due_timers_in_order_and_only_once() -> None:
    host = host_up(vhid(1, advskew=50), vhid(2, advskew=10, addresses=(VIP2,)))
    actions = host.advance(100.0)
    assert [c.vhid for c in actions if isinstance(c, StateChanged)] == [2, 1]
    assert len(adverts(actions)) == 2
    deadline = host.next_deadline()
    assert deadline is not None and deadline > 100.0


# -- ties and own adverts --------------------------------------------------------------


def test_tie_without_a_known_local_address_backs_off_like_freebsd() -> None:
    host = master(vhid(advskew=7))
    actions = host.advert_received(advert(advskew=7), 20.0)
    assert changes(actions) == [(MASTER, BACKUP, "more frequent advertisement received")]


def test_tie_is_won_by_the_lower_address() -> None:
    lower, higher = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.9")
    host = master(vhid(advskew=7))
    tie = replace(advert(advskew=7), source=higher, local=lower)
    assert kinds(host.advert_received(tie, 20.0)) == ["SendAdvert", "Announce"]
    assert host.state("em0", 1) is MASTER
    tie = replace(advert(advskew=7), source=lower, local=higher)
    assert changes(host.advert_received(tie, 21.0)) == [
        (MASTER, BACKUP, "more frequent advertisement received")
    ]


def test_tie_break_falls_back_to_the_configured_interface_address() -> None:
    cfg = replace(
        config(vhid(advskew=7)),
        interfaces=(InterfaceConfig("em0", (IPv4Interface("10.0.0.1/24"),)),),
    )
    host = CarpHost(cfg, 0.0)
    host.link_changed("em0", True, 0.0)
    host.advance(10.0)
    assert kinds(host.advert_received(advert(advskew=7), 20.0)) == ["SendAdvert", "Announce"]
    # an IPv6 advert finds no IPv6 address of ours: FreeBSD's rule
    v6 = replace(advert(advskew=7), source=IPv6Address("fe80::2"))
    assert changes(host.advert_received(v6, 21.0))[0][1] is BACKUP


def test_own_looped_back_advert_is_ignored() -> None:
    host = master(vhid(advskew=7))
    echo = replace(advert(advskew=7), local=PEER)
    assert host.advert_received(echo, 20.0) == []
    assert host.state("em0", 1) is MASTER


def test_local_address_of_the_other_family_is_not_used() -> None:
    host = master(vhid(advskew=7))
    tie = replace(advert(advskew=7), local=IPv6Address("2001:db8::1"))
    assert changes(host.advert_received(tie, 20.0))[0][1] is BACKUP


# -- demotion bookkeeping -------------------------------------------------------------


def test_demotion_is_taken_back_exactly_after_a_factor_change() -> None:
    host = master(vhid(1), vhid(2, ifname="em1", addresses=(VIP2,)))
    host.link_changed("em1", False, 20.0)
    assert host.demotion == 240
    host.reconfigure(
        replace(
            config(vhid(1), vhid(2, ifname="em1", addresses=(VIP2,))), ifdown_demotion_factor=50
        ),
        21.0,
    )
    host.link_changed("em1", True, 22.0)
    assert host.demotion == 0
    host.link_changed("em1", False, 23.0)
    assert host.demotion == 50


def test_reconfigure_allow_off_and_on() -> None:
    host = master(vhid(1))
    actions = host.reconfigure(replace(config(vhid(1)), allow=False), 20.0)
    assert changes(actions) == [(MASTER, INIT, "hardware interface down")]
    assert host.allow is False
    actions = host.reconfigure(config(vhid(1)), 21.0)
    assert changes(actions) == [(INIT, BACKUP, "initialization complete")]
    assert host.demotion == 0


def test_reconfigure_removing_a_backup_and_an_init_vhid() -> None:
    host = CarpHost(config(vhid(1), vhid(2, addresses=(VIP2,)), vhid(3, ifname="em9")), 0.0)
    host.link_changed("em0", True, 0.0)  # em9 never reported: vhid 3 stays INIT
    actions = host.reconfigure(config(vhid(1)), 1.0)
    assert actions == [StateChanged("em0", 2, BACKUP, INIT, "vhid removed")]


def test_machines_and_views() -> None:
    host = host_up(vhid(1), vhid(2, addresses=(VIP2,)))
    assert [m.key for m in host.machines()] == [("em0", 1), ("em0", 2)]
    assert repr(host.machines()[0]) == "<VhidMachine 1@em0 BACKUP>"
    assert host.config.vhids[0].vhid == 1
    assert host.link_state("em0") is True
    with pytest.raises(CommandError):
        host.state("em0", 9)
