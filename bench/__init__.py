"""Benchmark scripts for dem_jax (run as modules, e.g. `python -m bench.losses`)."""
