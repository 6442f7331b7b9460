"""Faults in a work directory (issue 20) on the TTA experiment end to end: a corrupt source
model checkpoint, a corrupt continual-unit checkpoint, a truncated unit file. The
resumed run says each in one line, recomputes what it must, and ends with the results of an
undisturbed run; nothing corrupt is used."""

import glob
import os

from experiments import tta_lib
from tests.test_tta_experiment import tiny_config


def small_config():
    c = tiny_config()
    c.seeds = (0, 1)
    c.rows = ("noadapt",)            # the source model itself: no lr sweep, a cheap runner
    c.settings = ("continual",)
    c.lr_sweep_losses = ()
    c.max_test_examples = 80
    c.checkpoint_continual = True
    return c


def overwrite_16_bytes(step_dir):
    """16 bytes in the middle of the largest array file: orbax alone restores them silently."""
    files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "*"), recursive=True)
             if os.path.isfile(f) and f"{os.sep}d{os.sep}" in f]
    path = max(files, key=os.path.getsize)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2:len(data) // 2 + 16] = b"\xff" * 16
    open(path, "wb").write(bytes(data))
    return path


def truncate(path):
    text = open(path).read()
    open(path, "w").write(text[:len(text) // 2])


def test_corrupt_checkpoints_and_units_are_recomputed_never_used(tmp_path, save_log, capsys):
    config = small_config()
    work = tmp_path / "work"
    reference = tta_lib.run(config, str(work))
    reference_bytes = (work / "results.json").read_bytes()
    units = work / "units" / "continual" / "noadapt"
    # Killed after the last domain's checkpoint of seed 0, before its unit file; then
    # that checkpoint, the source model's and seed 1's finished unit file are damaged.
    os.remove(units / "seed0.json")
    bad = [overwrite_16_bytes(work / "source" / "0"), overwrite_16_bytes(units / "seed0" / "1"),
           str(units / "seed1.json")]
    truncate(units / "seed1.json")
    capsys.readouterr()
    save_log.start()
    resumed = tta_lib.run(config, str(work))
    assert resumed == reference, "the resumed run must give the undisturbed run's results"
    assert (work / "results.json").read_bytes() == reference_bytes
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning:")]
    assert len(warnings) == 3 and all(any(b in w for w in warnings) for b in bad), warnings
    # The source model was retrained (the same model: the units computed from it are kept),
    # seed 0 started over from the source model; seed 1's unit file was rebuilt from its
    # intact checkpoint (its last domain), with nothing left to adapt.
    assert save_log.under(work) == [("source", 0)] + [
        (os.path.join("units", "continual", "noadapt", "seed0"), d) for d in (0, 1)]
