"""Run bookkeeping: JSONL metrics, checked JSON files, the work directory, progress bars.

Everything a restarted run reads back is verified before it is used:

* a cached unit or progress file (`cached`, `save_checked`/`load_checked`) carries
  the SHA-256 of its content, written with it in one atomic file; a file that
  does not match (truncated, altered, written by an older dem_jax without a
  checksum) is said in one line and recomputed, never used;
* what was computed from an input that can change (the source model) records
  that input's fingerprint (`derived_from`): computed from another, it is set
  aside and recomputed;
* orbax checkpoints are verified the same way (`engine.checkpoint`).

Errors a user can act on (`ClearError`: a bad work directory, a corrupt file)
carry a complete one-paragraph message; the entry points print it without a
traceback (`experiments.cli.run`). Only process 0 writes (multi-host runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
import tqdm


class ClearError(Exception):
    """An error whose message says all a user needs: what is wrong, where, and what to do.

    Entry points print it as one paragraph, without a traceback.
    """


class CorruptFileError(ClearError, ValueError):
    """A file whose content is not what was written: truncated, altered, or not JSON."""


class WorkdirError(ClearError, ValueError):
    """A work directory that cannot be used: a file, read-only, or another run's."""


def is_writer() -> bool:
    """Only process 0 writes logs and results (multi-host runs)."""
    return jax.process_index() == 0


def warn(message: str) -> None:
    """One line on stderr (process 0), above any progress bar: `warning: message`."""
    if is_writer():
        tqdm.tqdm.write(f"warning: {message}", file=sys.stderr)


def barrier(name: str) -> None:
    """Waits for every process (multi-host runs) after process 0 changed shared files."""
    if jax.process_count() > 1:
        import orbax.checkpoint as ocp  # the coordination service's barrier, no device work
        ocp.multihost.sync_global_processes(name)


def set_aside(path: str, why: str, *, suffix: str = "corrupt") -> str:
    """Renames `path` to `path.<suffix>` (numbered if taken) and says so in one line.

    Args:
      why: the reason, naming `path` (a sentence without its full stop).

    Kept rather than deleted, to look at; nothing reads it again.

    Returns:
      The new path.
    """
    target, n = f"{path}.{suffix}", 1
    while os.path.lexists(target):
        n += 1
        target = f"{path}.{suffix}{n}"
    if is_writer():
        os.replace(path, target)
    warn(f"{why}; set aside as {target}.")
    return target


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


def _canonical(obj) -> str:
    """The one text of a JSON value that its checksum is computed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


# A checked file is {"sha256": hex digest of _canonical(data), "data": data}.
_CHECKED = ("data", "sha256")


def _atomic_write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj: Any, *, checksum: bool = False) -> None:
    """Writes JSON atomically (a crash never leaves a half-written file).

    Keys are sorted, so identical runs write identical bytes. With `checksum`,
    the file also holds the SHA-256 of its content, which `read_json` checks:
    use it for whatever a restarted run reads back (see `save_checked`).
    """
    if not is_writer():
        return
    obj = _jsonable(obj)
    if checksum:
        obj = {"data": obj, "sha256": hashlib.sha256(_canonical(obj).encode()).hexdigest()}
    _atomic_write(path, json.dumps(obj, indent=1, sort_keys=True))


def read_json(path: str, *, checked: bool = False) -> Any:
    """Reads a JSON file; the content of a checked one (`write_json(checksum=True)`) is verified.

    Args:
      checked: require a checksum (a file without one is refused).

    Raises:
      CorruptFileError: the file is not JSON, or does not match its checksum, or
        (with `checked`) has none. The message names the file.
    """
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path} is not valid JSON ({e}): it was truncated or "
                               "altered after it was written.") from None
    if isinstance(obj, dict) and sorted(obj) == list(_CHECKED):
        digest = hashlib.sha256(_canonical(obj["data"]).encode()).hexdigest()
        if digest != obj["sha256"]:
            raise CorruptFileError(f"{path} does not match its checksum: it was altered after "
                                   "it was written.")
        return obj["data"]
    if checked:
        raise CorruptFileError(f"{path} has no checksum (written by an older dem_jax, or "
                               "replaced), so it cannot be trusted.")
    return obj


def mean_std(values, *, scale: float = 100.0) -> str:
    """"63.4 ± 0.6": mean ± std (`STD_KIND`) of `values` times `scale` (fractions to points).

    Example:
      >>> reporting.mean_std([0.62, 0.64])
      '63.0 ± 1.0'
    """
    v = scale * np.asarray(values, np.float64)
    return f"{v.mean():.1f} ± {v.std():.1f}"


def save_checked(path: str, obj: Any) -> None:
    """Saves what a restarted run will read back with `load_checked` (JSON with a checksum).

    Example:
      >>> reporting.save_checked(os.path.join(unit_dir, "progress.json"), result)
      >>> result = reporting.load_checked(os.path.join(unit_dir, "progress.json"))
    """
    write_json(path, obj, checksum=True)


def load_checked(path: str) -> Any | None:
    """What `save_checked` wrote, or None: none saved, or not trustworthy (said in one line).

    A restarted run treats None as "not done yet" and recomputes it.
    """
    if not os.path.exists(path):
        return None
    try:
        return read_json(path, checked=True)
    except (CorruptFileError, OSError) as e:
        warn(f"{e} Recomputing it.")
        return None


def write_text(path: str, text: str) -> None:
    if not is_writer():
        return
    _atomic_write(path, text)


# What every "± std" over seeds in the results is (numpy's default, ddof=0).
STD_KIND = "population std, ddof=0"

# Units this process computed but did not write (every process but 0, see
# `is_writer`), by path: a later call for the same unit in the same run must not
# compute it again alone when this host does not see process 0's file.
_UNWRITTEN: dict[str, Any] = {}


def cached(path: str, compute: Callable[[], Any]) -> Any:
    """A finished unit of work: loaded from its checked JSON file, or computed and saved.

    A file that does not match its checksum is said in one line and recomputed.

    Example:
      >>> result = reporting.cached(os.path.join(workdir, "units", "em.json"), run_em)
    """
    out = load_checked(path)
    if out is not None:
        return out
    if path in _UNWRITTEN:
        return _UNWRITTEN[path]
    out = compute()
    save_checked(path, out)
    if not is_writer():
        _UNWRITTEN[path] = out
    return out


def fingerprint(tree: Any) -> str:
    """SHA-256 of a pytree of arrays: structure, shapes, dtypes and bytes.

    Example:
      >>> reporting.fingerprint({"params": params})   # 64 hex digits
    """
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


INPUTS_FILE = "inputs.json"


def derived_from(directory: str, **inputs: str) -> None:
    """Records what `directory`'s cached results are computed from; sets it aside if that changed.

    A cached result is right only for the inputs it was computed from. The source
    model of test-time and domain adaptation is one: restored from a corrupt
    checkpoint it is retrained, which on the same machine gives the same model
    (training is deterministic), and on another machine (other CPU, other
    accelerator) a slightly different one. `inputs` maps names to fingerprints
    (`fingerprint(variables)`); when those recorded in `directory/inputs.json`
    differ, or cannot be read, the whole directory (units, their checkpoints) is
    set aside (`<directory>.stale`) and recomputed, so that results never mix
    units of two models.

    Example:
      >>> variables = train_lib.train_source(...)
      >>> reporting.derived_from(os.path.join(workdir, "units"),
      ...                        source_model=reporting.fingerprint(variables))
    """
    stamp = os.path.join(directory, INPUTS_FILE)
    inputs = dict(sorted(inputs.items()))
    held = os.path.isdir(directory) and bool(os.listdir(directory))
    recorded = load_checked(stamp) if held else None
    barrier("dem_jax_derived_from_read")  # every process has read before process 0 changes it
    if held and recorded != inputs:
        changed = sorted(k for k in set(inputs) | set(recorded or {})
                         if (recorded or {}).get(k) != inputs.get(k))
        why = (f"computed from another {', '.join(changed)} than this run's" if recorded
               else f"no valid record ({INPUTS_FILE}) of what it was computed from")
        set_aside(directory, f"{directory} holds results {why}; they are all recomputed",
                  suffix="stale")
    if recorded != inputs:
        save_checked(stamp, inputs)
    barrier("dem_jax_derived_from_written")


class MetricsLog:
    """Metrics of a run: one JSON object per line in `<workdir>/metrics.jsonl`, and more sinks.

    A resumed run redoes work from its last checkpoint and reloads finished units:
    a record equal (but for its time) to one already in the file is not written
    again, so no record appears twice. A last line cut by a kill is dropped.

    `sinks` (`engine.metrics.TensorBoard`, `engine.metrics.WandB`) get every
    new record too. `every_steps`: how often a training loop reads its
    step metrics back from the device (see `engine.train.train_source`).

    Example:
      >>> log = reporting.MetricsLog(workdir)
      >>> log.write(phase="source", epoch=0, loss=0.3)
    """

    def __init__(self, workdir: str, name: str = "metrics.jsonl", *, sinks: tuple = (),
                 every_steps: int = 100):
        self.path = os.path.join(workdir, name)
        self.sinks = tuple(sinks)
        self.every_steps = every_steps
        self._seen: set[str] = set()
        if not is_writer():
            return
        os.makedirs(workdir, exist_ok=True)
        if os.path.exists(self.path):
            with open(self.path, "rb") as f:
                text = f.read()
            keep = text[:text.rfind(b"\n") + 1]
            if len(keep) < len(text):  # a record cut by a kill
                with open(self.path, "r+b") as f:
                    f.truncate(len(keep))
            for line in keep.decode(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(record, dict):
                    record.pop("time", None)
                    self._seen.add(_canonical(record))

    def write(self, **record: Any) -> None:
        if not is_writer():
            return
        record = _jsonable(record)
        key = _canonical(record)
        if key in self._seen:
            return
        self._seen.add(key)
        with open(self.path, "a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _flat_dict(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_writable(workdir: str) -> None:
    if os.path.lexists(workdir) and not os.path.isdir(workdir):
        raise WorkdirError(f"--workdir={workdir} is a file, not a directory. Give a directory "
                           "(it is created if missing).")
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.TemporaryFile(dir=workdir):
            pass
    except OSError as e:
        raise WorkdirError(f"--workdir={workdir} cannot be written ({e.strerror or e}). Give a "
                           "directory you can write to, or fix its permissions.") from None


def claim_workdir(workdir: str, config, *, ignore: tuple[str, ...] = ("logging",)
                  ) -> Callable[[], None]:
    """Refuses a work directory that cannot be written or holds a run of another configuration.

    Returns `confirm`, which writes the configuration into `workdir/config.json`.
    Call it once the experiment has been set up (data found, models built), so
    that a run stopped by a bad setting does not lock the directory against the
    corrected one. Fields under `ignore` (how the run is logged) may differ.

    Raises:
      WorkdirError: the directory is a file or read-only, its `config.json` is
        corrupt, or it holds another configuration (the differing fields named).

    Example:
      >>> confirm = reporting.claim_workdir(workdir, config)
      >>> exp = Experiment(config, workdir)   # may raise: nothing stamped yet
      >>> confirm()
    """
    _check_writable(workdir)
    stamp = os.path.join(workdir, "config.json")
    as_json = config.to_json_best_effort(sort_keys=True)
    if os.path.exists(stamp):
        try:
            saved = read_json(stamp)
        except CorruptFileError as e:
            raise WorkdirError(
                f"{e} It records which configuration {workdir} holds. If you know the run "
                "there is of this same configuration, delete config.json and run again to "
                "resume; otherwise use another --workdir.") from None
        now = json.loads(as_json)
        skip = lambda k: any(k == p or k.startswith(p + ".") for p in ignore)  # noqa: E731
        a, b = _flat_dict(saved if isinstance(saved, dict) else {}), _flat_dict(now)
        diff = [k for k in sorted(set(a) | set(b)) if not skip(k) and a.get(k) != b.get(k)]
        if diff:
            def short(k, d):
                text = repr(d[k]) if k in d else "(absent)"
                return text if len(text) <= 40 else text[:36] + " ..."
            shown = "; ".join(f"{k}: {short(k, a)} there, {short(k, b)} now" for k in diff[:5])
            more = f" and {len(diff) - 5} more" if len(diff) > 5 else ""
            raise WorkdirError(
                f"{workdir} holds a run with a different configuration ({len(diff)} "
                f"field{'s' if len(diff) > 1 else ''} differ: {shown}{more}; see {stamp}). "
                "Use another --workdir, or delete that directory to start over.")
    return lambda: write_text(stamp, as_json)


def progress(iterable: Iterable, *, desc: str, total: int | None = None, **kw):
    """A tqdm progress bar on stderr, shown by process 0 only."""
    return tqdm.tqdm(iterable, desc=desc, total=total, disable=not is_writer(),
                     file=sys.stderr, dynamic_ncols=True, leave=False, **kw)
