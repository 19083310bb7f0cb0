"""``hastctl role init|primary|secondary`` and ``hastctl create``: which changes are allowed (pure).

This module decides; the daemon performs.  :func:`change_role` takes a
resource's current role and metadata and returns a :class:`RoleChange`: the
metadata to write (if any), the worker to run, whether the new primary is
"virgin", and the hook event (``role <res> <old> <new>``, FreeBSD control.c).
Refusals raise :class:`RoleError`, whose message says what to do.

HAST's rules:

* Every role may go to every other one (``init`` ↔ ``primary`` ↔ ``secondary``,
  also ``primary`` → ``secondary`` directly); asking for the current role is a
  no-op (no worker restart, no hook).
* ``init`` stops the worker; nothing is written.
* ``primary`` and ``secondary`` need an initialised provider (``hastctl create``)
  of this resource.  The metadata is written with ``prevrole`` set to the new
  role; the counters are not touched (they change only with writes made without
  the peer and after a resync).
* The first time a resource becomes primary (resuid 0) it gets a random, non-zero
  64-bit ``resuid`` (FreeBSD ``init_resuid``) and is *virgin*: until its first
  write, a fresh secondary adopts the resuid without a full sync.
* A primary worker starts at once; a secondary worker waits for the primary.
* ``hastctl create`` only works on a resource in role ``init``
  (:func:`check_create`) — the split-brain recovery on the node whose data is
  discarded is ``role init`` → ``create`` → ``role secondary``, after which the
  fresh secondary (resuid 0) gets a full synchronization.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from carpool.errors import CommandError
from carpool.hast.common import Role
from carpool.hast.metadata import Metadata

__all__ = ["RoleChange", "RoleError", "change_role", "check_create", "parse_role"]


class RoleError(CommandError):
    """A refused role change or create."""


@dataclass(frozen=True, slots=True)
class RoleChange:
    resource: str
    old: Role
    new: Role
    changed: bool  #: False: the resource already had that role
    metadata: Metadata | None  #: to write before starting the worker (None: nothing)
    worker: Role | None  #: the worker to run afterwards (None: none)
    start_now: bool  #: start the worker now (primary) or when the primary connects
    virgin: bool  #: the new primary has a fresh resuid and never wrote
    event: tuple[str, ...]  #: the hook's argv after the program (empty: no hook)


def parse_role(word: str) -> Role:
    """``init``/``primary``/``secondary`` → Role (RoleError otherwise)."""
    try:
        return Role(word)
    except ValueError:
        raise RoleError(f"unknown role {word!r}: use init, primary or secondary") from None


def change_role(
    resource: str,
    current: Role,
    new: Role | str,
    metadata: Metadata | None,
    *,
    new_resuid: Callable[[], int],
) -> RoleChange:
    """Plan ``hastctl role <new> <resource>`` from role ``current``.

    ``metadata`` is the provider's (None when it has none); ``new_resuid``
    returns a random 64-bit number (called only when one is needed).
    """
    target = new if isinstance(new, Role) else parse_role(new)
    if target is current:
        return RoleChange(resource, current, target, False, None, None, False, False, ())
    event = ("role", resource, current.value, target.value)
    if target is Role.INIT:
        return RoleChange(resource, current, target, True, None, None, False, False, event)
    if metadata is None:
        raise RoleError(
            f"resource {resource!r} has no HAST metadata on its provider: run"
            f" 'hastctl create {resource}' first"
        )
    if metadata.resource != resource:
        raise RoleError(
            f"the provider of {resource!r} belongs to resource {metadata.resource!r}:"
            " check 'local' in hast.conf"
        )
    virgin = False
    md = metadata
    if target is Role.PRIMARY and md.resuid == 0:
        resuid = new_resuid() % 2**64
        if resuid == 0:
            raise RoleError("could not generate a resource unique ID (got 0): try again")
        md = md.replace(resuid=resuid)
        virgin = True
    md = md.replace(prevrole=target)
    return RoleChange(
        resource, current, target, True, md, target, target is Role.PRIMARY, virgin, event
    )


def check_create(resource: str, current: Role) -> None:
    """Refuse ``hastctl create`` unless the resource is in role init."""
    if current is not Role.INIT:
        raise RoleError(
            f"resource {resource!r} is {current.value}: run 'hastctl role init {resource}'"
            " before 'hastctl create'"
        )
