"""A small convolutional network for 28x28 (MNIST-like) and 8x8 (scikit-learn digits) images."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class SmallCNN(nn.Module):
    """conv-BN-relu x2, pool, conv-BN-relu, pool, global average pool, dense-BN-relu, head.

    A 2x2 max pool is applied only while the feature map is at least 2x2, so the same
    network runs on 28x28 (pools to 14x14, then 7x7) and on 8x8 inputs (4x4, then 2x2).
    Global average pooling makes the parameter count independent of the input size.

    Attributes:
        num_classes: number of output logits.
        width: channels of the first two convolutions; the third has `2 * width`.
        hidden: width of the penultimate dense layer (the feature dimension D).
        axis_name: name of the mapped device axis over which BatchNorm averages its batch
            statistics (e.g. "batch" under `jax.pmap(..., axis_name="batch")`); None on one device.
        dtype: computation dtype of the body; parameters, features and logits are float32.
    """
    num_classes: int
    width: int = 32
    hidden: int = 128
    axis_name: str | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False, return_features: bool = False):
        """x float [N, H, W, C] -> logits [N, num_classes] (and features [N, hidden])."""
        norm = lambda: nn.BatchNorm(
            use_running_average=not train, axis_name=self.axis_name, momentum=0.9, dtype=self.dtype)
        # No biases before BatchNorm: its own bias would cancel them.
        conv = lambda features: nn.Conv(features, (3, 3), padding="SAME", use_bias=False,
                                        dtype=self.dtype)

        x = jnp.asarray(x, self.dtype)
        convs = ((self.width, False), (self.width, True), (2 * self.width, True))
        for features, pool_after in convs:
            x = nn.relu(norm()(conv(features)(x)))
            if pool_after and min(x.shape[1:3]) >= 2:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = jnp.mean(x, axis=(1, 2))
        x = nn.relu(norm()(nn.Dense(self.hidden, use_bias=False, dtype=self.dtype)(x)))

        # The head runs in float32: entropy-based losses are sensitive to logit precision.
        features = x.astype(jnp.float32)
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="head")(features)
        return (logits, features) if return_features else logits
