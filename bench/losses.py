"""Forward+backward wall time of dem_jax.losses against softmax CE and naive autodiff.

Run from the repository root:

    python -m bench.losses                       # every shape, every loss
    python -m bench.losses --shapes 256x1000 --repeats 9 --out bench.md

For each shape and loss it times

    jax.jit(jax.value_and_grad(lambda z: jnp.mean(loss(z))))

for three implementations of the loss:

* ours:  `dem_jax.losses` (closed-form gradients in a `jax.custom_vjp`; on
  CPU the fused C++ kernels of `dem_jax/losses/_cpu`, or the pure-JAX closed
  forms with `DEM_JAX_CPU_KERNELS=0` in the environment);
* naive: the same math written directly with `jax.nn` and differentiated by
  autodiff (AdaDEM as Algorithm 1's stop-gradient surrogate, its MEC update
  with a one-hot matmul);
* CE:    `optax.softmax_cross_entropy_with_integer_labels` with fixed random
  labels, the cost of "one softmax and its gradient" on the same logits.

Each function is compiled and run once (warm-up), then timed as the median
over `--repeats` rounds of the mean of `inner` back-to-back calls, each
followed by `block_until_ready`; `inner` is chosen per function so that one
round lasts about `--round-ms`. The three implementations of one row are timed
round-robin (CE again in every row), so that slow drifts of the machine's
load affect them alike; the load average is printed at the start and the end.

For the AdaDEM modes with the MEC the state is a jit argument and the new
state is part of the output (so the update is not dead code); it is donated
and carried from call to call, as a training step does (both ours and naive),
so that neither pays a copy of the (C, C) state per call. AdaDEM-Norm, which
reads no state, runs without one. Before timing,
ours and naive (float32) are compared with the naive math run in float64 in
value, gradient and new MEC state; a row where ours is off is reported as a
PROBLEM and the exit status is 1. `--module` times another copy of the losses
(e.g. a modified one) as "ours".

Targets (printed at the end): ours/CE <= 1.5 and ours no slower than naive.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from dem_jax import losses  # replaced by --module

TAU, ALPHA, MOMENTUM = 1.3, 0.8, 0.1
CE_TARGET = 1.5          # ours / CE must not exceed this
NAIVE_TARGET = 1.0       # ours / naive must not exceed this
NOISE = 0.05             # ours/naive up to 1.05 is reported as "within noise"
LOGIT_SCALE = 3.0

SHAPES = {
    "256x1000": (256, 1000),
    "4096x1000": (4096, 1000),
    "8x128x128x19": (8, 128, 128, 19),
    "2048x32000": (2048, 32000),
}
ADADEM_MODES = {  # the paper's four modes
    "AdaDEM": dict(norm="l1", calibrator="mec", delta_from="cadf"),
    "AdaDEM-Norm": dict(norm="l1", calibrator="gmc", delta_from="cadf"),
    "AdaDEM-MEC": dict(norm=None, calibrator="mec", delta_from="cadf"),
    "AdaDEM-V": dict(norm="l1", calibrator="mec", delta_from="entropy"),
}
LOSSES = ("entropy", "dem") + tuple(ADADEM_MODES)
# At C = 32000 a (C, C) float32 MEC is 4.1 GB (and its one-hot update is a
# 2048 x 32000 x 32000 matmul), so only the losses without a MEC are run there.
BIG_C_LOSSES = ("entropy", "dem", "AdaDEM-Norm")
MEC_MAX_BYTES = 256 * 2**20


# --------------------------------------------------------------------------
# Naive references: the same math, plain jax.nn, autodiff gradients.
# --------------------------------------------------------------------------


def naive_entropy(z):
  return -jnp.sum(jax.nn.softmax(z) * jax.nn.log_softmax(z), axis=-1)


def naive_dem(z, tau=TAU, alpha=ALPHA):
  return (-jnp.sum(jax.nn.softmax(z / tau) * z, axis=-1)
          + alpha * jax.nn.logsumexp(z, axis=-1))


def naive_mec_update(mec, p, yhat, momentum=MOMENTUM):
  """Algorithm 1's MEC update with a one-hot matmul (no gradient)."""
  num_classes = mec.shape[0]
  onehot = jax.nn.one_hot(yhat, num_classes, dtype=jnp.float32)  # [N, C]
  sums = onehot.T @ lax.stop_gradient(p)                          # [C, C]
  counts = jnp.sum(onehot, axis=0)                                 # [C]
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  new = (1.0 - momentum) * mec + momentum * means
  return jnp.where(counts[:, None] > 0, new, mec)


def naive_adadem(z, mec, *, norm, calibrator, delta_from):
  """Algorithm 1's stop-gradient surrogate -sum((p - sg(m)) z) / sg(delta).

  With the GMC calibrator (AdaDEM-Norm) the surrogate is written
  (T + logsumexp z) / sg(delta) = H / sg(delta): the same gradient as with
  m = sg(p), and the same value as dem_jax's.
  """
  num_classes = z.shape[-1]
  z = z.reshape(-1, num_classes)
  p = jax.nn.softmax(z)
  ez = jnp.sum(p * z, axis=-1, keepdims=True)
  r = p * (z - ez + 1.0) if delta_from == "cadf" else p * (z - ez)
  if norm is None:
    delta = jnp.ones(z.shape[:1])
  elif norm == "l1":
    delta = jnp.sum(jnp.abs(r), axis=-1)
  elif norm == "l2":
    delta = jnp.sqrt(jnp.sum(r * r, axis=-1))
  else:
    delta = jnp.max(jnp.abs(r), axis=-1)
  delta = lax.stop_gradient(jnp.maximum(delta, 1e-6))
  if calibrator == "gmc":
    value = (-jnp.sum(p * z, axis=-1) + jax.nn.logsumexp(z, axis=-1)) / delta
    return value, mec
  yhat = jnp.argmax(z, axis=-1)
  new_mec = naive_mec_update(mec, p, yhat)
  m = lax.stop_gradient(new_mec[yhat])
  return -jnp.sum((p - m) * z, axis=-1) / delta, new_mec


# --------------------------------------------------------------------------
# The jitted forward+backward functions of one row.
# --------------------------------------------------------------------------


def _mean_vg(loss):
  """jit(value_and_grad(mean of loss)) for a loss without state."""
  return jax.jit(jax.value_and_grad(lambda z: jnp.mean(loss(z))))


def _mean_vg_state(loss, donate=False):
  """jit(value_and_grad) for a loss returning (per-example, new_state)."""
  def objective(z, mec):
    value, new_mec = loss(z, mec)
    return jnp.mean(value), new_mec
  return jax.jit(jax.value_and_grad(objective, has_aux=True),
                 donate_argnums=(1,) if donate else ())


class _Carried:
  """Times a stateful step as a training loop runs it: the state is donated.

  Each call passes the state that the previous call returned (the `mec`
  argument only starts the chain), so XLA may update it in place instead of
  copying a (C, C) array per call.
  """

  def __init__(self, jitted):
    self.jitted, self.state = jitted, None

  def __call__(self, z, mec):
    if self.state is None:
      self.state = jnp.array(mec, copy=True)
    out = self.jitted(z, self.state)
    self.state = out[0][1]
    return out


def build_row(name):
  """({"ours": jitted fn, "naive": jitted fn[, "state": True, ...]}, note or None).

  With "state" the functions take (z, mec) and return ((loss, new_mec), grad),
  and "ours_timed" / "naive_timed" are the same steps with the state donated
  and carried (`_Carried`), for timing; otherwise they take z and return
  (loss, grad).
  """
  if name == "entropy":
    return {"ours": _mean_vg(losses.entropy), "naive": _mean_vg(naive_entropy)}, None
  if name == "dem":
    return ({"ours": _mean_vg(lambda z: losses.dem(z, TAU, ALPHA)),
             "naive": _mean_vg(naive_dem)}, None)
  opts = ADADEM_MODES[name]
  if opts["calibrator"] == "gmc":
    # AdaDEM-Norm reads no MEC: run without a (C, C) state (mec=None), rather
    # than time a copy of a state it passes through unchanged.
    def ours(z):
      return losses.adadem(z, None, momentum=MOMENTUM, **opts)[0]
    def naive(z):
      return naive_adadem(z, None, **opts)[0]
    return {"ours": _mean_vg(ours), "naive": _mean_vg(naive)}, None
  def ours(z, mec):
    return losses.adadem(z, mec, momentum=MOMENTUM, **opts)
  def naive(z, mec):
    value, new_mec = naive_adadem(z, mec, **opts)
    return value.reshape(z.shape[:-1]), new_mec
  return {"ours": _mean_vg_state(ours), "naive": _mean_vg_state(naive), "state": True,
          "ours_timed": _Carried(_mean_vg_state(ours, donate=True)),
          "naive_timed": _Carried(_mean_vg_state(naive, donate=True))}, None


def ce_fn():
  def objective(z, labels):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(z, labels))
  return jax.jit(jax.value_and_grad(objective))


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def _call(fn, args):
  return jax.block_until_ready(fn(*args))


def _calibrate(fn, args, round_ms, max_inner):
  """Warm-up (compile) then pick `inner` so one round lasts about round_ms."""
  _call(fn, args)
  t0 = time.perf_counter()
  _call(fn, args)
  once = time.perf_counter() - t0
  return int(min(max_inner, max(1, math.ceil(round_ms / 1e3 / max(once, 1e-6)))))


def _round(fn, args, inner):
  """(wall, process CPU) seconds per call over `inner` calls."""
  c0, t0 = time.process_time(), time.perf_counter()
  for _ in range(inner):
    _call(fn, args)
  return (time.perf_counter() - t0) / inner, (time.process_time() - c0) / inner


def temp_mib(jitted, args):
  """XLA's temporary buffer for one call of `jitted`, in MiB (outputs excluded).

  On CPU this matters beyond its size: glibc serves allocations over 32 MiB
  with fresh pages on every call, and faulting them in can cost more than the
  arithmetic (see the README's benchmark notes).
  """
  stats = jitted.lower(*args).compile().memory_analysis()
  return (stats.temp_size_in_bytes if stats is not None else 0) / 2**20


def time_round_robin(entries, repeats, round_ms, max_inner):
  """entries: {key: (fn, args)} -> ({key: median wall s}, {key: median CPU s}, inner).

  The process CPU time (all threads) is reported too: on a machine shared with
  other jobs it is much less inflated than the wall time.
  """
  inner = {k: _calibrate(f, a, round_ms, max_inner) for k, (f, a) in entries.items()}
  wall = {k: [] for k in entries}
  cpu = {k: [] for k in entries}
  for _ in range(repeats):
    for k, (f, a) in entries.items():
      w, c = _round(f, a, inner[k])
      wall[k].append(w)
      cpu[k].append(c)
  return ({k: statistics.median(v) for k, v in wall.items()},
          {k: statistics.median(v) for k, v in cpu.items()}, inner)


def _errors(out, ref):
  """(value, gradient, state) errors of one output against a reference.

  value: |v - v_ref| / max(1, |v_ref|); gradient: max|g - g_ref| / max|g_ref|;
  state: max|s - s_ref| (0 without state).
  """
  (v, *s), g = (out[0] if isinstance(out[0], tuple) else (out[0],)), out[1]
  (v_r, *s_r), g_r = (ref[0] if isinstance(ref[0], tuple) else (ref[0],)), ref[1]
  v, g, v_r, g_r = (np.asarray(x, np.float64) for x in (v, g, v_r, g_r))
  err_v = float(abs(v - v_r) / max(1.0, abs(v_r)))
  err_g = float(np.max(np.abs(g - g_r)) / max(np.max(np.abs(g_r)), 1e-30))
  err_s = float(np.max(np.abs(np.asarray(s[0], np.float64) - np.asarray(s_r[0], np.float64)))) if s else 0.0
  return err_v, err_g, err_s


def check_accuracy(ours, naive, args):
  """Errors of ours and of naive (float32) against naive run in float64.

  Returns (ok, errors of ours, errors of naive); ok when ours is within
  (1e-5 value, 1e-4 gradient, 1e-6 state) of the float64 reference.
  """
  out_o, out_n = ours(*args), naive(*args)
  with jax.enable_x64(True):
    args64 = tuple(np.asarray(a, np.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a
                   for a in args)
    ref = jax.device_get(naive(*args64))
  err_o, err_n = _errors(out_o, ref), _errors(out_n, ref)
  ok = err_o[0] < 1e-5 and err_o[1] < 1e-4 and err_o[2] < 1e-6
  return ok, err_o, err_n


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_shape(text):
  text = text.strip().lower()
  if text in SHAPES:
    return text, SHAPES[text]
  try:
    shape = tuple(int(s) for s in text.replace(",", "x").split("x"))
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"bad shape {text!r}: use e.g. 256x1000 or 8x128x128x19") from None
  return "x".join(map(str, shape)), shape


def main(argv=None):
  parser = argparse.ArgumentParser(
      prog="python -m bench.losses", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shapes", nargs="+", type=parse_shape,
                      default=[(k, v) for k, v in SHAPES.items()],
                      help="subset of shapes (class axis last), e.g. 256x1000 "
                           "8x128x128x19; default: " + " ".join(SHAPES))
  parser.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES),
                      help="subset of losses (default: all)")
  parser.add_argument("--repeats", type=int, default=7,
                      help="timed rounds per function; the median is reported "
                           "(default 7; at most 5 for shapes over 32M elements)")
  parser.add_argument("--round-ms", type=float, default=50.0,
                      help="target length of one timed round (sets inner reps)")
  parser.add_argument("--max-inner", type=int, default=100)
  parser.add_argument("--out", help="also write the results: .json for JSON, "
                                    "anything else for the markdown table")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--module", default="dem_jax.losses",
                      help="import path of the losses module to time as 'ours' "
                           "(to compare a modified copy; default dem_jax.losses)")
  args = parser.parse_args(argv)
  global losses
  losses = importlib.import_module(args.module)

  start = time.perf_counter()
  print("# dem_jax.losses forward+backward benchmark\n")
  print(f"jax {jax.__version__}, optax {optax.__version__}, "
        f"device {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"python {platform.python_version()}, {platform.machine()}")
  print(f"ours = {args.module}; dem tau={TAU} alpha={ALPHA}; adadem momentum={MOMENTUM}; "
        f"logits = {LOGIT_SCALE} * N(0, 1) float32; median of {args.repeats} rounds")
  from dem_jax.losses import _kernels  # pylint: disable=import-outside-toplevel
  print("fused CPU kernels: " + ("on" if _kernels.available() else
                                 f"off ({_kernels.unavailable_reason()})"))
  load0 = os.getloadavg()[0]
  print(f"load average at start: {load0:.2f} on {os.cpu_count()} CPUs"
        + ("  (busy machine: timings will be noisy)" if load0 > 0.5 * os.cpu_count() else "")
        + "\n", flush=True)

  rows, notes, problems = [], [], []
  for label, shape in args.shapes:
    num_classes = shape[-1]
    size = math.prod(shape)
    repeats = min(args.repeats, 5) if size > 32 * 2**20 else args.repeats
    names = [n for n in args.losses
             if 4 * num_classes**2 <= MEC_MAX_BYTES or n in BIG_C_LOSSES]
    skipped = [n for n in args.losses if n not in names]
    if skipped:
      notes.append(
          f"{label}: skipped {', '.join(skipped)}: a (C, C) float32 MEC at C = "
          f"{num_classes} is {4 * num_classes**2 / 1e9:.1f} GB")
      print(f"note: {notes[-1]}", flush=True)
    key_z, key_y = jax.random.split(jax.random.key(args.seed))
    z = LOGIT_SCALE * jax.random.normal(key_z, shape, jnp.float32)
    labels = jax.random.randint(key_y, shape[:-1], 0, num_classes)
    ce = (ce_fn(), (z, labels))
    for name in names:
      fns, note = build_row(name)
      if note:
        notes.append(note)
        print(f"note: {note}", flush=True)
      fargs = (z, losses.mec_init(num_classes)) if fns.get("state") else (z,)
      # Accuracy against the naive math in float64 (on 256 examples when the
      # logits are big; only losses without a MEC run there).
      cargs = fargs if size <= 8 * 2**20 or fns.get("state") else (z[:256],)
      ok, err_o, err_n = check_accuracy(fns["ours"], fns["naive"], cargs)
      if not ok:
        problems.append(f"{label} {name}: ours is off the float64 reference by "
                        f"(value, grad, state) = {err_o}")
      # CE is timed again in every row, interleaved with ours and naive, so
      # that each row's ratios compare timings taken under the same load.
      entries = {"ours": (fns.get("ours_timed", fns["ours"]), fargs),
                 "naive": (fns.get("naive_timed", fns["naive"]), fargs), "ce": ce}
      med, cpu, inner = time_round_robin(entries, repeats, args.round_ms, args.max_inner)
      temp = temp_mib(fns["ours"], fargs)
      ce_time = med["ce"]
      row = dict(shape=label, loss=name, ours_ms=1e3 * med["ours"],
                 naive_ms=1e3 * med["naive"], ce_ms=1e3 * ce_time,
                 cpu_ours_ms=1e3 * cpu["ours"], cpu_naive_ms=1e3 * cpu["naive"],
                 cpu_ce_ms=1e3 * cpu["ce"],
                 inner_ours=inner["ours"], inner_naive=inner["naive"],
                 repeats=repeats, accurate=ok, err64_ours=err_o, err64_naive=err_n,
                 temp_mib_ours=temp)
      row["ours_ce"] = row["ours_ms"] / row["ce_ms"]
      row["ours_naive"] = row["ours_ms"] / row["naive_ms"]
      rows.append(row)
      print(f"  {label:>14} {name:<12} ours {row['ours_ms']:9.3f} ms  "
            f"naive {row['naive_ms']:9.3f} ms  CE {row['ce_ms']:9.3f} ms  | CPU time "
            f"ours/CE {cpu['ours'] / cpu['ce']:5.2f} ours/naive {cpu['ours'] / cpu['naive']:5.2f} "
            f"| grad err vs float64: ours {err_o[1]:.1e}, naive {err_n[1]:.1e}", flush=True)
      del fns

  table = ["| shape | loss | ours (ms) | naive (ms) | CE (ms) | ours/CE | ours/naive | ours temp (MiB) |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
  misses = []
  for r in rows:
    miss = []
    if r["ours_ce"] > CE_TARGET:
      miss.append(f"ours/CE {r['ours_ce']:.2f} > {CE_TARGET}")
    if r["ours_naive"] > NAIVE_TARGET:
      noise = " (within noise)" if r["ours_naive"] <= NAIVE_TARGET + NOISE else ""
      miss.append(f"ours/naive {r['ours_naive']:.2f} > {NAIVE_TARGET}{noise}")
    flag = " *" if miss else ""
    table.append(
        f"| {r['shape']} | {r['loss']} | {r['ours_ms']:.3f} | {r['naive_ms']:.3f} | "
        f"{r['ce_ms']:.3f} | {r['ours_ce']:.2f}{flag if r['ours_ce'] > CE_TARGET else ''} | "
        f"{r['ours_naive']:.2f}{flag if r['ours_naive'] > NAIVE_TARGET else ''} | "
        f"{r['temp_mib_ours']:.0f} |")
    if miss:
      misses.append(f"{r['shape']} {r['loss']}: " + "; ".join(miss))
  total = time.perf_counter() - start
  load1 = os.getloadavg()[0]

  print()
  print("\n".join(table))
  print()
  big = [f"{r['shape']} {r['loss']}" for r in rows if r["temp_mib_ours"] > 32]
  if big and jax.default_backend() == "cpu" and "hugetlb" not in os.environ.get("GLIBC_TUNABLES", ""):
    notes.append(
        f"{', '.join(big)} use over 32 MiB of XLA temporaries, which glibc maps afresh on every "
        "call (page faults); GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in the environment (glibc >= "
        "2.35) backs them with huge pages instead (see the README)")
  for note in notes:
    print(f"Note: {note}.")
  for p in problems:
    print(f"PROBLEM: {p}")
  if misses:
    print(f"Targets (ours/CE <= {CE_TARGET}, ours/naive <= {NAIVE_TARGET}) missed "
          f"by {len(misses)} of {len(rows)} rows:")
    for m in misses:
      print(f"  - {m}")
  else:
    print(f"All {len(rows)} rows meet the targets (ours/CE <= {CE_TARGET}, "
          f"ours/naive <= {NAIVE_TARGET}).")
  print(f"Total benchmark time: {total:.1f} s; load average at end: "
        f"{load1:.2f} on {os.cpu_count()} CPUs")

  if args.out:
    if args.out.endswith(".json"):
      with open(args.out, "w") as f:
        json.dump(dict(jax=jax.__version__, optax=optax.__version__,
                       device=jax.devices()[0].device_kind, module=args.module,
                       cpus=os.cpu_count(), load_start=load0, load_end=load1,
                       rows=rows, notes=notes, misses=misses, problems=problems,
                       total_s=total), f, indent=1)
    else:
      with open(args.out, "w") as f:
        f.write(f"ours = {args.module}; jax {jax.__version__}; load average "
                f"{load0:.2f} -> {load1:.2f} on {os.cpu_count()} CPUs\n\n")
        f.write("\n".join(table) + "\n\n")
        f.write("".join(f"Note: {n}.\n" for n in notes))
        f.write("".join(f"Missed: {m}\n" for m in misses) or "All rows meet the targets.\n")
        f.write(f"Total benchmark time: {total:.1f} s\n")
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main())
