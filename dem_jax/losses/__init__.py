"""dem_jax.losses: entropy minimisation, decoupled.

Per-example losses in the style of `optax.losses`: logits first, class axis
`axis`, optional `where` mask over examples, float32 math whatever the input
dtype, gradients written out with `jax.custom_vjp` (reverse mode only).

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
