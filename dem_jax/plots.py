"""Figures and tables that experiments write to their work directory."""

from __future__ import annotations

from dem_jax import _extras

_extras.require("experiments", __name__)

from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from dem_jax import losses  # noqa: E402


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_lr_sensitivity(path: str, lrs: Sequence[float], curves: Mapping[str, Sequence[float]],
                        *, title: str = "", highlight=("em", "adadem", "adadem_v")) -> None:
    """Accuracy (%) against learning rate (log axis), one line per loss."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, accs in curves.items():
        style = "-o" if name in highlight else "--."
        ax.plot(lrs, 100 * np.asarray(accs), style, label=name, alpha=1 if name in highlight
                else 0.6)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (plain SGD)")
    ax.set_ylabel("mean accuracy over corruptions (%)")
    ax.set_title(title or "Learning-rate sensitivity (single-domain)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_rewards(path: str, num_classes: int = 10) -> None:
    """Reward on the top class against its probability: EM collapses, AdaDEM does not.

    Logits `[s, 0, ..., 0]` for s from -1 to 12; rewards from `losses.rewards`
    (AdaDEM with the initial, uniform MEC).
    """
    s = np.linspace(-1.0, 12.0, 200)
    z = jnp.zeros((len(s), num_classes)).at[:, 0].set(s)
    r = losses.rewards(z)
    pmax = np.asarray(jnp.max(jax.nn.softmax(z), axis=-1))
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("em", "EM"), ("cadf", "CADF"), ("gmc", "GMC"), ("adadem", "AdaDEM")):
        ax.plot(pmax, np.asarray(r[key][:, 0]), label=label)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("max probability")
    ax.set_ylabel("reward on the top class (-dL/dz)")
    ax.set_title(f"Rewards vs confidence ({num_classes} classes)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_prediction_histogram(path: str, counts: Mapping[str, Sequence[int]], *,
                              reference: Sequence[int] | None = None, title: str = "") -> None:
    """Grouped bars: how often each class is predicted (collapse shows as one tall bar)."""
    names = list(counts)
    num_classes = len(next(iter(counts.values())))
    width = 0.8 / (len(names) + (reference is not None))
    fig, ax = plt.subplots(figsize=(7, 4))
    x = np.arange(num_classes)
    for i, name in enumerate(names):
        c = np.asarray(counts[name], float)
        ax.bar(x + i * width, c / c.sum(), width, label=name)
    if reference is not None:
        c = np.asarray(reference, float)
        ax.bar(x + len(names) * width, c / c.sum(), width, label="true labels", color="grey")
    ax.set_xticks(x + 0.4 - width / 2, [str(k) for k in range(num_classes)])
    ax.set_xlabel("class")
    ax.set_ylabel("fraction of predictions")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_diagnostics(path: str, lrs: Sequence[float],
                     diagnostics: Mapping[str, Mapping[str, Mapping[str, float]]], *,
                     title: str = "") -> None:
    """Per loss, over the learning rate: accuracy against lr and against lr x the mean
    parameter-gradient norm (the size of a step), and the stream means of delta,
    max probability, the logit-gradient L1 norm and the MEC diagonal.

    `diagnostics[loss][str(lr)]`: {"accuracy", "delta", "max_prob",
    "logit_grad_l1", "param_grad_norm", "mec_diag"}.
    """
    panels = (("accuracy", "accuracy (%)"), ("step", "accuracy (%) vs lr x |grad theta|"),
              ("delta", "mean delta"), ("max_prob", "mean max probability"),
              ("logit_grad_l1", "mean |dL/dz|_1"), ("mec_diag", "mean MEC diagonal"))
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for name, per_lr in diagnostics.items():
        d = [per_lr[str(lr)] for lr in lrs]
        acc = 100 * np.array([x["accuracy"] for x in d])
        for ax, (key, label) in zip(axes.flat, panels):
            if key == "accuracy":
                ax.plot(lrs, acc, "-o", label=name)
            elif key == "step":
                ax.plot(np.array(lrs) * np.array([x["param_grad_norm"] for x in d]), acc, "-o",
                        label=name)
            else:
                ax.plot(lrs, [x[key] for x in d], "-o", label=name)
            ax.set_xscale("log")
            ax.set_title(label, fontsize=9)
            ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    for ax in axes[1]:
        ax.set_xlabel("learning rate")
    axes[0, 1].set_xlabel("lr x mean parameter-gradient norm")
    fig.suptitle(title or "Diagnostics over the learning rate (single-domain)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
