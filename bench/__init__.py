"""Benchmarks that print figures; never part of the pass/fail test suite (see bench/README.md)."""
