"""AdaDEM in your own Flax training loop: a runnable example.

Semi-supervised training of a small MLP on two moons with 8 labels: cross-entropy
on the labelled points plus 0.3 x AdaDEM on the unlabelled ones (the paper's
Ent.Min recipe with EM replaced by AdaDEM). The MEC is state: passed into the
jitted step and returned, like the optimizer state.

  python examples/flax_training_loop.py            # needs dem_jax[experiments]
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import make_moons

from dem_jax import losses


class MLP(nn.Module):
    num_classes: int = 2

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(32)(x))
        x = nn.relu(nn.Dense(32)(x))
        return nn.Dense(self.num_classes)(x)


def main(steps: int = 300, seed: int = 0) -> dict:
    x, y = make_moons(1000, noise=0.1, random_state=seed)
    x, y = x.astype(np.float32), y.astype(np.int32)
    labelled = np.concatenate([np.flatnonzero(y == k)[:4] for k in (0, 1)])  # 4 per class

    model = MLP()
    params = model.init(jax.random.key(seed), x[:1])
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    mec = losses.mec_init(2)  # AdaDEM's running class-conditional mean prediction

    @jax.jit
    def train_step(params, opt_state, mec, x_l, y_l, x_u):
        def loss_fn(params):
            ce = optax.softmax_cross_entropy_with_integer_labels(model.apply(params, x_l), y_l)
            adadem, new_mec = losses.adadem(model.apply(params, x_u), mec)  # per example
            return ce.mean() + 0.3 * adadem.mean(), new_mec

        (loss, new_mec), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, new_mec, loss

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        batch = rng.choice(len(x), 128, replace=False)
        params, opt_state, mec, loss = train_step(params, opt_state, mec, x[labelled],
                                                  y[labelled], x[batch])
    accuracy = float(jnp.mean(model.apply(params, x).argmax(-1) == y))
    return {"loss": float(loss), "accuracy": accuracy, "mec": np.asarray(mec)}


if __name__ == "__main__":
    out = main()
    print(f"accuracy on all 1,000 points with 8 labels: {100 * out['accuracy']:.1f}%")
    print("MEC (row k: mean prediction of points pseudo-labelled k):")
    print(np.round(out["mec"], 3))
