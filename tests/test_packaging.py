"""What `pip install dem_jax` installs, and what importing the losses pulls in."""

import email.parser
import glob
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), ROOT],
                   check=True, capture_output=True)
    (path,) = glob.glob(str(out / "*.whl"))
    return zipfile.ZipFile(path)


def test_wheel_installs_only_dem_jax(wheel):
    top = {name.split("/")[0] for name in wheel.namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"dem_jax"}
    names = set(wheel.namelist())
    # The kernels' source is compiled on first use, so it must ship.
    assert "dem_jax/losses/_cpu/kernels.cc" in names
    assert "dem_jax/tasks/tta/methods.py" in names
    assert "dem_jax/py.typed" in names, "the PEP 561 marker must ship"


def test_core_requirements_are_what_the_losses_need(wheel):
    (meta,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    msg = email.parser.Parser().parsestr(wheel.read(meta).decode())
    core = [r for r in msg.get_all("Requires-Dist") if "extra ==" not in r]
    assert sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in core) == \
        ["jax", "jaxlib", "numpy"]
    pinned = [r for r in msg.get_all("Requires-Dist") if "==" in r.split(";")[0]]
    assert not pinned, "exact versions belong in requirements.lock"


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_losses_import_without_the_experiments_extra():
    # flax and optax made unimportable, as in an environment with only the core install.
    out = _python(
        "import sys; sys.modules['flax'] = None; sys.modules['optax'] = None\n"
        "from dem_jax import losses; import jax.numpy as jnp\n"
        "print(float(losses.entropy(jnp.zeros((1, 4)))[0]))\n"
        "print(sorted(m for m in ('flax', 'optax', 'orbax', 'sklearn', 'matplotlib') "
        "if sys.modules.get(m) is not None))")
    assert out.returncode == 0, out.stderr
    value, imported = out.stdout.split("\n")[:2]
    assert abs(float(value) - 1.3862944) < 1e-5
    assert imported == "[]"


@pytest.mark.parametrize("module", ["dem_jax.models", "dem_jax.engine", "dem_jax.tasks.tta",
                                    "dem_jax.data", "dem_jax.plots"])
def test_experiment_side_import_names_the_extra(module):
    out = _python(f"import sys; sys.modules['flax'] = None\nimport {module}")
    assert out.returncode != 0
    assert "ImportError" in out.stderr
    assert "pip install 'dem_jax[experiments]'" in out.stderr, out.stderr
    assert "flax" in out.stderr.splitlines()[-3]
