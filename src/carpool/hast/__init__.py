"""HAST: synchronous block replication between two nodes, as FreeBSD's hastd does it.

Pure layers (no sockets, no files except :func:`carpool.hast.metadata.write_at`):

* :mod:`carpool.hast.common` — shared enums (Replication, Checksum, Compression, Role)
  and defaults (port 8457, extent 2 MiB, keepdirty 64, timeout 20 s).
* :mod:`carpool.hast.config` — hast.conf → :class:`~carpool.hast.config.HastConfig`.
* :mod:`carpool.hast.metadata` — the on-disk metadata block, the provider layout and
  the resync/split-brain decision.
* :mod:`carpool.hast.activemap` — the per-extent dirty bitmap with keepdirty.
* :mod:`carpool.hast.wire` — carpool's framed primary↔secondary protocol.
* :mod:`carpool.hast.nbd` — the NBD server side as a sans-I/O state machine.

The daemon (``primary``/``secondary``/``daemon``) and ``hastctl`` build on these.
"""
