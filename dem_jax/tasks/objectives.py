"""The optimised loss of every adaptation method, as a plug-in chosen by name.

Each method (Tent, ETA, EATA, SAR, MinEnt, SHOT-IM, ...) minimises an
"entropy term". Here that term is one of the paper's losses. Filters and
weights of sample-selecting methods always use the true entropy; only the
optimised term is swapped (dem-notes section 4).
"""

from __future__ import annotations

from typing import NamedTuple

import jax

from dem_jax import losses

# name -> (family, adadem options)
_ADADEM = {
    "adadem": dict(norm="l1", calibrator="mec", delta_from="cadf"),
    "adadem_norm": dict(norm="l1", calibrator="gmc", delta_from="cadf"),
    "adadem_mec": dict(norm=None, calibrator="mec", delta_from="cadf"),
    "adadem_v": dict(norm="l1", calibrator="mec", delta_from="entropy"),
}
LOSSES = ("em", "cadf", "dem") + tuple(_ADADEM)


class Hyper(NamedTuple):
    """Traced hyperparameters (vmap a grid of them): learning rate, tau, alpha."""
    lr: jax.Array
    tau: jax.Array
    alpha: jax.Array


def check_loss(name: str) -> str:
    if name not in LOSSES:
        raise ValueError(f"Unknown loss {name!r}; choose one of {LOSSES}.")
    return name


def uses_mec(name: str) -> bool:
    return name in _ADADEM and _ADADEM[name]["calibrator"] == "mec"


def per_example(name: str, logits, mec, hyper: Hyper, *, mec_momentum: float = 0.1,
                where=None, axis_name=None):
    """The per-example entropy term `name` and the new MEC state.

    Args:
      name: one of LOSSES. "em" is the entropy; "cadf" is CADF at temperature
        `hyper.tau`; "dem" is DEM(`hyper.tau`, `hyper.alpha`); the "adadem*"
        names are AdaDEM and its ablations.
      logits: float `[N, C]`.
      mec: `[C, C]` MEC state (passed through unchanged by non-MEC losses).
      hyper: traced hyperparameters.
      mec_momentum: pi of the MEC update.
      where: bool `[N]` mask of the examples that take part.
      axis_name: named axis for global batch statistics.

    Returns:
      `(float32 [N] loss, [C, C] new mec)`.
    """
    if name == "em":
        return losses.entropy(logits, where=where), mec
    if name == "cadf":
        return losses.cadf(logits, hyper.tau, where=where), mec
    if name == "dem":
        return losses.dem(logits, hyper.tau, hyper.alpha, where=where), mec
    if name in _ADADEM:
        return losses.adadem(logits, mec, momentum=mec_momentum, where=where,
                             axis_name=axis_name, **_ADADEM[name])
    raise ValueError(f"Unknown loss {name!r}; choose one of {LOSSES}.")
