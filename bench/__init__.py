"""Benchmarks: compared variants in one process, ratios against targets (see docs/performance.md)."""
