"""Experiments: each module is `python -m experiments.<name> --config=... --workdir=...`."""
