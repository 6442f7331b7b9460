"""Shared test fixtures."""

import os

import pytest

from dem_jax.engine import checkpoint


class SaveLog:
    """Every `Checkpointer.save` of a test, and an optional simulated interruption."""

    def __init__(self):
        self.calls = []               # (checkpoint directory, step), in order
        self.interrupt_after = None

    def start(self, interrupt_after=None):
        """Forgets earlier saves; raise KeyboardInterrupt after the n-th save from now."""
        self.calls = []
        self.interrupt_after = interrupt_after

    def under(self, root):
        """The saves below `root`, as (directory relative to root, step)."""
        root = os.path.abspath(root)
        return [(os.path.relpath(d, root), step) for d, step in self.calls
                if d == root or d.startswith(root + os.sep)]


@pytest.fixture
def save_log(monkeypatch):
    """Records checkpoint saves, so that a resume test can check what was redone.

    A resumed run must save exactly what the interrupted one had not saved yet;
    one that silently started over would save everything again.
    """
    log = SaveLog()
    real_save = checkpoint.Checkpointer.save

    def save(self, step, state, meta=None):
        real_save(self, step, state, meta)
        log.calls.append((self.directory, step))
        if log.interrupt_after is not None and len(log.calls) == log.interrupt_after:
            raise KeyboardInterrupt("simulated interruption")

    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    return log
