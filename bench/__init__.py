"""Benchmarks and the load generator (`make bench`); not a shipped package."""
