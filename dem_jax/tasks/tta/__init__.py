"""Test-time adaptation: `methods` (per-device steps) and `protocol` (streams, settings, DEM*, sweeps)."""
