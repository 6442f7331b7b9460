"""Glyph generator throughput: images rendered per second, in parallel, without the cache.

  python -m bench.glyphs [--fonts cjk] [--classes 1000] [--images 100000] [--workers 2]

Renders `--images` training images of `glyphs:<fonts>:<classes>` with
`glyphs.render_split` (the code path of a first load, less the npz write) in
`--workers` processes and prints the wall time, next to the target: 100,000 32x32
images in under 2 minutes on 2 cores. The class selection (font checks) is timed
apart. The machine's load average is printed with it: on a shared machine other
jobs slow the rendering down.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

from dem_jax.data import glyphs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fonts", default="cjk")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--images", type=int, default=100_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--elastic", action="store_true")
    args = p.parse_args(argv)
    load = os.getloadavg()
    start = time.perf_counter()
    codepoints = glyphs.select_classes(args.fonts, args.classes)
    faces, _ = glyphs.faces_of(args.fonts)
    select = time.perf_counter() - start
    per_class = -(-args.images // args.classes)
    spec = glyphs.Spec(args.fonts, args.classes, train_per_class=per_class,
                       settings=dataclasses.replace(glyphs.Settings(), elastic=args.elastic))
    start = time.perf_counter()
    images = glyphs.render_split(spec, faces, codepoints, "train", workers=args.workers)
    took = time.perf_counter() - start
    print(f"glyphs:{args.fonts}:{args.classes}, {len(images):,} images of "
          f"{images.shape[1]}x{images.shape[2]}, {args.workers} workers, "
          f"elastic {'on' if args.elastic else 'off'}; {os.cpu_count()} CPUs, load average "
          f"before {load[0]:.1f}, after {os.getloadavg()[0]:.1f}")
    print(f"class selection: {select:.1f} s; rendering: {took:.1f} s = "
          f"{len(images) / took:,.0f} images/s")
    print(f"target 100,000 images in under 120 s: "
          f"{'met' if took * 100_000 / len(images) < 120 else 'MISSED'} "
          f"({took * 100_000 / len(images):.0f} s per 100,000)")


if __name__ == "__main__":
    main()
