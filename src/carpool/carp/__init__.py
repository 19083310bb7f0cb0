"""CARP, the Common Address Redundancy Protocol, as FreeBSD's carp(4) speaks it."""
