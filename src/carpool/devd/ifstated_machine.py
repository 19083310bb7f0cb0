"""The ifstated state machine, sans I/O: inputs in, actions out.

This module owns ifstated's semantics; the daemon only feeds it link, CARP and
external-test results and performs the actions it returns, in order
(``RunCommand`` synchronously through the shell, as ifstated does).

Semantics (OpenBSD ifstated):

* ``start()`` schedules the global block's external tests, enters the
  ``init-state`` (schedules its external tests, runs its ``init`` block) and
  evaluates the global block and the state body.
* A block is evaluated once when it becomes active (every ``if`` whose
  condition is true runs), then **edge-triggered**: after each input, an
  ``if`` runs its body only when its condition went from false to true.
  Nested ``if``s are evaluated when their parent body runs.
* A block with external tests is not evaluated until each of them has
  reported once since the block became active (ifstated waits for the first
  run), so ``! "ping ..." every 10`` does not fire before the ping ran.
* ``set-state X`` stops the current body, leaves the state (its external tests
  are cancelled), enters X: ``StateEntered``, X's externals scheduled, X's
  ``init`` run, X's body evaluated. More than ``max_transitions`` set-states
  for one input is a loop: the machine stops in the state it reached and
  returns ``LoopDetected``.
* A link is ``unknown`` until reported; a CARP vhid is ``init`` until reported.
  ``1@em0.link.*`` follows the vhid's CARP state (master=up, backup=down,
  init=unknown), and so does every name in ``carp_aliases`` (``{"carp0":
  "1@em0"}``), for OpenBSD-style ``carp0.link.up`` configs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from carpool.devd.ifstatedconf import (
    Action,
    And,
    CarpTest,
    Expr,
    ExternalTest,
    If,
    IfstatedConfig,
    LinkTest,
    Not,
    Or,
    Run,
    SetState,
    external_tests,
)


@dataclass(frozen=True)
class RunCommand:
    """Run ``cmd`` through ``/bin/sh -c``."""

    cmd: str


@dataclass(frozen=True)
class StateEntered:
    name: str


@dataclass(frozen=True)
class ScheduleExternal:
    """Run ``command`` now and every ``every_seconds``; report with ``external_result``."""

    command: str
    every_seconds: int


@dataclass(frozen=True)
class CancelExternal:
    """Stop running ``command`` (its block is no longer active)."""

    command: str
    every_seconds: int


@dataclass(frozen=True)
class LoopDetected:
    """set-state went round more than the limit for one input; the machine stopped."""

    states: tuple[str, ...]
    message: str


MachineAction = RunCommand | StateEntered | ScheduleExternal | CancelExternal | LoopDetected

_CARP_TO_LINK = {"master": "up", "backup": "down", "init": "unknown"}


class _Block:
    """An active block (global or a state body): its ifs' last values, externals pending."""

    def __init__(self, body: tuple[Action, ...]) -> None:
        self.body = body
        self.externals = external_tests(body)
        self.previous: dict[int, bool] = {}
        self.primed = False


class IfstatedMachine:
    """ifstated over a parsed :class:`IfstatedConfig`."""

    def __init__(
        self,
        config: IfstatedConfig,
        *,
        carp_aliases: Mapping[str, str] | None = None,
        max_transitions: int = 16,
    ) -> None:
        self.config = config
        self.carp_aliases = dict(carp_aliases or {})
        self.max_transitions = max_transitions
        self.links: dict[str, str] = {}
        self.carp: dict[tuple[str, int], str] = {}
        self.results: dict[str, bool] = {}
        self.current: str | None = None
        self.started = False
        self._global = _Block(config.global_body)
        self._state: _Block | None = None
        self._next: str | None = None

    # ------------------------------------------------------------------ inputs

    def start(self) -> list[MachineAction]:
        if self.started:
            return []
        self.started = True
        out: list[MachineAction] = [
            ScheduleExternal(t.command, t.every) for t in self._global.externals
        ]
        self._reset_results(self._global.externals)
        self._enter_block_actions(self._global, out)
        if self.config.init_state is not None:
            self._next = self.config.init_state
        self._settle(out)
        return out

    def link_changed(self, ifname: str, state: str) -> list[MachineAction]:
        if state not in ("up", "down", "unknown"):
            raise ValueError(f"link state must be up, down or unknown, not {state!r}")
        self.links[ifname] = state
        return self._after_input()

    def carp_changed(self, ifname: str, vhid: int, state: str) -> list[MachineAction]:
        st = state.lower()
        if st not in _CARP_TO_LINK:
            raise ValueError(f"CARP state must be MASTER, BACKUP or INIT, not {state!r}")
        self.carp[(ifname, vhid)] = st
        return self._after_input()

    def external_result(self, command: str, ok: bool) -> list[MachineAction]:
        self.results[command] = ok
        return self._after_input()

    @property
    def active_externals(self) -> frozenset[tuple[str, int]]:
        """The external tests that should be running now: (command, every)."""
        tests = list(self._global.externals)
        if self._state is not None:
            tests += self._state.externals
        return frozenset((t.command, t.every) for t in tests)

    # ------------------------------------------------------------------ evaluation

    def link_state(self, ifname: str) -> str:
        """``up``/``down``/``unknown`` of an interface, or of a vhid written ``1@em0``."""
        name = self.carp_aliases.get(ifname, ifname)
        vhid, at, iface = name.partition("@")
        vhid = vhid.removeprefix("vhid")
        if at and vhid.isascii() and vhid.isdigit():
            return _CARP_TO_LINK[self.carp.get((iface, int(vhid)), "init")]
        return self.links.get(ifname, "unknown")

    def value(self, expr: Expr) -> bool:
        """The truth of ``expr`` now (unreported tests are false / unknown)."""
        if isinstance(expr, LinkTest):
            return self.link_state(expr.ifname) == expr.state
        if isinstance(expr, CarpTest):
            return self.carp.get((expr.ifname, expr.vhid), "init") == expr.state
        if isinstance(expr, ExternalTest):
            return self.results.get(expr.command, False)
        if isinstance(expr, Not):
            return not self.value(expr.operand)
        if isinstance(expr, And):
            return self.value(expr.left) and self.value(expr.right)
        if isinstance(expr, Or):
            return self.value(expr.left) or self.value(expr.right)
        raise TypeError(f"not an expression: {expr!r}")

    def _reset_results(self, tests: list[ExternalTest]) -> None:
        keep = {t.command for t in self._global.externals} if self._state is not None else set()
        for t in tests:
            if t.command not in keep:
                self.results.pop(t.command, None)

    def _after_input(self) -> list[MachineAction]:
        out: list[MachineAction] = []
        if not self.started:
            return out
        self._evaluate(self._global, out)
        if self._state is not None and self._next is None:
            self._evaluate(self._state, out)
        self._settle(out)
        return out

    def _evaluate(self, block: _Block, out: list[MachineAction]) -> None:
        if not block.primed:
            if any(t.command not in self.results for t in block.externals):
                return
            block.primed = True
            for index, action in enumerate(block.body):
                if isinstance(action, If):
                    block.previous[index] = False
        for index, action in enumerate(block.body):
            if self._next is not None:
                return
            if isinstance(action, If):
                now = self.value(action.condition)
                before = block.previous.get(index, False)
                block.previous[index] = now
                if now and not before:
                    self._run(action.body, out)
            # Unconditional top-level actions ran when the block became active.

    def _run(self, actions: tuple[Action, ...], out: list[MachineAction]) -> None:
        for action in actions:
            if self._next is not None:
                return
            if isinstance(action, Run):
                out.append(RunCommand(action.command))
            elif isinstance(action, SetState):
                self._next = action.state
            elif self.value(action.condition):
                self._run(action.body, out)

    def _enter_block_actions(self, block: _Block, out: list[MachineAction]) -> None:
        """Unconditional top-level actions of a body run once on entry (ifstated runs them
        on every evaluation of the body; with edge triggering, entry is that moment)."""
        plain = tuple(a for a in block.body if not isinstance(a, If))
        self._run(plain, out)

    def _settle(self, out: list[MachineAction]) -> None:
        path: list[str] = []
        while self._next is not None:
            target = self._next
            self._next = None
            path.append(target)
            if len(path) > self.max_transitions:
                out.append(
                    LoopDetected(
                        tuple(path[:-1]),
                        "set-state loop: "
                        + " -> ".join(path[:-1])
                        + f"; stopped in state {self.current!r}",
                    )
                )
                return
            if self._state is not None:
                out.extend(CancelExternal(t.command, t.every) for t in self._state.externals)
            state = self.config.states[target]
            self.current = target
            self._state = _Block(state.body)
            self._reset_results(self._state.externals)
            out.append(StateEntered(target))
            out.extend(ScheduleExternal(t.command, t.every) for t in self._state.externals)
            self._run(state.init, out)
            if self._next is not None:
                continue
            self._enter_block_actions(self._state, out)
            if self._next is not None:
                continue
            self._evaluate(self._global, out)
            self._evaluate(self._state, out)
        if self._state is None:
            self._evaluate(self._global, out)
