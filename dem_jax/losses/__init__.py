"""dem_jax.losses: entropy minimisation, decoupled.

Per-example losses in the style of `optax.losses`: logits first, class axis
`axis`, keyword options, and an optional boolean `where` shaped either like
the output (a mask over examples: masked ones give 0 loss and 0 gradient and
take no part in batch statistics) or like the logits (a mask over classes:
masked classes are treated as `-inf` logits, and an example with no class
left is a masked example), as in `optax.softmax_cross_entropy`.

Where they still differ from optax: the losses return float32 whatever the
logits' dtype (they compute in float32; gradients come back in the logits'
dtype); `axis` is one class axis, not a tuple; and the EM/DEM/AdaDEM
gradients are written out in closed form with `jax.custom_vjp`, so they are
reverse mode only: `jax.grad`, `jax.vjp`, `jax.jacrev` and `jax.hessian`
(forward over reverse) work, `jax.jvp` and `jax.jacfwd` raise TypeError, and
AdaDEM has no second derivative at all (its gradient holds delta and the MEC
row constant). The noisy-label losses take a mask over examples only.

| function | paper | value per example |
|---|---|---|
| `entropy` | EM | `H(z) = T(z) + Q(z)` |
| `cadf` | CADF | `T_tau(z) = -sum softmax(z/tau) z` |
| `gmc` | GMC | `Q_alpha(z) = alpha logsumexp(z)` |
| `dem` | DEM / DEM* | `T_tau + Q_alpha` |
| `adadem` | AdaDEM and ablations | `(T + m.z) / delta`, plus the new MEC |
| `marginal_entropy` | IM / SHOT diversity | `H(mean p)` (one scalar) |
| `rewards` | diagnostics | `-dL/dz` of each loss |

On CPU, `entropy`, `cadf`, `gmc`, `dem` and `adadem` run fused C++ kernels
(`_kernels.py`, `_cpu/kernels.cc`; built with g++ on first use) with the same
closed forms; GPUs and TPUs, a traced tau/alpha and `DEM_JAX_CPU_KERNELS=0`
run the pure-JAX closed forms of `_dem.py` and `_adadem.py`.
"""

from dem_jax.losses._adadem import adadem
from dem_jax.losses._adadem import CALIBRATORS
from dem_jax.losses._adadem import DELTA_FROM
from dem_jax.losses._adadem import mec_init
from dem_jax.losses._adadem import mec_update
from dem_jax.losses._adadem import NORMS
from dem_jax.losses._dem import cadf
from dem_jax.losses._dem import dem
from dem_jax.losses._dem import dem_valid
from dem_jax.losses._dem import entropy
from dem_jax.losses._dem import gmc
from dem_jax.losses._diversity import marginal_entropy
from dem_jax.losses._noisy import elr
from dem_jax.losses._noisy import elr_init
from dem_jax.losses._noisy import generalized_cross_entropy
from dem_jax.losses._noisy import symmetric_cross_entropy
from dem_jax.losses._rewards import rewards

__all__ = (
    "adadem", "cadf", "CALIBRATORS", "DELTA_FROM", "dem", "dem_valid", "elr",
    "elr_init", "entropy", "generalized_cross_entropy", "gmc", "marginal_entropy",
    "mec_init", "mec_update", "NORMS", "rewards", "symmetric_cross_entropy",
)
