"""Work-directory bookkeeping shared by the experiments: the config stamp and cached units."""

import os

import pytest

from dem_jax.engine import reporting
from experiments.configs import noisy_default


def test_claim_workdir_refuses_another_configuration_once_confirmed(tmp_path):
    a, b = noisy_default.get_config(), noisy_default.get_config()
    b.seeds = (5,)
    confirm = reporting.claim_workdir(str(tmp_path), a)
    reporting.claim_workdir(str(tmp_path), b)  # not confirmed yet: still free
    confirm()
    reporting.claim_workdir(str(tmp_path), a)  # the same configuration resumes
    with pytest.raises(ValueError, match="different configuration"):
        reporting.claim_workdir(str(tmp_path), b)


def test_cached_unit_is_computed_once_per_run_on_every_process(tmp_path, monkeypatch):
    calls = []
    compute = lambda: calls.append(1) or {"acc": 0.5}  # noqa: E731
    path = str(tmp_path / "units" / "a.json")
    assert reporting.cached(path, compute) == {"acc": 0.5}
    assert reporting.cached(path, compute) == {"acc": 0.5} and len(calls) == 1
    assert os.path.exists(path), "process 0 writes the unit"
    # Another host: process 0's file is not visible here, and this process writes
    # nothing; the second call must still not compute again (alone, with
    # collectives that the other hosts never join).
    monkeypatch.setattr(reporting, "is_writer", lambda: False)
    other = str(tmp_path / "host1" / "b.json")
    assert reporting.cached(other, compute) == {"acc": 0.5}
    assert reporting.cached(other, compute) == {"acc": 0.5}
    assert len(calls) == 2 and not os.path.exists(other)
