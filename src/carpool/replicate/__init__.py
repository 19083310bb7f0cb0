"""zfs-replicate: ZFS and btrfs send/receive replication with promote, reverse and failback.

The pure layers live here: :mod:`.snapshots` (records and CLI output parsers),
:mod:`.retention` (keep-last-N and grandfather-father-son), :mod:`.plan` (the
planner: full / incremental / refuse, pruning, promote / reverse / failback as
step lists) and :mod:`.config` (``/etc/carpool/replicate.toml``). Backends,
transports and the daemon run the plans; they make no decision of their own.
"""
