"""A small Vision Transformer (Dosovitskiy et al., 2021) with pre-LayerNorm encoder blocks."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

POOLS = ("cls", "mean")


class EncoderBlock(nn.Module):
    """x + MHSA(LN(x)), then x + MLP(LN(x))."""
    num_heads: int
    mlp_dim: int
    dtype: Any

    @nn.compact
    def __call__(self, x):
        y = nn.LayerNorm(dtype=self.dtype, name="attn_norm")(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                            force_fp32_for_softmax=True, name="attn")(y, y)
        x = x + y
        y = nn.LayerNorm(dtype=self.dtype, name="mlp_norm")(x)
        y = nn.Dense(self.mlp_dim, dtype=self.dtype, name="mlp_in")(y)
        y = nn.Dense(x.shape[-1], dtype=self.dtype, name="mlp_out")(nn.gelu(y))
        return x + y


class ViT(nn.Module):
    """Patchify, add learnable position embeddings, `depth` encoder blocks, LayerNorm, pool, head.

    Attributes:
        num_classes: number of output logits.
        patch_size: side of the square patches; must divide the image height and width
            (e.g. 2 or 4 for 8x8, 4 or 7 for 28x28, 4 or 8 for 32x32).
        hidden_dim: token width (the feature dimension D); must be a multiple of `num_heads`.
        depth: number of encoder blocks.
        num_heads: attention heads per block.
        mlp_dim: hidden width of each block's MLP.
        pool: "cls" (a learnable class token) or "mean" (average of the patch tokens).
        axis_name: unused (a ViT has no batch statistics); accepted so every model takes it.
        dtype: computation dtype of the body; parameters, features and logits are float32.

    The model has no dropout, so `train` changes nothing; it is accepted for a common interface.
    The position embeddings fix the number of patches, so a ViT only runs on images of the size
    it was initialised with.
    """
    num_classes: int
    patch_size: int = 4
    hidden_dim: int = 128
    depth: int = 6
    num_heads: int = 4
    mlp_dim: int = 256
    pool: str = "cls"
    axis_name: str | None = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"ViT pool must be one of {POOLS}, got {self.pool!r}.")
        if self.hidden_dim % self.num_heads:
            raise ValueError(f"ViT hidden_dim ({self.hidden_dim}) must be a multiple of "
                             f"num_heads ({self.num_heads}).")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, train: bool = False, return_features: bool = False):
        """x float [N, H, W, C] -> logits [N, num_classes] (and features [N, hidden_dim])."""
        del train  # No dropout or batch statistics.
        height, width = x.shape[1:3]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"ViT patch_size={self.patch_size} must divide the image size "
                             f"{height}x{width}; choose a divisor of both.")
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(self.hidden_dim, (self.patch_size,) * 2, strides=(self.patch_size,) * 2,
                    padding="VALID", dtype=self.dtype, name="patch_embed")(x)
        x = x.reshape(x.shape[0], -1, self.hidden_dim)
        if self.pool == "cls":
            cls = self.param("cls", nn.initializers.zeros, (1, 1, self.hidden_dim))
            cls = jnp.broadcast_to(cls, (x.shape[0], 1, self.hidden_dim)).astype(x.dtype)
            x = jnp.concatenate([cls, x], axis=1)
        pos = self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                         (1, x.shape[1], self.hidden_dim))
        x = x + pos.astype(x.dtype)
        for i in range(self.depth):
            x = EncoderBlock(num_heads=self.num_heads, mlp_dim=self.mlp_dim, dtype=self.dtype,
                             name=f"block{i + 1}")(x)
        x = nn.LayerNorm(dtype=self.dtype, name="encoder_norm")(x)
        x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)

        # The head runs in float32: entropy-based losses are sensitive to logit precision.
        features = x.astype(jnp.float32)
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(features)
        return (logits, features) if return_features else logits
