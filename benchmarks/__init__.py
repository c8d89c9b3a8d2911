"""Benchmarks: solver speed, layer throughput (dense vs 2:4 vs ARMOR) and end-to-end prefill/decode."""
