"""Launchers that run dem_jax experiments on Cloud TPU slices (tpu.py) and GPU hosts (gpu.sh)."""
