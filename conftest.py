"""Root pytest configuration.

Eight fake CPU devices are requested before JAX initialises, so the multi-device
tests (pmap / shard_map equivalence) run on any laptop and in CI.

XLA compiles are most of the suite's time, and many tests compile the same
program again (a resumed run next to the uninterrupted one, one device next to
eight, the same tiny model in several tests). A persistent compilation cache in a
temporary directory, private to this pytest session and removed at its end, lets
the second compile of an identical program be a load. It starts empty, so no
result depends on an earlier session.
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the environment above)

_COMPILE_CACHE = tempfile.mkdtemp(prefix="dem_jax_test_xla_cache_")
atexit.register(shutil.rmtree, _COMPILE_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _COMPILE_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
