"""CIFAR-style ResNet (He et al., 2016, section 4.2) with BatchNorm or GroupNorm."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

NORMS = ("batch", "group")


def _make_norm(kind: str, *, train: bool, axis_name: str | None, num_groups: int, dtype: Any,
               name: str) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm(use_running_average=not train, axis_name=axis_name, momentum=0.9,
                            dtype=dtype, name=name)
    return nn.GroupNorm(num_groups=num_groups, dtype=dtype, name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (1x1 projection when the shape changes)."""
    features: int
    strides: int
    norm: str
    num_groups: int
    axis_name: str | None
    dtype: Any

    @nn.compact
    def __call__(self, x, *, train: bool):
        norm = lambda name: _make_norm(self.norm, train=train, axis_name=self.axis_name,
                                       num_groups=self.num_groups, dtype=self.dtype, name=name)
        conv = lambda kernel, strides, name: nn.Conv(
            self.features, kernel, strides=strides, padding="SAME", use_bias=False,
            dtype=self.dtype, name=name)

        y = nn.relu(norm("norm1")(conv((3, 3), self.strides, "conv1")(x)))
        y = norm("norm2")(conv((3, 3), 1, "conv2")(y))
        if x.shape != y.shape:
            x = norm("proj_norm")(conv((1, 1), self.strides, "proj_conv")(x))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet-`depth` for 32x32 images: a 3x3 stem and three stages of (depth - 2) / 6 blocks.

    Stage widths are `width`, `2 * width`, `4 * width`; stages 2 and 3 halve the spatial size.
    depth=20, width=16 is the ResNet-20 of the original paper (about 0.27M parameters).

    Attributes:
        num_classes: number of output logits.
        depth: 6n + 2 (8, 14, 20, 32, 44, 56, 110, ...).
        width: channels of the stem and the first stage.
        norm: "batch" (BatchNorm) or "group" (GroupNorm with `num_groups` groups, which has no
            batch statistics and so behaves the same on any batch size).
        num_groups: groups of GroupNorm; must divide `width`.
        axis_name: mapped device axis over which BatchNorm averages batch statistics; None on one
            device.
        dtype: computation dtype of the body; parameters, features and logits are float32.
    """
    num_classes: int
    depth: int = 20
    width: int = 16
    norm: str = "batch"
    num_groups: int = 8
    axis_name: str | None = None
    dtype: Any = jnp.float32

    def __post_init__(self):
        if self.norm not in NORMS:
            raise ValueError(f"ResNet norm must be one of {NORMS}, got {self.norm!r}.")
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1 (8, 14, 20, 32, ...), "
                             f"got {self.depth}.")
        if self.norm == "group" and self.width % self.num_groups:
            raise ValueError(f"GroupNorm needs num_groups ({self.num_groups}) to divide the "
                             f"channel count; width={self.width} is not a multiple of it.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, *, train: bool = False, return_features: bool = False):
        """x float [N, H, W, C] -> logits [N, num_classes] (and features [N, 4 * width])."""
        x = jnp.asarray(x, self.dtype)
        x = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=False, dtype=self.dtype,
                    name="stem_conv")(x)
        x = _make_norm(self.norm, train=train, axis_name=self.axis_name, num_groups=self.num_groups,
                       dtype=self.dtype, name="stem_norm")(x)
        x = nn.relu(x)
        blocks_per_stage = (self.depth - 2) // 6
        for stage in range(3):
            for block in range(blocks_per_stage):
                x = BasicBlock(
                    features=self.width * 2**stage,
                    strides=2 if stage > 0 and block == 0 else 1,
                    norm=self.norm, num_groups=self.num_groups, axis_name=self.axis_name,
                    dtype=self.dtype, name=f"stage{stage + 1}_block{block + 1}")(x, train=train)
        x = jnp.mean(x, axis=(1, 2))

        # The head runs in float32: entropy-based losses are sensitive to logit precision.
        features = x.astype(jnp.float32)
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(features)
        return (logits, features) if return_features else logits
