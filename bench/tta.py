"""Adaptation throughput: Tent with EM vs AdaDEM (and its ablations), images per second.

  python -m bench.tta [--models cnn,resnet] [--batch 128] [--batches 20] [--repeats 5]
                      [--classes 10] [--resnet-depth D] [--resnet-width W]

`--classes 1000` times the steps with a 1000-class head (the glyphs-C question: is
AdaDEM's O(B C) MEC update still small next to the network at C = 1000?);
`--resnet-depth 8 --resnet-width 8` times glyphs_c.py's ResNet-8 instead of ResNet-20.

A stream of `--batches` batches of 32x32x3 random images runs through
`protocol.Runner` (one compiled step per batch, as in the experiments); `--repeats`
timed rounds after a warm-up, each round timing every loss once in a random order.
ms / step is the median over rounds; step / EM step is the median over rounds of
the ratio within a round (paired, so a load change hits both sides). Target:
AdaDEM's step at most 1.05x EM's (the MEC update is a segment sum, O(B C), next
to a forward and backward pass of the network).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from dem_jax import models
from dem_jax.tasks.tta import methods
from dem_jax.tasks.tta import protocol
from dem_jax.engine import train as train_lib

MODEL_KWARGS = {"cnn": (("hidden", 128), ("width", 32)),
                "resnet": (("depth", 20), ("norm", "batch"), ("width", 16))}


def bench(model_name: str, losses: list[str], *, batch: int, batches: int,
          repeats: int, classes: int = 10, **model_kwargs) -> dict[str, np.ndarray]:
    """Seconds per step of each loss in each round, `{loss: [repeats]}`.

    Every loss gets its compiled stream first; then each of `repeats` rounds
    times one stream of every loss in turn (in a fresh random order), so that
    changes in the machine's load hit all losses alike: the ratio to EM is
    taken within a round, and its median over rounds is what `main` reports.
    """
    kwargs = {**dict(MODEL_KWARGS[model_name]), **model_kwargs}
    model = train_lib.build_model(model_name, classes, kwargs)
    variables = models.init_variables(model, jax.random.key(0, impl="rbg"), (1, 32, 32, 3))
    rng = np.random.default_rng(0)
    images = rng.random((batches, batch, 32, 32, 3), np.float32)
    labels = rng.integers(0, classes, (batches, batch)).astype(np.int32)
    runs = {}
    for loss in losses:
        cfg = methods.AdaptConfig(method="tent", loss=loss)
        runner = protocol.Runner(model, cfg, classes, devices=jax.devices()[:1])
        state = methods.init_state(variables, cfg, classes, lr=0.01)
        runner(state, images, labels)  # compile
        runs[loss] = (runner, state)
    times = {loss: [] for loss in losses}
    for _ in range(repeats):
        for loss in rng.permutation(losses):  # no loss always runs first
            runner, state = runs[loss]
            start = time.perf_counter()
            runner(state, images, labels)  # returns host arrays: the work is finished
            times[loss].append(time.perf_counter() - start)
    return {loss: np.asarray(t) / batches for loss, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,resnet")
    parser.add_argument("--losses", default="em,adadem,adadem_norm,adadem_mec")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--classes", type=int, default=10, help="number of classes C")
    parser.add_argument("--resnet-depth", type=int, help="default 20 (ResNet-20)")
    parser.add_argument("--resnet-width", type=int, help="default 16 (ResNet-20)")
    args = parser.parse_args()
    resnet = {k: v for k, v in (("depth", args.resnet_depth), ("width", args.resnet_width))
              if v is not None}
    print(f"device: {jax.devices()[0].device_kind} x1, batch {args.batch}, 32x32x3, "
          f"Tent (BatchNorm affine), plain SGD, {args.classes} classes"
          + "".join(f", resnet {k} {v}" for k, v in resnet.items()))
    print("| model | loss | ms / step | images / s | step / EM step |")
    print("|---|---|---|---|---|")
    misses = []
    for model_name in args.models.split(","):
        losses = args.losses.split(",")
        if "em" not in losses:
            losses = ["em"] + losses  # the reference of every ratio
        step_times = bench(model_name, losses, batch=args.batch, batches=args.batches,
                           repeats=args.repeats, classes=args.classes,
                           **(resnet if model_name == "resnet" else {}))
        base = step_times["em"]
        for loss, per_round in step_times.items():
            t = float(np.median(per_round))
            ratio = float(np.median(per_round / base))  # paired by round
            if loss == "adadem" and ratio > 1.05:
                misses.append(f"{model_name}: AdaDEM {ratio:.2f}x EM")
            print(f"| {model_name} | {loss} | {1e3 * t:.2f} | {args.batch / t:.0f} | "
                  f"{ratio:.3f} |", flush=True)
    print("target AdaDEM <= 1.05x EM: " + ("met" if not misses else "MISSED: " + "; ".join(misses)))


if __name__ == "__main__":
    main()
