"""Work-directory bookkeeping shared by the experiments: the config stamp, cached units,
what they derive from, metrics records; every fault a resumed run can meet."""

import json
import os
import stat
import tempfile

import numpy as np
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
    with pytest.raises(reporting.WorkdirError,
                       match=r"different configuration \(1 field differ: seeds: \[0, 1, 2\] "
                             r"there, \[5\] now"):
        reporting.claim_workdir(str(tmp_path), b)
    c = noisy_default.get_config()
    c.logging.wandb = True  # how a run is logged is not part of its identity
    reporting.claim_workdir(str(tmp_path), c)


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


def test_claim_workdir_refuses_a_file_a_read_only_directory_and_a_corrupt_stamp(
        tmp_path, monkeypatch):
    config = noisy_default.get_config()
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(reporting.WorkdirError, match="is a file, not a directory"):
        reporting.claim_workdir(str(afile), config)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root writes anyway: make the write probe fail as it would
        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    with pytest.raises(reporting.WorkdirError, match="cannot be written .*Permission denied"):
        reporting.claim_workdir(str(readonly), config)
    monkeypatch.undo()
    work = tmp_path / "work"
    reporting.claim_workdir(str(work), config)()
    text = (work / "config.json").read_text()
    (work / "config.json").write_text(text[:len(text) // 2])
    with pytest.raises(reporting.WorkdirError, match=r"config.json is not valid JSON .*delete "
                                                     r"config.json and run again"):
        reporting.claim_workdir(str(work), config)


@pytest.mark.parametrize("fault", ["truncated", "altered", "no_checksum"])
def test_a_corrupt_cached_unit_is_said_and_recomputed(tmp_path, capsys, fault):
    calls = []
    compute = lambda: calls.append(1) or {"acc": [0.5, 0.25]}  # noqa: E731
    path = str(tmp_path / "units" / "a.json")
    reporting.cached(path, compute)
    text = open(path).read()
    if fault == "truncated":
        text = text[:len(text) // 2]
    elif fault == "altered":  # valid JSON, another number
        text = text.replace("0.25", "0.75")
    else:  # a plain JSON file (an older dem_jax)
        text = json.dumps({"acc": [0.5, 0.75]})
    open(path, "w").write(text)
    assert reporting.cached(path, compute) == {"acc": [0.5, 0.25]} and len(calls) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and path in err[0] and err[0].endswith("Recomputing it."), err
    assert reporting.cached(path, compute) == {"acc": [0.5, 0.25]} and len(calls) == 2


def test_read_json_names_a_truncated_file(tmp_path):
    path = tmp_path / "progress.json"
    path.write_text('{"accuracy": {"fog": 0.5')
    with pytest.raises(reporting.CorruptFileError, match=f"{path} is not valid JSON"):
        reporting.read_json(str(path))


def test_results_are_the_same_bytes_whatever_the_key_order(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    reporting.write_json(str(a), {"lr": {"em": 0.1, "adadem": 1.0}, "seed": np.int64(0)})
    reporting.write_json(str(b), {"seed": 0, "lr": {"adadem": 1.0, "em": 0.1}})
    assert a.read_bytes() == b.read_bytes()


def test_units_of_another_source_model_are_set_aside(tmp_path, capsys):
    units = tmp_path / "units"
    reporting.derived_from(str(units), source_model="aaa")
    reporting.save_checked(str(units / "em.json"), {"acc": 0.5})
    reporting.derived_from(str(units), source_model="aaa")  # the same model: kept
    assert reporting.load_checked(str(units / "em.json")) == {"acc": 0.5}
    assert capsys.readouterr().err == ""
    reporting.derived_from(str(units), source_model="bbb")  # retrained, and different
    assert not (units / "em.json").exists() and (tmp_path / "units.stale" / "em.json").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "computed from another source_model" in err[0], err
    assert reporting.load_checked(str(units / reporting.INPUTS_FILE)) == {"source_model": "bbb"}


def test_a_resumed_run_writes_no_metrics_record_twice(tmp_path):
    log = reporting.MetricsLog(str(tmp_path))
    log.write(phase="source", epoch=0, loss=0.5)
    log.write(phase="source", epoch=1, loss=0.25)
    with open(log.path, "a") as f:
        f.write('{"time": 1, "phase": "sour')  # a record cut by a kill
    resumed = reporting.MetricsLog(str(tmp_path))
    resumed.write(phase="source", epoch=1, loss=0.25)  # redone after the last checkpoint
    resumed.write(phase="source", epoch=2, loss=0.125)
    records = [json.loads(line) for line in open(log.path)]
    assert [r["epoch"] for r in records] == [0, 1, 2], records
