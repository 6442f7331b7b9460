"""Orbax checkpoints with resume: an interrupted run restarted with the same
command continues from its last checkpoint.

Trees are saved as host (NumPy) arrays without the device axis, so a
checkpoint written on 8 devices restores on 1 and vice versa. With several
processes orbax writes once (coordinated) and every process reads it.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    """A thin wrapper over `ocp.CheckpointManager` for one pytree plus JSON metadata.

    Example:
      >>> ckpt = Checkpointer(os.path.join(workdir, "source"), max_to_keep=2)
      >>> start = 0
      >>> if ckpt.latest_step() is not None:
      ...     state, meta = ckpt.restore(state)
      ...     start = meta["epoch"] + 1
      >>> ckpt.save(epoch, state, {"epoch": epoch})
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int | None = 2) -> None:
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._mgr = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, state: Any, meta: dict | None = None) -> None:
        """Saves `state` (any pytree of arrays) and `meta` (JSON) at `step`, and waits."""
        host = jax.tree.map(np.asarray, state)
        self._mgr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(host), meta=ocp.args.JsonSave(meta or {})))
        self._mgr.wait_until_finished()

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores the tree at `step` (default latest) into the structure of `template`."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        abstract = jax.tree.map(lambda x: np.zeros(np.shape(x), np.asarray(x).dtype), template)
        out = self._mgr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
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
