"""The orbax checkpoint wrapper: round trip, a checkpoint of another shape refused, corrupt steps never used."""

import os

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


def _largest_array_file(step_dir):
    """The biggest file of the saved arrays (orbax's OCDBT data files)."""
    files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(step_dir, "state"))
             for f in names if os.sep + "d" + os.sep in os.path.join(root, f)]
    return max(files, key=os.path.getsize)


def _saved(tmp_path, steps=(0, 1)):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
    for s in steps:
        ckpt.save(s, {"w": np.arange(256, dtype=np.float32) + s}, {"epoch": s})
    ckpt.close()
    return checkpoint.Checkpointer(str(tmp_path / "c"))


@pytest.mark.parametrize("fault", ["bytes", "truncated", "no_manifest"])
def test_a_corrupt_step_is_set_aside_and_the_one_before_restored(tmp_path, capsys, fault):
    ckpt = _saved(tmp_path)
    newest = ckpt.step_dir(1)
    if fault == "no_manifest":  # the process stopped between orbax's write and the manifest's
        os.remove(os.path.join(newest, checkpoint.MANIFEST))
        named = checkpoint.MANIFEST
    else:
        target = _largest_array_file(newest)
        data = bytearray(open(target, "rb").read())
        if fault == "bytes":  # what orbax alone restores as wrong numbers, silently
            data[len(data) // 2:len(data) // 2 + 16] = b"\xff" * 16
        else:
            data = data[:len(data) // 2]
        open(target, "wb").write(bytes(data))
        named = os.path.relpath(target, newest)
    ckpt = checkpoint.Checkpointer(str(tmp_path / "c"))
    assert ckpt.latest_step() == 0, "the corrupt step 1 must not be used"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "resuming from step 0" in err[0], err
    state, meta = ckpt.restore({"w": np.zeros(256, np.float32)})
    np.testing.assert_array_equal(state["w"], np.arange(256, dtype=np.float32))
    assert meta == {"epoch": 0}
    assert os.path.isdir(newest + ".corrupt"), "kept aside, for a look"
    ckpt.save(1, {"w": np.ones(256, np.float32)}, {"epoch": 1})  # the step is redone
    assert ckpt.latest_step() == 1


def test_no_intact_step_means_start_over_and_an_explicit_corrupt_step_is_refused(tmp_path):
    ckpt = _saved(tmp_path, steps=(0,))
    target = _largest_array_file(ckpt.step_dir(0))
    open(target, "ab").write(b"\x00")
    with pytest.raises(checkpoint.CorruptCheckpointError, match="does not match its checksum"):
        ckpt.restore({"w": np.zeros(256, np.float32)}, step=0)
    assert ckpt.latest_step() is None
