"""UDA across a font shift at C = 100: the same 100 CJK ideographs, the target in a font the source never saw.

Source: `glyphs:cjk_seen:100`, drawn in 7 faces (Noto Sans and Serif CJK SC, regular
and bold; WenQuanYi Micro Hei and Zen Hei; AR PL UMing). Target:
`glyphs:cjk_unseen:100`, drawn in AR PL UKai, a brush (kai) style that no source
face has. Both 32x32 grayscale, 100 training images per class, 6,400 test images;
the target's labels are used only to score. Needs the CJK fonts (`apt-get install
fonts-noto-cjk fonts-wqy-zenhei fonts-wqy-microhei fonts-arphic-ukai
fonts-arphic-uming`); the data is rendered once and cached (`dem_jax.data.glyphs`).
  python -m experiments.uda --config=experiments/configs/uda_font_shift.py --workdir=runs/uda_font_shift

The source model is the C = 100 ResNet of `glyphs_c.py` (ResNet-8, width 8), trained
on the seen fonts only.
"""

from experiments.configs import uda_default


def get_config():
    c = uda_default.get_config()
    c.pairs = ("glyphs:cjk_seen:100->glyphs:cjk_unseen:100",)
    c.model = "resnet"
    c.model_kwargs = {"depth": 8, "width": 8, "norm": "batch"}
    c.source.epochs = 15
    c.source.batch_size = 128
    c.source.learning_rate = 0.1
    c.source.augment = "none"             # the glyphs are already varied
    c.batch_size = 64                     # per domain per step
    c.steps = 300                         # 19,200 target images: ~2 passes over 10,000
    c.eval_every = 100
    c.eval_batch_size = 512
    c.seeds = (0, 1, 2)
    # As uda_mnist_m.py: DEM*'s search (16 more runs per method) is left out; add
    # "minent+dem_star" to run it.
    c.rows = ("source_only", "minent+em", "minent+adadem", "dann",
              "dann+em", "dann+adadem", "shot_im+em", "shot_im+adadem")
    return c
