"""pfsyncd: conntrack state synchronisation between two routers (FreeBSD's pfsync for Linux)."""
