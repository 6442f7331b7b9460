"""Root pytest configuration.

Eight fake CPU devices are requested before JAX initialises, so the multi-device
tests (pmap / shard_map equivalence) run on any laptop and in CI.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
