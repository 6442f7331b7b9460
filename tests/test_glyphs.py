"""The `glyphs` data source (DejaVu fonts from matplotlib only), its font-shift pair and a TTA run on it."""

import json
import os

import numpy as np
import pytest

from dem_jax.data import domains, glyphs, sources

TINY = "glyphs:dejavu:12:train=4,test=48"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("glyphs"))


@pytest.fixture(scope="module")
def dejavu():
    used, every = glyphs.faces_of("dejavu")
    return used, glyphs.select_classes("dejavu", 40)


def test_rendering_is_deterministic_per_seed_and_differs_across_seeds(dejavu):
    faces, codepoints = dejavu
    spec = glyphs.Spec("dejavu", 40, test_size=40)
    a = glyphs.render_range(spec, faces, codepoints, "test", 0, 40)
    b = glyphs.render_range(spec, faces, codepoints, "test", 0, 40)
    np.testing.assert_array_equal(a, b)
    other = glyphs.render_range(glyphs.Spec("dejavu", 40, test_size=40, seed=1), faces,
                                codepoints, "test", 0, 40)
    assert all(not np.array_equal(x, y) for x, y in zip(a, other))
    # An image depends on its index only, not on the range it is rendered in.
    np.testing.assert_array_equal(glyphs.render_range(spec, faces, codepoints, "test", 30, 40),
                                  a[30:])
    # Train and test of one seed are different draws.
    train = glyphs.render_range(spec, faces, codepoints, "train", 0, 40)
    assert not np.array_equal(train, a)
    assert a.dtype == np.uint8 and a.shape == (40, 32, 32)
    assert all(im.max() > 128 for im in a), "an image without ink"
    elastic = glyphs.Spec("dejavu", 40, settings=glyphs.Settings(elastic=True))
    assert not np.array_equal(
        glyphs.render_range(elastic, faces, codepoints, "test", 0, 4), a[:4])


def test_every_kept_class_is_a_real_glyph_in_every_font(dejavu):
    _, codepoints = dejavu
    _, every = glyphs.faces_of("dejavu")
    assert len(every) == 12 and len(set(codepoints)) == 40
    for face in every:
        missing = [chr(cp) for cp in codepoints if not glyphs.real_glyph(face, cp)]
        assert not missing, f"{face.name} has no real glyph for {missing}"
    # The checks themselves: an ideograph (not in DejaVu), a space (no ink).
    assert not glyphs.real_glyph(every[0], ord("中"))
    assert not glyphs.real_glyph(every[0], ord(" "))
    # Look-alikes across scripts are one class: Latin "A" kept, Greek and Cyrillic "A" not.
    classes = glyphs.select_classes("dejavu", 100)
    assert ord("A") in classes and 0x391 not in classes and 0x410 not in classes
    with pytest.raises(ValueError, match="only .* distinct characters"):
        glyphs.select_classes("dejavu", 1000)


def test_load_caches_with_a_record(cache):
    ds = sources.load(TINY, "train", data_dir=cache)
    assert ds.images.shape == (48, 32, 32, 1) and ds.num_classes == 12
    assert ds.labels.tolist() == [i % 12 for i in range(48)]
    test = sources.load(TINY, "test", data_dir=cache)
    assert len(test) == 48 and not np.array_equal(test.images, ds.images)
    (record_file,) = [f for f in os.listdir(cache) if f.endswith(".json")]
    rec = json.load(open(os.path.join(cache, record_file), encoding="utf-8"))
    assert len(rec["classes"]) == 12 and rec["classes"].startswith("ABC")
    assert len(rec["faces"]) == 12 and rec["settings"]["size"] == 32
    # A second load reads the cache: same arrays, nothing rendered.
    again = glyphs.load_glyphs(TINY, "train", cache_dir=cache, workers=1)
    np.testing.assert_array_equal(again.images, ds.images)


def test_worker_processes_render_the_same_images(dejavu):
    faces, codepoints = dejavu
    spec = glyphs.Spec("dejavu", 40, test_size=60)
    parallel = glyphs.render_split(spec, faces, codepoints, "test", workers=2, chunk=30)
    np.testing.assert_array_equal(
        parallel, glyphs.render_range(spec, faces, codepoints, "test", 0, 60))


def test_missing_fonts_name_the_apt_get_line(monkeypatch):
    monkeypatch.setattr(glyphs, "_CJK", (glyphs.Face("x", "/nonexistent/x.ttc", 0,
                                                      "fonts-noto-cjk"),))
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-cjk fonts-wqy"):
        glyphs.faces_of("cjk")


@pytest.mark.parametrize("name,match", [
    ("glyphs:dejavu", "write 'glyphs:<fonts>"),
    ("glyphs:comic:10", "unknown font set"),
    ("glyphs:dejavu:10:colour=1", "bad option"),
    ("glyphs:dejavu:1", "at least 2 classes"),
])
def test_bad_names(name, match):
    with pytest.raises(ValueError, match=match):
        glyphs.parse(name)


def test_font_shift_pair(cache):
    pair = ("glyphs:dejavu_sans:12:train=4,test=48->glyphs:dejavu_serif:12:train=4,test=48")
    source, target = domains.load_pair(pair, data_dir=cache)
    assert source.train.images.shape == target.train.images.shape == (48, 32, 32, 1)
    assert source.train.num_classes == target.test.num_classes == 12
    assert not np.array_equal(source.test.images, target.test.images)
    with pytest.raises(ValueError, match="Unknown domain pair"):
        domains.check_pair("glyphs:dejavu:10->mnist")


def test_tiny_glyph_tta_run_end_to_end(tmp_path, cache):
    from experiments import tta_lib
    from experiments.configs import default

    c = default.get_config()
    c.data = "glyphs:dejavu:10:train=16,test=80"
    c.data_dir = cache
    c.model_kwargs = {"width": 4, "hidden": 8}
    c.source.epochs = 1
    c.source.batch_size = 40
    c.corruptions = ("gaussian_noise",)
    c.batch_size = 40
    c.seeds = (0,)
    c.rows = ("noadapt", "adadem")
    c.lr_grid = (0.1,)
    c.lr_sweep_losses = ("adadem",)
    results = tta_lib.run(c, str(tmp_path / "run"))
    for setting in ("single", "continual"):
        for row in c.rows:
            assert 0.0 <= results[setting][row]["mean"] <= 1.0
    assert results["test_examples"] == 80

    # The glyphs_c report reads this run's own files (not a layout written by hand).
    from experiments import glyphs_c_report
    run = glyphs_c_report.read_run(str(tmp_path / "run"))
    assert run["C"] == 10
    for setting in ("single", "continual"):
        for row in c.rows:
            np.testing.assert_allclose(list(run["units"][setting][row].values()),
                                       results[setting][row]["per_seed_mean"], rtol=1e-6)
        assert run["lrs"][setting] == {"adadem": 0.1}
    diag = run["diagnostics"]["adadem"]
    assert diag["lr"] == 0.1 and diag["delta"] >= 1.0 and 0.0 < diag["max_prob"] <= 1.0
    assert diag["param_grad_norm"] > 0.0
    assert "| 10 | adadem | 0.1 |" in glyphs_c_report.markdown([run])


def test_report_reads_finished_and_partial_runs(tmp_path):
    from dem_jax.engine import reporting
    from experiments import glyphs_c_report

    for num_classes, seeds in ((10, (0, 1)), (100, (0,))):
        wd = tmp_path / f"c{num_classes}"
        os.makedirs(wd)
        config = dict(data=f"glyphs:cjk:{num_classes}", settings=["single"], seeds=[0, 1],
                      rows=["em", "adadem"], corruptions=["fog"], lr_sweep_losses=["em"],
                      lr_grid=[0.1, 1.0])
        (wd / "config.json").write_text(json.dumps(config))
        for seed in seeds:
            for row, acc in (("em", 0.5), ("adadem", 0.5 + 0.01 * (seed + 1))):
                reporting.save_checked(str(wd / "units" / "single" / row / f"seed{seed}.json"),
                                       {"accuracy": {"fog": acc}})
        reporting.save_checked(str(wd / "units" / "lr_sweep" / "single" / "tent_dagger" / "em.json"),
                               {"accuracy": [[0.2, 0.4], [0.3, 0.5]], "delta": [1.5, 2.5]})
    runs = [glyphs_c_report.read_run(str(tmp_path / d)) for d in ("c100", "c10")]
    np.testing.assert_allclose(glyphs_c_report.differences(runs[1], "single", "adadem"),
                               [0.01, 0.02])
    md = glyphs_c_report.markdown(runs)
    assert "| single: adadem - em | 1.5 ± 0.5 (2) | 1.0 ± 0.0 (1) |" in md
    assert "| C = 10 | C = 100 |" in md and "C = 10 single: em 1" in md
    assert runs[1]["diagnostics"] == {"em": {"lr": 1.0, "delta": 2.5}}
    # The sweep's best rate (1.0: mean 0.4 over the two domains) and its accuracy.
    assert runs[1]["sweep_best"] == {"single": {"em": pytest.approx(0.4)}}
    assert "| em | 40.0 | 40.0 |" in md
