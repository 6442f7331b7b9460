"""The orbax checkpoint wrapper: round trip, and a checkpoint of another shape refused."""

import numpy as np
import pytest

from dem_jax.engine import checkpoint


def test_round_trip_and_mismatched_template_is_refused(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
    state = {"w": np.arange(6, dtype=np.float32), "n": {"k": np.ones((2, 2), np.int32)}}
    ckpt.save(3, state, {"epoch": 3})
    restored, meta = ckpt.restore(state)
    np.testing.assert_array_equal(restored["w"], state["w"])
    np.testing.assert_array_equal(restored["n"]["k"], state["n"]["k"])
    assert meta == {"epoch": 3}
    other = {"w": np.zeros(4, np.float32), "n": {"k": np.ones((2, 2), np.int32)}}
    # Orbax alone returns the saved (6,) array for a (4,) template, silently.
    with pytest.raises(ValueError, match=r"\['w'\]: saved \(6,\) float32, expected \(4,\)"):
        ckpt.restore(other)
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        checkpoint.Checkpointer(str(tmp_path / "empty")).restore(state)
