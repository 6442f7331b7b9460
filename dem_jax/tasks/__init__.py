"""Task families, one home each: the steps and protocols of every experiment family.

* `objectives`: the loss plug-in, the entropy term every method optimises
  (EM, CADF, DEM, AdaDEM and its ablations), chosen by name;
* `tta`: test-time adaptation (`tta.methods`: NoAdapt, BN, Tent, ETA, EATA, SAR;
  `tta.protocol`: streams, single-domain and continual settings, DEM*, the
  learning-rate sweep);
* `uda`: unsupervised domain adaptation (source only, MinEnt, DANN, SHOT-IM);
* `noisy`: training with noisy labels (CE, GCE, SCE, ELR, each + EM / AdaDEM).

Every step is written for one device with explicit collectives over
`dem_jax.engine.parallel.AXIS`; `dem_jax.engine` holds what all families share.
"""

from dem_jax import _extras

_extras.require("experiments", __name__)
