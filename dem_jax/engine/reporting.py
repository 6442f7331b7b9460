"""Run bookkeeping: JSONL metrics, atomic JSON files, progress bars, process 0 writes."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
import tqdm


def is_writer() -> bool:
    """Only process 0 writes logs and results (multi-host runs)."""
    return jax.process_index() == 0


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.ndarray, jax.Array)):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    return x


class MetricsLog:
    """Appends one JSON object per line to `<workdir>/metrics.jsonl`."""

    def __init__(self, workdir: str, name: str = "metrics.jsonl"):
        self.path = os.path.join(workdir, name)
        if is_writer():
            os.makedirs(workdir, exist_ok=True)

    def write(self, **record: Any) -> None:
        if not is_writer():
            return
        record = {"time": round(time.time(), 3), **_jsonable(record)}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically (a crash never leaves a half-written file)."""
    if not is_writer():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(_jsonable(obj), f, indent=1)
    os.replace(tmp, path)


def read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def write_text(path: str, text: str) -> None:
    if not is_writer():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# What every "± std" over seeds in the results is (numpy's default, ddof=0).
STD_KIND = "population std, ddof=0"

# Units this process computed but did not write (every process but 0, see
# `is_writer`), by path: a later call for the same unit in the same run must not
# compute it again alone when this host does not see process 0's file.
_UNWRITTEN: dict[str, Any] = {}


def cached(path: str, compute: Callable[[], Any]) -> Any:
    """A finished unit of work: loaded from its JSON file, or computed and saved.

    Example:
      >>> result = reporting.cached(os.path.join(workdir, "units", "em.json"), run_em)
    """
    if os.path.exists(path):
        return read_json(path)
    if path in _UNWRITTEN:
        return _UNWRITTEN[path]
    out = compute()
    write_json(path, out)
    if not is_writer():
        _UNWRITTEN[path] = out
    return out


def claim_workdir(workdir: str, config) -> Callable[[], None]:
    """Refuses a work directory that holds a run of another configuration.

    Returns `confirm`, which writes the configuration into `workdir/config.json`.
    Call it once the experiment has been set up (data found, models built), so
    that a run stopped by a bad setting does not lock the directory against the
    corrected one.

    Example:
      >>> confirm = reporting.claim_workdir(workdir, config)
      >>> exp = Experiment(config, workdir)   # may raise: nothing stamped yet
      >>> confirm()
    """
    os.makedirs(workdir, exist_ok=True)
    stamp = os.path.join(workdir, "config.json")
    as_json = config.to_json_best_effort(sort_keys=True)
    if os.path.exists(stamp) and open(stamp).read() != as_json:
        raise ValueError(
            f"{workdir} holds a run with a different configuration (see {stamp}). Use another "
            "--workdir, or delete that directory to start over.")
    return lambda: write_text(stamp, as_json)


def progress(iterable: Iterable, *, desc: str, total: int | None = None, **kw):
    """A tqdm progress bar on stderr, shown by process 0 only."""
    return tqdm.tqdm(iterable, desc=desc, total=total, disable=not is_writer(),
                     file=sys.stderr, dynamic_ncols=True, leave=False, **kw)
