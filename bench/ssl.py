"""FixMatch train step with and without AdaDEM: ms per step, images per second, ratio.

  python -m bench.ssl [--batch 16] [--uratio 7] [--size 28] [--steps 20] [--repeats 5]
  python -m bench.ssl --views docs/ssl_views.png    # the figure of weak and strong views

One compiled step per batch (as in experiments.ssl), the two rows timed
round-robin so that load on a shared machine hits both alike; the median of
`--repeats` timed runs after a warm-up. Target: FixMatch+AdaDEM at most 1.05x
FixMatch (AdaDEM adds a per-example loss and a segment-sum MEC update next to
the forward and backward pass of labelled + two views of the unlabelled batch).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from dem_jax.engine import train as train_lib
from dem_jax.tasks import ssl


def plot_views(path: str) -> None:
    """Eight Fashion-MNIST test images, their weak and their strong views (key 0)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from dem_jax import data
    from dem_jax.data import augment
    x = data.load("fashion_mnist", "test").images[:8]
    keys = jax.random.split(jax.random.key(0), 8)
    rows = (x, np.asarray(augment.weak(keys, x, flip=True)),
            np.asarray(augment.strong(keys, x, flip=True)))
    fig, ax = plt.subplots(3, 8, figsize=(8, 3.2))
    for r, images in enumerate(rows):
        for i in range(8):
            ax[r, i].imshow(images[i, ..., 0], cmap="gray", vmin=0, vmax=1)
            ax[r, i].axis("off")
        ax[r, 0].set_title(("original", "weak", "strong")[r], fontsize=7, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--uratio", type=int, default=7)
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--views", default="", help="write the views figure here and stop")
    args = parser.parse_args()
    if args.views:
        plot_views(args.views)
        return
    model = train_lib.build_model("cnn", 10, (("hidden", 64), ("width", 16)))
    rng = np.random.default_rng(0)
    shape = (args.size, args.size, 1)
    x_lb = rng.random((args.steps, args.batch, *shape), np.float32)
    y_lb = rng.integers(0, 10, (args.steps, args.batch)).astype(np.int32)
    x_ulb = rng.random((args.steps, args.batch * args.uratio, *shape), np.float32)
    runs = {}
    for adadem in (False, True):
        cfg = ssl.SSLConfig.usb("fixmatch", adadem, num_steps=1000, uratio=args.uratio, flip=True)
        runner = ssl.Runner(model, cfg, 10, devices=jax.devices()[:1])
        state = ssl.init_state(model, cfg, 10, shape, 0)
        runner.train(state, x_lb, y_lb, x_ulb)  # compile
        runs[adadem] = (runner, state)
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, (runner, state) in runs.items():
            t = time.perf_counter()
            runner.train(state, x_lb, y_lb, x_ulb)  # host arrays back: the work is done
            times[k].append((time.perf_counter() - t) / args.steps)
    per_step = {k: float(np.median(v)) for k, v in times.items()}
    images = args.batch * (1 + 2 * args.uratio)  # labelled + weak + strong views
    print(f"device: {jax.devices()[0].device_kind} x1; {args.size}x{args.size}x1, batch "
          f"{args.batch} labelled + {args.uratio}x{args.batch} unlabelled (two views each)")
    print("| row | ms / step | images / s | step / FixMatch step |")
    print("|---|---|---|---|")
    for k, name in ((False, "fixmatch"), (True, "fixmatch+adadem")):
        print(f"| {name} | {1e3 * per_step[k]:.1f} | {images / per_step[k]:.0f} | "
              f"{per_step[k] / per_step[False]:.3f} |")
    ratio = per_step[True] / per_step[False]
    print("target <= 1.05x: " + ("met" if ratio <= 1.05 else f"MISSED ({ratio:.3f}x)"))


if __name__ == "__main__":
    main()
