"""Benchmarks behind `make bench-*`: each prints ratios measured in one run."""
