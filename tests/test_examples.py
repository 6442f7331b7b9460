"""The README's example files run as shown."""

import os
import runpy

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flax_training_loop_learns_and_moves_the_mec():
    example = runpy.run_path(os.path.join(ROOT, "examples", "flax_training_loop.py"))
    out = example["main"](steps=150)
    assert np.isfinite(out["loss"])
    assert out["accuracy"] > 0.8  # 8 labels; chance is 0.5
    # The MEC left its uniform start: each row leans to its own class.
    assert np.all(np.diag(out["mec"]) > 0.9)

