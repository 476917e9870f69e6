"""Benchmarks and the one-command GPU check (``python -m bench.gpu_check``); see bench/RESULTS.md."""
