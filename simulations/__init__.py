"""Synthetic hospitals, the local multi-site driver, baselines and benchmarks."""
