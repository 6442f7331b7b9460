"""Glyphs-C: TTA as the number of classes grows, C in {10, 100, 1000} CJK ideographs (offline).

Only C changes between the three: the data `glyphs:cjk:<C>` (100 training images per
class, drawn from 8 Debian CJK fonts; the classes of a smaller C are a subset of the
larger C's), the ResNet-8's head (width 8 at every C: its 32 features feed a C-way
linear layer) and the source training length. The test split is 8,000 images whatever C:
each corrupted domain (the 15 corruptions at severity 5, `dem_jax.data.corruptions`)
gives 20% to DEM*'s labelled search and leaves every row an evaluation stream of
6,400 images, 100 batches of 64. Rows, seeds, learning-rate sweep and DEM*
search as in the default (the paper's TTA protocol), DEM*'s grid at step 0.5.

  python -m experiments.tta --config=experiments/configs/glyphs_c.py:100 --workdir=runs/glyphs_c100

The argument after the colon is C (default 10); `:100,local` is the shrunk variant
that fits a shared 2-core CPU in well under an hour (5 corruptions, one of each
kind; one seed; 3 learning rates): the same streams of 100 batches of 64 per domain.
The source model is checkpointed in `<workdir>/source` and reused by every later run
with the same --workdir (the full and the local variant of one C train the same
source model, so they can share it: copy `<workdir>/source` across).

Needs the CJK fonts: `apt-get install fonts-noto-cjk fonts-wqy-zenhei
fonts-wqy-microhei fonts-arphic-ukai fonts-arphic-uming`. The first run renders
the data (100,000 images at C = 1000 in 23 s on 2 idle cores, cached).

Source models, measured on the 2-core CPU (clean accuracy on the 8,000 test glyphs;
training time; C = 10 and 100 shared the CPU with other jobs, load 3-4):
  C = 10:   ResNet-8 width 8, 40 epochs of 1,000 images:   99.8%, 2 min
  C = 100:  ResNet-8 width 8, 15 epochs of 10,000 images:  99.1%, 2 min 10 s
  C = 1000: ResNet-8 width 8, 10 epochs of 100,000 images: 98.5%, 14 min (alone, load 2)
The whole protocol after that: about 2 h per C in one process on 2 cores (C = 1000:
55 min with its single-domain and continual halves side by side, `--config.settings`).
Results, diagnostics and the plot against C: docs/glyphs.md.
"""

from experiments.configs import default

# C -> source epochs (of 100 training images per class)
SOURCE_EPOCHS = {10: 40, 100: 15, 1000: 10}
LOCAL_CORRUPTIONS = ("gaussian_noise", "defocus_blur", "snow", "contrast", "jpeg_compression")


def get_config(arg: str = "10"):
    parts = (arg or "10").split(",")
    num_classes, local = int(parts[0]), "local" in parts[1:]
    if num_classes not in SOURCE_EPOCHS:
        raise ValueError(f"glyphs_c.py: C must be one of {tuple(SOURCE_EPOCHS)}, got {num_classes}.")
    c = default.get_config()
    c.data = f"glyphs:cjk:{num_classes}:test=8000"
    c.model = "resnet"
    c.model_kwargs = {"depth": 8, "width": 8, "norm": "batch"}
    c.source.epochs = SOURCE_EPOCHS[num_classes]
    c.source.batch_size = 128
    c.source.learning_rate = 0.1
    c.source.augment = "none"     # the glyphs are already shifted, scaled and rotated
    c.batch_size = 64             # 8,000 test images: 1,600 labelled, 100 batches scored
    c.lr_grid = (0.001, 0.01, 0.1, 1.0)
    c.lr_sweep_losses = ("em", "cadf", "adadem_norm", "adadem_mec", "adadem")
    c.fisher_size = 2000
    c.dem_star.tau_step = 0.5
    c.dem_star.alpha_step = 0.5
    c.grid_chunk = 1              # XLA:CPU runs vmapped convolutions slowly (uda_default.py)
    if local:
        c.corruptions = LOCAL_CORRUPTIONS
        c.seeds = (0,)
        c.lr_grid = (0.01, 0.1, 1.0)
    return c
