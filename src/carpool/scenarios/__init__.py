"""Whole scenarios from the guide, run in a lab: used by make demo, the e2e tests and make soak."""
