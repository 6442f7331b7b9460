"""Image classifiers for dem_jax: a small CNN, a CIFAR-style ResNet and a small ViT.

Every model is a `flax.linen.Module` called as
`model.apply(variables, x, train=False, return_features=False)` with x float [N, H, W, C];
it returns float32 logits [N, num_classes], or `(logits, features)` with the penultimate
representation features [N, D]. The classifier is the `nn.Dense` named "head".
In train mode BatchNorm models update their running statistics:
`model.apply(variables, x, train=True, mutable=["batch_stats"])`.
"""

from dem_jax import _extras

_extras.require("experiments", __name__)

import dataclasses  # noqa: E402

import flax.linen as nn

from dem_jax.models.cnn import SmallCNN
from dem_jax.models.params import count_params, head_param_mask, init_variables, norm_param_mask
from dem_jax.models.resnet import ResNet
from dem_jax.models.vit import ViT

MODELS = ("cnn", "resnet", "vit")
_CLASSES = {"cnn": SmallCNN, "resnet": ResNet, "vit": ViT}


def create_model(name: str, *, num_classes: int, axis_name: str | None = None,
                 **kwargs) -> nn.Module:
    """Builds the model called `name` (one of MODELS).

    Args:
        name: "cnn" (SmallCNN), "resnet" (ResNet) or "vit" (ViT).
        num_classes: number of output logits.
        axis_name: mapped device axis over which BatchNorm averages batch statistics
            (e.g. "batch" under `jax.pmap(..., axis_name="batch")`); None on one device.
        **kwargs: the model's other fields (width, depth, norm, dtype, ...).

    Raises:
        ValueError: for an unknown name or a bad field value.
        TypeError: for a field the model does not have.
    """
    if name not in _CLASSES:
        raise ValueError(f"Unknown model {name!r}; choose one of {MODELS}.")
    cls = _CLASSES[name]
    fields = [f.name for f in dataclasses.fields(cls) if f.name not in ("parent", "name")]
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise TypeError(f"Model {name!r} ({cls.__name__}) has no option(s) {unknown}; "
                        f"its options are {fields}.")
    return cls(num_classes=num_classes, axis_name=axis_name, **kwargs)


__all__ = [
    "MODELS", "create_model", "SmallCNN", "ResNet", "ViT",
    "norm_param_mask", "head_param_mask", "count_params", "init_variables",
]
