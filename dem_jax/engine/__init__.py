"""What every experiment shares: data parallelism (`parallel`), source training (`train`),
orbax checkpoints (`checkpoint`), logs and results (`reporting`), several hosts
(`distributed`) and parameter partitions (`partition`)."""

from dem_jax import _extras

_extras.require("experiments", __name__)
