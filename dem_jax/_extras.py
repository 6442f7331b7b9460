"""The optional extras of dem_jax, checked when an experiment-side package is imported.

`pip install dem_jax` installs what `dem_jax.losses` needs (jax, numpy). The
models, data, engine, tasks and plots need the `experiments` extra; without it
their import stops with an ImportError that names the extra to install, instead
of a bare `No module named 'flax'` from deep inside.
"""

from __future__ import annotations

import importlib.util

# extra -> {importable module: distribution name}
EXTRAS: dict[str, dict[str, str]] = {
    "experiments": {
        "flax": "flax", "optax": "optax", "orbax.checkpoint": "orbax-checkpoint",
        "ml_collections": "ml_collections", "absl": "absl-py", "sklearn": "scikit-learn",
        "skimage": "scikit-image", "matplotlib": "matplotlib", "PIL": "pillow",
        "fontTools": "fonttools",
        "tqdm": "tqdm", "scipy": "scipy", "tensorboardX": "tensorboardX",
        "dm_pix": "dm-pix",
    },
    # Reinforcement learning (dem_jax.tasks.rl, experiments.rl): MiniGrid in JAX.
    "rl": {"xminigrid": "xminigrid"},
}


def _found(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent missing, or a module blocked in sys.modules
        return False


def require(extra: str, what: str) -> None:
    """Raises ImportError naming `extra` if any of its modules cannot be imported.

    Args:
      extra: a key of EXTRAS.
      what: the package that needs it, for the message (its `__name__`).

    Example:
      >>> require("experiments", "dem_jax.models")   # returns quietly when installed
    """
    missing = [dist for module, dist in EXTRAS[extra].items() if not _found(module)]
    if missing:
        raise ImportError(
            f"{what} needs the '{extra}' extra of dem_jax, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed. Install it with:\n"
            f"    pip install 'dem_jax[{extra}]'   (from a checkout: pip install -e '.[{extra}]')\n"
            "dem_jax.losses alone needs only jax and numpy.")
