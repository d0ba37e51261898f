"""Benchmarks: the coordinator measured beside its Redis floor (and peers) in one run."""
