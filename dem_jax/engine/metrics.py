"""Where metrics go besides `metrics.jsonl`: TensorBoard event files and Weights & Biases.

Both are sinks of `reporting.MetricsLog` and get each new record once (a
resumed run writes nothing twice). Neither is on the hot path: records are
written per epoch or per finished unit, never per step; tensorboardX writes its
event files from a background thread, and wandb sends from its own process.

* TensorBoard (`logging.tensorboard`, on by default): event files in
  `<workdir>/tensorboard`, written by tensorboardX without TensorFlow
  (`tensorboard --logdir <workdir>/tensorboard`).
* Weights & Biases (`logging.wandb`, off by default): `wandb` is imported only
  then, and is not a dependency of dem_jax (`pip install wandb`).

A record becomes scalars: its text fields and its seed name the series
(`noisy/symmetric:0.4/elr/seed0/test_accuracy`), its `epoch` or `step` is the
x axis (0 for a record of a finished unit), each other number is a value.

Example (an experiment's config and `run`):
  >>> c.logging = metrics.default_config()       # in experiments/configs/<name>.py
  >>> log = metrics.open_log(workdir, config)    # a reporting.MetricsLog
  >>> log.write(phase="source", epoch=0, loss=0.31, accuracy=0.9)
"""

from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from dem_jax.engine import reporting

_AXES = ("epoch", "step")


class StepMetrics:
    """Step metrics kept on the device and read back every `every_steps` steps.

    Reading a metric with `float(...)` after every step makes the host wait for
    the accelerator each step. Here the step outputs (device scalars) are kept
    and fetched `every_steps` at a time with one `jax.device_get`; `means()`
    gives the mean over the epoch's steps, summed on the host in step order in
    float64: the values of reading every step.

    Example:
      >>> acc = metrics.StepMetrics(("loss", "accuracy"), len(batches), every_steps=100)
      >>> for batch in batches:
      ...     state, m = step(state, batch)
      ...     acc.add(m)                # no host transfer here but every 100 steps
      >>> log.write(phase="source", epoch=epoch, **acc.means())
    """

    def __init__(self, names, num_steps: int, *, every_steps: int = 100):
        if every_steps < 1:
            raise ValueError(f"every_steps must be >= 1, got {every_steps}.")
        self.num_steps = num_steps
        self.every_steps = every_steps
        self._sums = {k: 0.0 for k in names}
        self._pending: list = []

    def add(self, step_metrics: dict) -> None:
        self._pending.append(step_metrics)
        if len(self._pending) >= self.every_steps:
            self._flush()

    def _flush(self) -> None:
        import jax
        if not self._pending:
            return
        for m in jax.device_get(self._pending):
            for k in self._sums:
                self._sums[k] += float(m[k]) / self.num_steps
        self._pending = []

    def means(self) -> dict[str, float]:
        """{name: mean over the steps added} (the last pending ones read now)."""
        self._flush()
        return dict(self._sums)


def default_config():
    """The `logging` block of every experiment config (`ml_collections.ConfigDict`).

    Fields: `tensorboard` (bool), `wandb` (bool), `wandb_project`, `wandb_entity`
    (str; "" = wandb's default), `every_steps`: a training loop reads its step
    metrics back from the device every this many steps, not every step (the
    logged values are per-epoch means either way). A work directory accepts
    any change of this block on resume (`reporting.claim_workdir`).
    """
    import ml_collections
    return ml_collections.ConfigDict(dict(tensorboard=True, wandb=False, wandb_project="dem_jax",
                                          wandb_entity="", every_steps=100))


def scalars(record: dict) -> tuple[str, int, dict[str, float]]:
    """(series prefix, x, {name: value}) of a metrics record.

    Example:
      >>> scalars({"phase": "noisy", "row": "elr", "seed": 0, "epoch": 3, "loss": 0.5})
      ('noisy/elr/seed0', 3, {'loss': 0.5})
    """
    parts = [str(v) for k, v in record.items() if isinstance(v, str)]
    if isinstance(record.get("seed"), int):
        parts.append(f"seed{record['seed']}")
    x = next((int(record[a]) for a in _AXES if isinstance(record.get(a), (int, float))), 0)
    values = {k: float(v) for k, v in record.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)
              and k not in _AXES + ("seed",)}
    return "/".join(parts), x, values


class TensorBoard:
    """Event files in `directory`, written by tensorboardX (no TensorFlow)."""

    def __init__(self, directory: str):
        from tensorboardX import SummaryWriter  # the 'experiments' extra (dem_jax._extras)
        # A unique file per writer: a resumed run started within the same second
        # would otherwise get the same name and replace the first run's file.
        self._writer = SummaryWriter(logdir=directory, flush_secs=30,
                                     filename_suffix=f".{os.getpid()}.{time.time_ns()}")

    def write(self, record: dict) -> None:
        prefix, x, values = scalars(record)
        for name, value in values.items():
            self._writer.add_scalar(f"{prefix}/{name}" if prefix else name, value, x)
        self._writer.flush()  # a record per epoch or unit, never per step: cheap, kill-safe

    def close(self) -> None:
        self._writer.close()


class WandB:
    """A Weights & Biases run; `wandb` is imported here only (it is not a dependency)."""

    def __init__(self, directory: str, *, project: str, entity: str = "",
                 config: dict | None = None, name: str | None = None,
                 run_id: str | None = None):
        try:
            import wandb
        except ImportError:
            raise reporting.ClearError(
                "--config.logging.wandb=True needs the wandb package, which dem_jax does not "
                "install: pip install wandb (then `wandb login`), or leave logging.wandb "
                "False.") from None
        self._run = wandb.init(project=project, entity=entity or None, dir=directory,
                               config=config, name=name, id=run_id, resume="allow")

    def write(self, record: dict) -> None:
        prefix, x, values = scalars(record)
        self._run.log({f"{prefix}/{k}" if prefix else k: v for k, v in values.items()})

    def close(self) -> None:
        self._run.finish()


def open_log(workdir: str, config: Any = None) -> reporting.MetricsLog:
    """The `reporting.MetricsLog` of a run, with the sinks that `config.logging` asks for.

    Only process 0 opens sinks. A config without a `logging` block gets the
    defaults of `default_config()`.
    """
    options = dict(default_config())
    if config is not None and "logging" in config:
        options.update(dict(config.logging))
    sinks = []
    if reporting.is_writer():
        if options["tensorboard"]:
            sinks.append(TensorBoard(os.path.join(workdir, "tensorboard")))
        if options["wandb"]:
            # One W&B run per work directory: a resumed run continues it.
            path = os.path.abspath(workdir)
            sinks.append(WandB(workdir, project=options["wandb_project"],
                               entity=options["wandb_entity"],
                               config=config.to_dict() if config is not None else None,
                               name=os.path.basename(path),
                               run_id=hashlib.sha256(path.encode()).hexdigest()[:16]))
    return reporting.MetricsLog(workdir, sinks=tuple(sinks), every_steps=options["every_steps"])
