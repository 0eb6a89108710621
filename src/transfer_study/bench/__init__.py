"""Benchmarks and the study timer; no stage imports them."""
