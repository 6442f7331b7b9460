"""Orbax checkpoints with resume, verified: a restarted run continues from its last good step.

Trees are saved as host (NumPy) arrays without the device axis, so a
checkpoint written on 8 devices restores on 1 and vice versa. With several
processes orbax writes once (coordinated) and every process reads it.

Integrity. orbax-checkpoint 0.12.8 verifies none of the data it reads back: its
only checksum (a crc32c codec in zarr3's sharding) covers the shard index, not
the arrays, and 16 bytes overwritten inside an array file restore as wrong
numbers without an error. So every step gets a manifest, `dem_jax_sha256.json`,
with the SHA-256 of each of its files, written after orbax has finished the step.
`latest_step` returns the newest step whose files match their manifest; a step
that does not (altered or truncated files, or no manifest: the process stopped
between orbax's write and the manifest's) is said in one line that names the
file, renamed `<step>.corrupt` (orbax ignores it), and the caller resumes from
the step before or starts over. A corrupt step is never restored.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dem_jax.engine import reporting

MANIFEST = "dem_jax_sha256.json"


class CorruptCheckpointError(reporting.ClearError, ValueError):
    """A checkpoint step whose files are not those that were written."""


def _file_digests(step_dir: str) -> dict[str, str]:
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel == MANIFEST:
                continue
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            out[rel] = h.hexdigest()
    return dict(sorted(out.items()))


def step_problem(step_dir: str) -> str | None:
    """What is wrong with a checkpoint step's files (one phrase naming the file), or None.

    Example:
      >>> checkpoint.step_problem("runs/tta/source/14")   # None: every file matches
    """
    manifest = os.path.join(step_dir, MANIFEST)
    try:
        with open(manifest) as f:
            expected = json.load(f)
    except FileNotFoundError:
        return (f"no {MANIFEST} (the run stopped before the step was complete, or an older "
                "dem_jax wrote it)")
    except (OSError, ValueError) as e:
        return f"{manifest} cannot be read ({e})"
    try:
        got = _file_digests(step_dir)
    except OSError as e:
        return f"a file cannot be read ({e})"
    for rel in sorted(set(expected) | set(got)):
        if rel not in got:
            return f"{os.path.join(step_dir, rel)} is missing"
        if rel not in expected:
            return f"{os.path.join(step_dir, rel)} was not written with the step"
        if got[rel] != expected[rel]:
            return (f"{os.path.join(step_dir, rel)} does not match its checksum (truncated "
                    "or altered)")
    return None


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for one pytree plus JSON metadata, verified.

    Example:
      >>> ckpt = Checkpointer(os.path.join(workdir, "source"), max_to_keep=2)
      >>> start = 0
      >>> if ckpt.latest_step() is not None:     # the newest step that is intact
      ...     state, meta = ckpt.restore(state)
      ...     start = meta["epoch"] + 1
      >>> ckpt.save(epoch, state, {"epoch": epoch})
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 2) -> None:
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))
        self._verified: set[int] = set()

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def latest_step(self) -> int | None:
        """The newest step whose files match their manifest; corrupt newer ones are set aside."""
        steps = sorted(self._mgr.all_steps(), reverse=True)
        if not steps or steps[0] in self._verified:
            return steps[0] if steps else None
        good, bad = None, []
        for step in steps:
            problem = None if step in self._verified else step_problem(self.step_dir(step))
            if problem is None:
                good = step
                break
            bad.append((step, problem))
        reporting.barrier("dem_jax_checkpoint_verified")  # all have read before any rename
        for step, problem in bad:
            then = (f"resuming from step {good}" if good is not None else
                    "no intact step is left: starting this work over")
            reporting.set_aside(self.step_dir(step), f"checkpoint step {step} of "
                                f"{self.directory} is corrupt: {problem}; {then}")
        if bad:
            reporting.barrier("dem_jax_checkpoint_set_aside")
            self._mgr.reload()
        if good is not None:
            self._verified.add(good)
        return good

    def save(self, step: int, state: Any, meta: dict | None = None) -> None:
        """Saves `state` (any pytree of arrays) and `meta` (JSON) at `step`, then its manifest."""
        host = jax.tree.map(np.asarray, state)
        self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta or {})))
        self._mgr.wait_until_finished()
        if reporting.is_writer():  # orbax wrote the step once; it is complete now
            reporting.write_text(os.path.join(self.step_dir(step), MANIFEST),
                                 json.dumps(_file_digests(self.step_dir(step)), indent=1))
        reporting.barrier("dem_jax_checkpoint_manifest")
        self._verified.add(step)

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores the tree at `step` (default: the latest intact) into the structure of `template`.

        Raises:
          FileNotFoundError: there is no (intact) step.
          CorruptCheckpointError: the requested `step` does not match its manifest, or
            orbax cannot read it; the message gives the cause first.
          ValueError: the checkpoint holds arrays of other shapes or dtypes than `template`.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        if step not in self._verified:
            problem = step_problem(self.step_dir(step))
            if problem is not None:
                raise CorruptCheckpointError(
                    f"Checkpoint step {step} in {self.directory} is corrupt: {problem}. Delete "
                    "that step's directory to resume from an older one or start over.")
            self._verified.add(step)
        abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), template)
        try:
            out = self._mgr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        except Exception as e:  # noqa: BLE001: orbax raises many kinds; the cause goes first
            cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CorruptCheckpointError(
                f"Checkpoint step {step} in {self.directory} cannot be restored: {cause}. It "
                "matches its manifest, so it was written so (another orbax version?). Delete "
                "that step's directory to resume from an older one or start over.") from e
        # Orbax hands back what was saved even where the template differs; a
        # checkpoint of another model or dtype must not pass for this one.
        mismatches = [
            f"{jax.tree_util.keystr(path)}: saved {np.shape(got)} {np.asarray(got).dtype}, "
            f"expected {np.shape(want)} {np.asarray(want).dtype}"
            for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(out["state"])[0],
                                         jax.tree.leaves(abstract))
            if np.shape(got) != np.shape(want) or np.asarray(got).dtype != np.asarray(want).dtype]
        if mismatches:
            raise ValueError(
                f"The checkpoint at step {step} in {self.directory} does not match the state it "
                f"is restored into ({len(mismatches)} arrays differ, first: {mismatches[0]}). "
                "It was written by another configuration: use a fresh directory.")
        return out["state"], dict(out["meta"])

    def close(self) -> None:
        self._mgr.close()
