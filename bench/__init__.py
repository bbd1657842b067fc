"""Benchmarks (not tests): they print tables. See bench/README.md."""
