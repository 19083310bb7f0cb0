"""zfs-replicate: ZFS and btrfs send/receive replication with promote, reverse and failback.

The pure layers live here: :mod:`.snapshots` (records and CLI output parsers),
:mod:`.retention` (keep-last-N and grandfather-father-son), :mod:`.plan` (the
planner: full / incremental / refuse, pruning, promote / reverse / failback as
step lists) and :mod:`.config` (``/etc/carpool/replicate.toml``). Backends
(:mod:`.zfs`, :mod:`.btrfs`), :mod:`.transport`, the executors
(:mod:`.executor`, :mod:`.btrfs_executor`), :mod:`.job` (one job's cycles and
failover commands), :mod:`.state` (crash-safe job state, dataset locks),
:mod:`.daemon` and :mod:`.cli` (``zfs-replicate``) run the plans; they make no
decision of their own.
"""
