"""The CARP state machine: every protocol decision carpd makes, and nothing else.

This module owns CARP's behaviour.  It is sans-I/O in the manner of h11: it
never reads a clock, never touches a socket, a file or an address.  The daemon
is only a caller: it feeds in what happened (an authenticated advert, a link
going up or down, a timer that came due, an operator command), always with the
current monotonic time ``now``, and performs the actions that come back, in
order.  It asks :meth:`CarpHost.next_deadline` when to call
:meth:`CarpHost.advance` next.

One :class:`CarpHost` per daemon holds one :class:`VhidMachine` per
(interface, vhid) and what FreeBSD keeps host-wide: ``preempt``, ``allow`` and
the demotion counter.  The rules are FreeBSD's ``ip_carp.c`` (``carp_input_c``,
``carp_setrun``, ``carp_master_down_locked``, ``carp_sc_state``,
``carp_send_ad_error``, ``carp_demote_adj``), with OpenBSD's additions where
FreeBSD has none:

* Timers.  A BACKUP declares the master dead after ``3*advbase + advskew/256``
  s using its *own configured* advskew.  A MASTER advertises every
  ``advbase + skew/256`` s where ``skew`` is the *advertised* skew.
* Advertised skew = ``advskew + demotion`` clamped to ``0..240``
  (FreeBSD's ``DEMOTE_ADVSKEW``).  The clamp applies even without demotion,
  exactly as in FreeBSD: a vhid configured with advskew 241..254 advertises
  240, while its own master-down timer still uses the configured value.
* Election on an advert, comparing intervals ``advbase*256 + skew`` exactly:
  a MASTER hearing an interval <= its own becomes BACKUP ("more frequent
  advertisement received"; for ties see below);
  a BACKUP with preempt hearing a slower master takes over ("preempting a
  slower master"); a BACKUP hearing an interval longer than
  ``3*advbase + skew/256`` (FreeBSD compares with its advertised skew here)
  takes over at once ("master will time out") -- this is what makes the
  advbase 255 / advskew 255 leave advert an instant handover; otherwise the
  BACKUP restarts its master-down timer.
* Ties.  FreeBSD makes a MASTER back off on an equal interval, so two tied
  masters both back off; when the tie is between two backups that preempt a
  third node at the same moment (the third wins every timer race because its
  *configured* skew is lowest, but loses every election because its
  *advertised* skew is not), FreeBSD's rules cycle forever with no master.
  We break ties as ucarp does: on an equal interval the MASTER backs off only
  if the peer's address is lower than ours (numeric compare).  Our address is
  :attr:`ReceivedAdvert.local` or else the interface's configured address of
  the same family; when neither is known the FreeBSD rule applies.  Against
  FreeBSD peers (which always back off) this can only converge faster.
* OpenBSD's demote byte.  Our own demote byte is always 0, as FreeBSD writes
  it (FreeBSD carries demotion in the advskew instead).  A peer's non-zero
  demote byte is honoured as OpenBSD's ``carp_proto_input_c`` does: it is
  compared before the intervals, so a demoted OpenBSD master loses to us even
  without preempt, and an OpenBSD peer never makes us back off because its
  demote count is higher than ours.  With FreeBSD or carpool peers (demote 0)
  this reduces to FreeBSD's rules.
* advbase 0 (OpenBSD's sub-second mode, ``carp_setrun``): a MASTER
  advertises every ``advskew/256`` s (``1/256`` s if advskew is 0); a BACKUP
  times out after ``3*advskew/256`` s (``3/256`` s).  OpenBSD skips the
  "master will time out" rule in this mode; we keep it, comparing against the
  BACKUP's real timeout, so that the leave advert is an instant handover here
  too (a master slower than our timeout is going to time out anyway).
* Link down (or ``allow`` off): the interface's vhids go INIT ("hardware
  interface down"), a MASTER releases its addresses, and demotion grows by
  ``ifdown_demotion_factor`` once per vhid; link up takes that back and the
  vhids go BACKUP ("initialization complete").  Repeated reports of the same
  link state are ignored.  A link whose state was never reported counts as
  down but carries no demotion (FreeBSD demotes at attach time only when the
  interface *is* down, which the daemon reports as ``link_changed(up=False)``).
* Every change of demotion makes every MASTER advertise at once (FreeBSD's
  ``carp_send_all`` task, coalesced to one advert per vhid per call).  With
  preempt this is how "all groups fail over together" when one NIC dies.
* Three consecutive send errors on a vhid add ``senderr_demotion_factor``;
  three successes afterwards take it back.  What a vhid added to the demotion
  is remembered and taken back exactly, also when the vhid is removed or the
  factors are reconfigured in between.
* A MASTER that hears a *slower* advert (two masters after a partition heals)
  stays MASTER, advertises at once and re-announces its addresses
  (:class:`Announce`), so that the other side backs off quickly and the
  neighbours' ARP/ND caches point at us again.
* An advert whose source is our own address (see Ties) is our own echo and
  is ignored, as FreeBSD's ``carp_source_is_self`` does.
* Clean stop (:meth:`CarpHost.shutdown`) and removal of a MASTER vhid send
  OpenBSD's bow-out advert (advbase 255, advskew 255) before releasing the
  addresses: backups take over at once instead of after ``3*advbase``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv6Address, IPv6Interface

from carpool.carp.config import MAX_ADVBASE, MAX_ADVSKEW, CarpConfig, VhidConfig
from carpool.errors import CommandError

__all__ = [
    "LEAVE_ADVBASE",
    "LEAVE_ADVSKEW",
    "MAX_ADVERTISED_SKEW",
    "OWN_DEMOTE",
    "SENDAD_MAX_ERRORS",
    "SENDAD_MIN_SUCCESS",
    "Action",
    "Announce",
    "CarpHost",
    "CarpState",
    "DemotionChanged",
    "ReceivedAdvert",
    "ReleaseAddresses",
    "SendAdvert",
    "StateChanged",
    "TakeAddresses",
    "VhidMachine",
    "VhidStatus",
    "advert_interval",
    "advertised_skew",
    "master_down_interval",
]

#: FreeBSD's CARP_MAXSKEW: the advertised skew never exceeds it.
MAX_ADVERTISED_SKEW = 240
#: The bow-out advert (OpenBSD ``sc_bow_out``).
LEAVE_ADVBASE = 255
LEAVE_ADVSKEW = 255
#: The demote byte we send (FreeBSD writes 0; demotion travels in advskew).
OWN_DEMOTE = 0
#: FreeBSD CARP_SENDAD_MAX_ERRORS and CARP_SENDAD_MIN_SUCCESS.
SENDAD_MAX_ERRORS = 3
SENDAD_MIN_SUCCESS = 3

_TICKS = 256  # timers are advbase seconds plus advskew 256ths of a second

Interface = IPv4Interface | IPv6Interface


class CarpState(enum.Enum):
    """carp(4)'s three states, named as ifconfig prints them."""

    INIT = "INIT"
    BACKUP = "BACKUP"
    MASTER = "MASTER"


@dataclass(frozen=True, slots=True)
class ReceivedAdvert:
    """An advert the daemon has decoded, TTL-checked and authenticated.

    ``local`` is the address this host sends its own adverts from on that
    interface (same family as ``source``), used only to break ties; when it
    is None the interface's configured address is used, if any.
    """

    ifname: str
    vhid: int
    advbase: int
    advskew: int
    demote: int
    source: IPv4Address | IPv6Address
    local: IPv4Address | IPv6Address | None = None


# -- actions -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendAdvert:
    """Build and send an advert for the vhid, for each of its address families.

    ``password``, ``addresses``, ``peer`` and ``peer6`` are the vhid's
    configuration at the time of the decision (for a vhid that was just
    removed, its last configuration).
    """

    ifname: str
    vhid: int
    advbase: int
    advskew: int
    demote: int
    password: bytes = b""
    addresses: tuple[Interface, ...] = ()
    peer: IPv4Address | None = None
    peer6: IPv6Address | None = None

    @property
    def leaving(self) -> bool:
        """True for the bow-out advert (advbase 255, advskew 255)."""
        return self.advbase == LEAVE_ADVBASE and self.advskew == LEAVE_ADVSKEW


@dataclass(frozen=True, slots=True)
class TakeAddresses:
    """Become the holder of ``addresses``: add them, send GARP / unsolicited NA."""

    ifname: str
    vhid: int
    addresses: tuple[Interface, ...] = ()


@dataclass(frozen=True, slots=True)
class ReleaseAddresses:
    """Stop holding ``addresses``: remove them from the interface."""

    ifname: str
    vhid: int
    addresses: tuple[Interface, ...] = ()


@dataclass(frozen=True, slots=True)
class Announce:
    """Re-send GARP / unsolicited NA for ``addresses`` we keep holding."""

    ifname: str
    vhid: int
    addresses: tuple[Interface, ...] = ()


@dataclass(frozen=True, slots=True)
class StateChanged:
    """A vhid changed state; ``reason`` is FreeBSD's log text."""

    ifname: str
    vhid: int
    old: CarpState
    new: CarpState
    reason: str


@dataclass(frozen=True, slots=True)
class DemotionChanged:
    """The host-wide demotion changed (``carp: demoted by N to M (reason)``)."""

    old: int
    new: int
    reason: str


Action = SendAdvert | TakeAddresses | ReleaseAddresses | Announce | StateChanged | DemotionChanged


@dataclass(frozen=True, slots=True)
class VhidStatus:
    """What ``ifconfig``/``carpctl`` shows about one vhid."""

    ifname: str
    vhid: int
    state: CarpState
    advbase: int
    advskew: int
    advertised_skew: int
    addresses: tuple[Interface, ...]
    master_down_at: float | None = None
    next_advert_at: float | None = None
    peer: IPv4Address | None = None
    peer6: IPv6Address | None = None


# -- timing rules ------------------------------------------------------------


def advertised_skew(advskew: int, demotion: int) -> int:
    """FreeBSD's DEMOTE_ADVSKEW: ``advskew + demotion`` clamped to 0..240."""
    return max(0, min(MAX_ADVERTISED_SKEW, advskew + demotion))


def advert_interval(advbase: int, advskew: int) -> float:
    """Seconds between a master's adverts (OpenBSD: 1/256 s when both are 0)."""
    if advbase == 0 and advskew == 0:
        return 1 / _TICKS
    return advbase + advskew / _TICKS


def master_down_interval(advbase: int, advskew: int) -> float:
    """Seconds a backup waits for an advert before it takes over."""
    if advbase == 0:
        return 3 * max(advskew, 1) / _TICKS
    return 3 * advbase + advskew / _TICKS


def _interval_ticks(advbase: int, skew: int) -> int:
    """The interval in 256ths of a second, for exact comparisons."""
    return advbase * _TICKS + skew


# -- machines ----------------------------------------------------------------


class VhidMachine:
    """The state of one vhid on one interface (FreeBSD's ``carp_softc``)."""

    __slots__ = (
        "advbase",
        "advskew",
        "config",
        "deadline",
        "ifdown_demotion",
        "send_errors",
        "send_successes",
        "senderr_demotion",
        "state",
    )

    def __init__(self, config: VhidConfig) -> None:
        self.config = config
        self.advbase = config.advbase
        self.advskew = config.advskew
        self.state = CarpState.INIT
        #: master-down time in BACKUP, next advert time in MASTER, else None
        self.deadline: float | None = None
        #: what this vhid added to the demotion for its link (FreeBSD sc_suppress)
        self.ifdown_demotion = 0
        #: what this vhid added to the demotion for send errors
        self.senderr_demotion = 0
        self.send_errors = 0
        self.send_successes = 0

    @property
    def key(self) -> tuple[str, int]:
        return self.config.key

    @property
    def ifname(self) -> str:
        return self.config.ifname

    @property
    def vhid(self) -> int:
        return self.config.vhid

    def __repr__(self) -> str:
        return f"<VhidMachine {self.vhid}@{self.ifname} {self.state.value}>"


class _Batch:
    """The actions of one call, plus FreeBSD's pending "advertise all" task."""

    __slots__ = ("actions", "advertised", "send_all")

    def __init__(self) -> None:
        self.actions: list[Action] = []
        self.advertised: set[tuple[str, int]] = set()
        self.send_all = False


class CarpHost:
    """All vhids of one host and the host-wide CARP settings."""

    def __init__(self, config: CarpConfig, now: float) -> None:
        self._config = config
        self._preempt = config.preempt
        self._allow = config.allow
        self._demotion = config.demotion
        self._ifdown_factor = config.ifdown_demotion_factor
        self._senderr_factor = config.senderr_demotion_factor
        self._links: dict[str, bool] = {}
        self._machines: dict[tuple[str, int], VhidMachine] = {
            v.key: VhidMachine(v) for v in config.vhids
        }
        self._stopped = False

    # -- read-only views ---------------------------------------------------

    @property
    def demotion(self) -> int:
        """The host-wide demotion (``net.inet.carp.demotion``)."""
        return self._demotion

    @property
    def preempt(self) -> bool:
        return self._preempt

    @property
    def allow(self) -> bool:
        return self._allow

    @property
    def config(self) -> CarpConfig:
        return self._config

    @property
    def stopped(self) -> bool:
        """True after :meth:`shutdown`; the host then ignores every input."""
        return self._stopped

    def link_state(self, ifname: str) -> bool | None:
        """The last reported link state of ``ifname`` (None: never reported)."""
        return self._links.get(ifname)

    def state(self, ifname: str, vhid: int) -> CarpState:
        return self._machine(ifname, vhid).state

    def machines(self) -> tuple[VhidMachine, ...]:
        return tuple(self._machines.values())

    def next_deadline(self) -> float | None:
        """The earliest pending timer, or None when nothing is scheduled."""
        deadlines = [m.deadline for m in self._machines.values() if m.deadline is not None]
        return min(deadlines) if deadlines else None

    def status(self) -> list[VhidStatus]:
        return [
            VhidStatus(
                ifname=m.ifname,
                vhid=m.vhid,
                state=m.state,
                advbase=m.advbase,
                advskew=m.advskew,
                advertised_skew=self._advertised_skew(m),
                addresses=m.config.addresses,
                master_down_at=m.deadline if m.state is CarpState.BACKUP else None,
                next_advert_at=m.deadline if m.state is CarpState.MASTER else None,
                peer=m.config.peer,
                peer6=m.config.peer6,
            )
            for m in self._machines.values()
        ]

    # -- inputs --------------------------------------------------------------

    def link_changed(self, ifname: str, up: bool, now: float) -> list[Action]:
        """The carrier/administrative state of ``ifname`` is now ``up``."""
        if self._stopped or self._links.get(ifname) is up:
            return []
        self._links[ifname] = up
        batch = _Batch()
        for machine in self._machines.values():
            if machine.ifname == ifname:
                self._interface_state(machine, batch, now)
        return self._finish(batch, now)

    def advert_received(self, advert: ReceivedAdvert, now: float) -> list[Action]:
        """An authenticated advert from a peer (FreeBSD ``carp_input_c``)."""
        machine = self._machines.get((advert.ifname, advert.vhid))
        if self._stopped or machine is None or machine.state is CarpState.INIT:
            return []
        if advert.source == self._local_address(machine, advert):
            return []  # our own advert, looped back (FreeBSD carp_source_is_self)
        batch = _Batch()
        ours = _interval_ticks(machine.advbase, self._advertised_skew(machine))
        theirs = _interval_ticks(advert.advbase, advert.advskew)
        if machine.state is CarpState.MASTER:
            better = theirs < ours or (theirs == ours and self._loses_tie(machine, advert))
            if (better and advert.demote <= OWN_DEMOTE) or advert.demote < OWN_DEMOTE:
                self._become_backup(machine, "more frequent advertisement received", batch, now)
            else:
                # Two masters: we win.  Tell the other one and the neighbours now.
                self._send_advert(machine, batch, now)
                batch.actions.append(
                    Announce(machine.ifname, machine.vhid, machine.config.addresses)
                )
        elif self._preempt and ours < theirs and advert.demote >= OWN_DEMOTE:
            self._become_master(machine, "preempting a slower master", batch, now)
        elif advert.demote > OWN_DEMOTE:
            self._become_master(machine, "preempting a demoted master", batch, now)
        elif theirs > self._timeout_ticks(machine):
            self._become_master(machine, "master will time out", batch, now)
        else:
            machine.deadline = now + master_down_interval(machine.advbase, machine.advskew)
        return self._finish(batch, now)

    def advance(self, now: float) -> list[Action]:
        """Fire every timer due at or before ``now``, earliest first."""
        if self._stopped:
            return []
        batch = _Batch()
        while True:
            due = [
                m for m in self._machines.values() if m.deadline is not None and m.deadline <= now
            ]
            if not due:
                break
            machine = min(due, key=lambda m: (m.deadline, m.key))
            if machine.state is CarpState.BACKUP:
                machine.deadline = None
                self._become_master(machine, "master timed out", batch, now)
            elif machine.state is CarpState.MASTER:
                self._send_advert(machine, batch, now)
            else:
                machine.deadline = None
        return self._finish(batch, now)

    # -- operator commands -----------------------------------------------------

    def force_state(self, ifname: str, vhid: int, state: CarpState, now: float) -> list[Action]:
        """``ifconfig em0 vhid N state master|backup``: acts only outside INIT.

        Unlike FreeBSD, a master sent to backup first bows out (advbase 255,
        advskew 255), so that the best backup takes over at once instead of
        after its master-down time: a planned handover costs no outage.
        """
        machine = self._machine(ifname, vhid)
        if state is CarpState.INIT:
            raise CommandError("state must be master or backup")
        if self._stopped or machine.state is CarpState.INIT or machine.state is state:
            return []
        batch = _Batch()
        if state is CarpState.BACKUP:
            self._send_leave(machine, batch)
            self._become_backup(machine, "user requested via ifconfig", batch, now)
        else:
            self._become_master(machine, "user requested via ifconfig", batch, now)
        return self._finish(batch, now)

    def set_advskew(self, ifname: str, vhid: int, advskew: int, now: float) -> list[Action]:
        """``ifconfig em0 vhid N advskew S``; a MASTER advertises the change at once."""
        machine = self._machine(ifname, vhid)
        if not 0 <= advskew <= MAX_ADVSKEW:
            raise CommandError(f"advskew must be in 0..{MAX_ADVSKEW}, not {advskew}")
        machine.advskew = advskew
        return self._parameters_changed(machine, now)

    def set_advbase(self, ifname: str, vhid: int, advbase: int, now: float) -> list[Action]:
        """``ifconfig em0 vhid N advbase B``; a MASTER advertises the change at once."""
        machine = self._machine(ifname, vhid)
        if not 0 <= advbase <= MAX_ADVBASE:
            raise CommandError(f"advbase must be in 0..{MAX_ADVBASE}, not {advbase}")
        machine.advbase = advbase
        return self._parameters_changed(machine, now)

    def adjust_demotion(self, delta: int, reason: str, now: float) -> list[Action]:
        """Add ``delta`` to the demotion (a write to ``net.inet.carp.demotion``)."""
        if self._stopped:
            return []
        batch = _Batch()
        self._adjust_demotion(delta, reason, batch)
        return self._finish(batch, now)

    def set_preempt(self, preempt: bool) -> None:
        """``net.inet.carp.preempt``."""
        self._preempt = preempt

    def set_allow(self, allow: bool, now: float) -> list[Action]:
        """``net.inet.carp.allow``: off sends every vhid to INIT, as a link down does."""
        if self._stopped or allow is self._allow:
            self._allow = allow
            return []
        self._allow = allow
        batch = _Batch()
        for machine in self._machines.values():
            self._interface_state(machine, batch, now)
        return self._finish(batch, now)

    def send_failed(
        self, ifname: str, vhid: int, now: float, error: int | str | None = None
    ) -> list[Action]:
        """Sending an advert of the vhid failed (FreeBSD ``carp_send_ad_error``)."""
        machine = self._machines.get((ifname, vhid))
        if self._stopped or machine is None:
            return []
        batch = _Batch()
        machine.send_errors += 1
        machine.send_successes = 0
        if machine.send_errors == SENDAD_MAX_ERRORS and machine.senderr_demotion == 0:
            what = (
                f"send error {error} on {ifname}"
                if error is not None
                else f"send error on {ifname}"
            )
            machine.senderr_demotion = self._senderr_factor
            self._adjust_demotion(self._senderr_factor, what, batch)
        return self._finish(batch, now)

    def send_succeeded(self, ifname: str, vhid: int, now: float) -> list[Action]:
        """An advert of the vhid went out."""
        machine = self._machines.get((ifname, vhid))
        if self._stopped or machine is None or machine.send_errors == 0:
            return []
        batch = _Batch()
        machine.send_successes += 1
        if machine.send_successes >= SENDAD_MIN_SUCCESS:
            if machine.senderr_demotion:
                undo, machine.senderr_demotion = machine.senderr_demotion, 0
                self._adjust_demotion(-undo, f"send ok on {ifname}", batch)
            machine.send_errors = 0
            machine.send_successes = 0
        return self._finish(batch, now)

    def reconfigure(self, config: CarpConfig, now: float) -> list[Action]:
        """Apply a reloaded configuration (SIGHUP).

        Unchanged vhids keep their state and runtime settings.  A changed vhid
        keeps its state and takes the new settings (runtime advskew/advbase
        overrides are replaced by the file's); a MASTER releases the addresses
        that went away, takes the full new set and advertises at once.  New
        vhids start in INIT (BACKUP if their link is known to be up).  Removed
        MASTER vhids bow out (leave advert) and release their addresses.
        """
        if self._stopped:
            return []
        batch = _Batch()
        old_config = self._config
        self._config = config
        self._preempt = config.preempt
        self._ifdown_factor = config.ifdown_demotion_factor
        self._senderr_factor = config.senderr_demotion_factor
        self._adjust_demotion(
            config.demotion - old_config.demotion, "configuration reloaded", batch
        )

        wanted = {v.key: v for v in config.vhids}
        for key in [k for k in self._machines if k not in wanted]:
            self._remove(self._machines.pop(key), batch, now)

        machines: dict[tuple[str, int], VhidMachine] = {}
        created: list[VhidMachine] = []
        for key, vhid_config in wanted.items():
            machine = self._machines.get(key)
            if machine is None:
                machine = VhidMachine(vhid_config)
                created.append(machine)
            elif machine.config != vhid_config:
                self._update(machine, vhid_config, batch, now)
            machines[key] = machine
        self._machines = machines

        if config.allow is not self._allow:
            self._allow = config.allow
            for machine in self._machines.values():
                if machine not in created:
                    self._interface_state(machine, batch, now)
        for machine in created:
            self._interface_state(machine, batch, now)
        return self._finish(batch, now)

    def shutdown(self, now: float) -> list[Action]:
        """Leave: every MASTER bows out and releases its addresses; all go INIT."""
        if self._stopped:
            return []
        batch = _Batch()
        for machine in self._machines.values():
            self._leave(machine, "leaving", batch)
        self._stopped = True
        return batch.actions

    # -- internals -------------------------------------------------------------

    def _machine(self, ifname: str, vhid: int) -> VhidMachine:
        machine = self._machines.get((ifname, vhid))
        if machine is None:
            raise CommandError(f"vhid {vhid} is not configured on {ifname}")
        return machine

    def _advertised_skew(self, machine: VhidMachine) -> int:
        return advertised_skew(machine.advskew, self._demotion)

    def _timeout_ticks(self, machine: VhidMachine) -> int:
        """The "master will time out" threshold in 256ths of a second."""
        if machine.advbase == 0:
            return 3 * max(machine.advskew, 1)
        return _interval_ticks(3 * machine.advbase, self._advertised_skew(machine))

    def _local_address(
        self, machine: VhidMachine, advert: ReceivedAdvert
    ) -> IPv4Address | IPv6Address | None:
        """Our address in the advert's family: the daemon's word, else the config's."""
        if advert.local is not None:
            return advert.local if advert.local.version == advert.source.version else None
        interface = self._config.find_interface(machine.ifname)
        for address in interface.addresses if interface else ():
            if address.version == advert.source.version:
                return address.ip
        return None

    def _loses_tie(self, machine: VhidMachine, advert: ReceivedAdvert) -> bool:
        """On an equal interval: does the peer win?  (The lower address wins.)"""
        local = self._local_address(machine, advert)
        if local is None:
            return True  # FreeBSD: ties always back off
        return int(advert.source) < int(local)

    def _usable(self, machine: VhidMachine) -> bool:
        return self._allow and self._links.get(machine.ifname) is True

    def _set_state(self, machine: VhidMachine, new: CarpState, reason: str, batch: _Batch) -> None:
        if machine.state is not new:
            batch.actions.append(
                StateChanged(machine.ifname, machine.vhid, machine.state, new, reason)
            )
            machine.state = new

    def _send_advert(self, machine: VhidMachine, batch: _Batch, now: float) -> None:
        """Advertise now and re-arm the advert timer (``carp_send_ad_locked``)."""
        skew = self._advertised_skew(machine)
        config = machine.config
        batch.actions.append(
            SendAdvert(
                ifname=machine.ifname,
                vhid=machine.vhid,
                advbase=machine.advbase,
                advskew=skew,
                demote=OWN_DEMOTE,
                password=config.password,
                addresses=config.addresses,
                peer=config.peer,
                peer6=config.peer6,
            )
        )
        batch.advertised.add(machine.key)
        machine.deadline = now + advert_interval(machine.advbase, skew)

    def _send_leave(self, machine: VhidMachine, batch: _Batch) -> None:
        config = machine.config
        batch.actions.append(
            SendAdvert(
                ifname=machine.ifname,
                vhid=machine.vhid,
                advbase=LEAVE_ADVBASE,
                advskew=LEAVE_ADVSKEW,
                demote=OWN_DEMOTE,
                password=config.password,
                addresses=config.addresses,
                peer=config.peer,
                peer6=config.peer6,
            )
        )

    def _become_master(self, machine: VhidMachine, reason: str, batch: _Batch, now: float) -> None:
        """``carp_master_down_locked``: only a BACKUP can become MASTER."""
        if machine.state is not CarpState.BACKUP:
            return
        self._set_state(machine, CarpState.MASTER, reason, batch)
        self._send_advert(machine, batch, now)
        batch.actions.append(TakeAddresses(machine.ifname, machine.vhid, machine.config.addresses))

    def _become_backup(self, machine: VhidMachine, reason: str, batch: _Batch, now: float) -> None:
        was_master = machine.state is CarpState.MASTER
        self._set_state(machine, CarpState.BACKUP, reason, batch)
        if was_master:
            batch.actions.append(
                ReleaseAddresses(machine.ifname, machine.vhid, machine.config.addresses)
            )
        machine.deadline = now + master_down_interval(machine.advbase, machine.advskew)

    def _go_init(self, machine: VhidMachine, reason: str, batch: _Batch) -> None:
        was_master = machine.state is CarpState.MASTER
        self._set_state(machine, CarpState.INIT, reason, batch)
        if was_master:
            batch.actions.append(
                ReleaseAddresses(machine.ifname, machine.vhid, machine.config.addresses)
            )
        machine.deadline = None

    def _setrun(self, machine: VhidMachine, batch: _Batch, now: float) -> None:
        """``carp_setrun``: start the vhid's timers if its link allows it."""
        if not self._usable(machine):
            return
        if machine.state is CarpState.INIT:
            self._set_state(machine, CarpState.BACKUP, "initialization complete", batch)
            machine.deadline = now + master_down_interval(machine.advbase, machine.advskew)
        elif machine.state is CarpState.BACKUP:
            machine.deadline = now + master_down_interval(machine.advbase, machine.advskew)
        else:
            skew = self._advertised_skew(machine)
            machine.deadline = now + advert_interval(machine.advbase, skew)

    def _interface_state(self, machine: VhidMachine, batch: _Batch, now: float) -> None:
        """``carp_sc_state``: follow the link (and ``allow``) of the vhid."""
        link = self._links.get(machine.ifname)
        if link is None:
            return  # never reported: stay INIT, no demotion yet
        if not self._usable(machine):
            self._go_init(machine, "hardware interface down", batch)
            if machine.ifdown_demotion == 0 and self._ifdown_factor != 0:
                machine.ifdown_demotion = self._ifdown_factor
                self._adjust_demotion(self._ifdown_factor, "interface down", batch)
        else:
            self._go_init(machine, "hardware interface up", batch)
            self._setrun(machine, batch, now)
            if machine.ifdown_demotion:
                undo, machine.ifdown_demotion = machine.ifdown_demotion, 0
                self._adjust_demotion(-undo, "interface up", batch)

    def _adjust_demotion(self, delta: int, reason: str, batch: _Batch) -> None:
        if delta == 0:
            return
        old = self._demotion
        self._demotion += delta
        batch.actions.append(DemotionChanged(old, self._demotion, reason))
        batch.send_all = True

    def _parameters_changed(self, machine: VhidMachine, now: float) -> list[Action]:
        if self._stopped:
            return []
        batch = _Batch()
        if machine.state is CarpState.MASTER:
            self._send_advert(machine, batch, now)
        return self._finish(batch, now)

    def _update(self, machine: VhidMachine, config: VhidConfig, batch: _Batch, now: float) -> None:
        old = machine.config
        machine.config = config
        machine.advbase = config.advbase
        machine.advskew = config.advskew
        if machine.state is not CarpState.MASTER:
            return
        if config.addresses != old.addresses:
            gone = tuple(a for a in old.addresses if a not in config.addresses)
            if gone:
                batch.actions.append(ReleaseAddresses(machine.ifname, machine.vhid, gone))
            batch.actions.append(TakeAddresses(machine.ifname, machine.vhid, config.addresses))
        self._send_advert(machine, batch, now)

    def _remove(self, machine: VhidMachine, batch: _Batch, now: float) -> None:
        self._leave(machine, "vhid removed", batch)
        undo = machine.ifdown_demotion + machine.senderr_demotion
        machine.ifdown_demotion = machine.senderr_demotion = 0
        self._adjust_demotion(-undo, "vhid removed", batch)

    def _leave(self, machine: VhidMachine, reason: str, batch: _Batch) -> None:
        if machine.state is CarpState.MASTER:
            self._send_leave(machine, batch)
            self._set_state(machine, CarpState.INIT, reason, batch)
            batch.actions.append(
                ReleaseAddresses(machine.ifname, machine.vhid, machine.config.addresses)
            )
        else:
            self._set_state(machine, CarpState.INIT, reason, batch)
        machine.deadline = None

    def _finish(self, batch: _Batch, now: float) -> list[Action]:
        """Run the pending "advertise all" task: every MASTER advertises once."""
        if batch.send_all:
            for machine in self._machines.values():
                if machine.state is CarpState.MASTER and machine.key not in batch.advertised:
                    self._send_advert(machine, batch, now)
        return batch.actions
