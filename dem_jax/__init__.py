"""dem_jax: Decoupled Entropy Minimization (Ma, Li, Xiang, NeurIPS 2025) in JAX."""

__version__ = "0.1.0"
