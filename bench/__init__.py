"""Benchmarks: serving load harness, reports and comparisons."""
