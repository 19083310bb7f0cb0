#!/usr/bin/env bash
# Keeps Debian's packaged daemons from running on the host: carpool's tests,
# benchmarks and demo start them themselves, inside lab namespaces only.
# (Packages are installed behind a policy-rc.d that forbids starting them.)
set -u
for unit in keepalived.service haproxy.service nginx.service conntrackd.service postgresql.service; do
    if systemctl is-enabled "$unit" >/dev/null 2>&1; then
        systemctl disable --now "$unit" >/dev/null 2>&1 || true
    fi
done
exit 0
