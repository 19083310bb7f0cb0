#!/usr/bin/env bash
# Keeps Debian's packaged daemons from running on the host: carpool's tests and
# benchmarks start ucarp and keepalived themselves, inside lab namespaces only.
set -u
for unit in keepalived.service; do
    if systemctl is-enabled "$unit" >/dev/null 2>&1; then
        systemctl disable --now "$unit" >/dev/null 2>&1 || true
    fi
done
exit 0
