"""Host selection for a relay or redirect table (relayd ``mode``).  Pure: no clock, no sockets.

One :class:`Balancer` per table use (``forward to <t> mode M``).  It knows the
table's hosts in file order (relayd's host ids), which of them are up, the
round-robin position and the number of live sessions per host, and picks a
host with :meth:`Balancer.select`.  Following relay.c ``relay_from_table``:

* ``roundrobin``: start at the saved index, take the first up host from there
  (wrapping), and save the index after the chosen host.  Over N picks every up
  host is chosen N/up or N/up+1 times.
* ``random``: uniform among the up hosts (relayd draws an index over all hosts
  with ``arc4random_uniform`` and walks forward to an up one, which favours the
  host after a down one; we draw among up hosts instead).
* ``source-hash``: keyed hash of the client address (no port).
* ``loadbalance``: keyed hash of client address, relay address and relay port.
* ``hash``: keyed hash of relay address and port plus the bytes the protocol's
  ``hash`` rules fed in (``hash_data``).
* ``least-states``: the up host with the fewest live sessions; ties go to the
  first one at or after the round-robin position (pf picks by state count).

The hash index is ``h mod nhosts`` over *all* hosts, so a source keeps its host
while the up set does not change, and only sources whose host went down move.
A down host is skipped by rehashing up to :data:`MAX_HASH_RETRIES` times, then
by walking forward to the next up host, as relayd does.  relayd keys SipHash-2-4
with 128 bits (``0x`` + 32 hex digits as given, a string MD5'd, else random);
the stdlib has no SipHash, so we key BLAKE2b with the same 128 bits: the
mapping differs from OpenBSD's, its properties do not.
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
import secrets
from collections.abc import Iterable, Sequence

from carpool.relayd.model import Mode

__all__ = ["MAX_HASH_RETRIES", "Balancer", "NoHostError", "table_key"]

MAX_HASH_RETRIES = 5


class NoHostError(LookupError):
    """No host of the table is up."""


def table_key(mode_key: str | None) -> bytes:
    """The 128-bit hash key for a ``mode ... KEY``: 0x + 32 hex digits, else MD5 of the string.

    Without a key relayd draws a random one at every load.
    """
    if mode_key is None:
        return secrets.token_bytes(16)
    if mode_key[:2].lower() == "0x" and len(mode_key) == 34:
        try:
            return bytes.fromhex(mode_key[2:])
        except ValueError:
            pass
    return hashlib.md5(mode_key.encode(), usedforsecurity=False).digest()


def _addr_bytes(addr: str) -> bytes:
    try:
        return ipaddress.ip_address(addr).packed
    except ValueError:
        return addr.encode()


class Balancer:
    """Chooses hosts of one table.  ``hosts`` are relayd host ids in table order."""

    __slots__ = ("_hosts", "_index", "_key", "_rng", "_sessions", "_up", "mode")

    def __init__(
        self,
        hosts: Sequence[int],
        mode: Mode = Mode.ROUNDROBIN,
        *,
        key: bytes | None = None,
        rng: random.Random | None = None,
        up: Iterable[int] = (),
    ) -> None:
        if len(set(hosts)) != len(hosts):
            raise ValueError("duplicate host ids")
        self.mode = mode
        self._hosts = tuple(hosts)
        self._key = key if key is not None else secrets.token_bytes(16)
        if len(self._key) != 16:
            raise ValueError("the hash key has 128 bits")
        self._rng = rng if rng is not None else random.Random()
        self._index = 0
        self._sessions = dict.fromkeys(self._hosts, 0)
        self._up: set[int] = set()
        for h in up:
            self.set_up(h, True)

    # -- state -----------------------------------------------------------------

    @property
    def hosts(self) -> tuple[int, ...]:
        return self._hosts

    @property
    def up_hosts(self) -> tuple[int, ...]:
        return tuple(h for h in self._hosts if h in self._up)

    def is_up(self, host: int) -> bool:
        return host in self._up

    def set_up(self, host: int, up: bool) -> None:
        """Record a host state change (health check result, enable/disable)."""
        if host not in self._sessions:
            raise KeyError(host)
        if up:
            self._up.add(host)
        else:
            self._up.discard(host)

    def sessions(self, host: int) -> int:
        return self._sessions[host]

    def session_opened(self, host: int) -> None:
        self._sessions[host] += 1

    def session_closed(self, host: int) -> None:
        if self._sessions[host] > 0:
            self._sessions[host] -= 1

    # -- selection ---------------------------------------------------------------

    def _hash(self, data: bytes) -> int:
        d = hashlib.blake2b(data, digest_size=8, key=self._key).digest()
        return int.from_bytes(d, "little")

    def _walk(self, start: int) -> int:
        """Index of the first up host at or after ``start`` (wrapping)."""
        n = len(self._hosts)
        for k in range(n):
            i = (start + k) % n
            if self._hosts[i] in self._up:
                return i
        raise NoHostError("no host is up")

    def select(
        self,
        *,
        client_addr: str = "",
        relay_addr: str = "",
        relay_port: int = 0,
        hash_data: bytes = b"",
    ) -> int:
        """The host id for a new session; raises :class:`NoHostError` when none is up.

        ``client_addr`` feeds source-hash and loadbalance; ``relay_addr`` and
        ``relay_port`` (the listener) feed loadbalance and hash; ``hash_data``
        is what ``hash`` rules collected for this request.
        """
        if not self._up:
            raise NoHostError("no host is up")
        n = len(self._hosts)
        mode = self.mode
        if mode is Mode.ROUNDROBIN:
            i = self._walk(self._index % n)
            self._index = (i + 1) % n
            return self._hosts[i]
        if mode is Mode.RANDOM:
            ups = self.up_hosts
            return ups[self._rng.randrange(len(ups))]
        if mode is Mode.LEAST_STATES:
            start = self._index % n
            best = -1
            best_count = -1
            for k in range(n):
                i = (start + k) % n
                h = self._hosts[i]
                if h in self._up and (best < 0 or self._sessions[h] < best_count):
                    best, best_count = i, self._sessions[h]
            self._index = (best + 1) % n
            return self._hosts[best]
        parts: list[bytes] = []
        if mode in (Mode.SOURCE_HASH, Mode.LOADBALANCE):
            parts.append(_addr_bytes(client_addr))
        if mode in (Mode.LOADBALANCE, Mode.HASH):
            parts.append(_addr_bytes(relay_addr))
            parts.append((relay_port & 0xFFFF).to_bytes(2, "big"))
        if mode is Mode.HASH:
            parts.append(hash_data)
        p = self._hash(b"".join(parts))
        i = p % n
        for _ in range(MAX_HASH_RETRIES):
            if self._hosts[i] in self._up:
                return self._hosts[i]
            p = self._hash(p.to_bytes(8, "little"))
            i = p % n
        return self._hosts[self._walk(i)]
