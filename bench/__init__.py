"""Benchmarks run by `make bench`; see BENCHMARKS in the README."""
