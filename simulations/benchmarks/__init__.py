"""Benchmarks that run FedCT beside the alternatives a user would otherwise choose."""
