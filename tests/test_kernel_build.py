"""How the fused CPU kernels are built, cached, verified and loaded (`_kernels`).

Fake compilers (small shell scripts that answer `--version` and `-###` and
log each build) and a temporary cache directory stand in for g++ and
`~/.cache/dem_jax`, so that these tests compile nothing. Where a test needs
a library that really loads, its fake compiler copies the one this process
built with the real compiler (skipped where there is none).
"""

import hashlib
import os
import pathlib
import stat
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dem_jax import losses
from dem_jax.losses import _kernel_cache
from dem_jax.losses import _kernels


INCLUDE = jax.ffi.include_dir()


def fake_compiler(tmp_path, name="cxx", version="fakecc 1.0", target="-march=znver2 -mavx2",
                  build="printf 'not really a library' > \"$out\"", fail_build=False):
  """A compiler script that logs every build to `<name>.log` (one line each)."""
  log = tmp_path / f"{name}.log"
  script = tmp_path / name
  script.write_text(textwrap.dedent(f"""\
      #!/bin/sh
      case "$*" in
        *--version*) echo "{version}" ;;
        *-###*) echo '"{target}"' >&2 ;;
        *) echo build >> "{log}"
           for a; do out="$a"; done
           {'echo "kernels.cc:1: error: no" >&2; exit 1' if fail_build else build} ;;
      esac
      """))
  script.chmod(0o755)
  return str(script), log


def builds(log):
  return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
  """This process's kernel state as before any build, with a temporary cache."""
  monkeypatch.setattr(_kernels, "_state", {"loaded": None, "error": None, "path": None})
  monkeypatch.setenv("DEM_JAX_CACHE_DIR", str(tmp_path / "cache"))
  monkeypatch.delenv("DEM_JAX_CPU_KERNELS", raising=False)
  monkeypatch.setattr(_kernels.tempfile, "tempdir", str(tmp_path))  # private_dir's parent


@pytest.fixture(scope="module")
def real_library():
  if not _kernels.available() or _kernels.library_path() is None:
    pytest.skip(f"no kernel library built here: {_kernels.unavailable_reason()}")
  return _kernels.library_path(), _kernels._state["loaded"]


# --------------------------------------------------------------------------
# The cache key
# --------------------------------------------------------------------------


GRAVITON2 = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp ssbs
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1

processor\t: 1
"""
GRACE = GRAVITON2.replace("0xd0c", "0xd4f").replace("ssbs", "ssbs sve sve2 bf16 i8mm")


def test_the_key_tells_cpus_compilers_and_targets_apart(tmp_path):
  # aarch64 names its features `Features` (no `flags`): Graviton2 and Grace differ.
  assert "0xd0c" in _kernel_cache.cpu_identity(GRAVITON2)
  assert _kernel_cache.cpu_identity(GRAVITON2) != _kernel_cache.cpu_identity(GRACE)
  assert _kernel_cache.cpu_identity(GRAVITON2) == _kernel_cache.cpu_identity(
      GRAVITON2.replace("BogoMIPS\t: 243.75", "BogoMIPS\t: 250.00"))   # not a CPU feature
  # The compiler's version and what -march=native resolves to (one path).
  keys = [_kernel_cache.cache_key(fake_compiler(tmp_path, **kw)[0], INCLUDE) for kw in (
      {}, dict(version="fakecc 1.1"), dict(target="-march=neoverse-v2"), {})]
  assert len(set(keys)) == 3 and keys[0] == keys[-1], keys


def test_the_key_hashes_the_ffi_headers_contents_not_their_path(tmp_path):
  include = pathlib.Path(jax.ffi.include_dir())
  copies = []
  for name in ("venv_a", "venv_b"):
    copy = tmp_path / name
    for header in include.rglob("*"):
      if header.is_file():
        (copy / header.relative_to(include)).parent.mkdir(parents=True, exist_ok=True)
        (copy / header.relative_to(include)).write_bytes(header.read_bytes())
    copies.append(copy)
  a, b = (_kernel_cache.headers_digest(str(c)) for c in copies)
  assert a == b == _kernel_cache.headers_digest(str(include))
  header = next(p for p in copies[1].rglob("*.h"))
  header.write_bytes(header.read_bytes() + b"\n// another ABI\n")
  _kernel_cache.headers_digest.cache_clear()
  assert _kernel_cache.headers_digest(str(copies[1])) != a


# --------------------------------------------------------------------------
# Building, locking, verifying
# --------------------------------------------------------------------------


def test_concurrent_first_uses_build_once(tmp_path):
  """Four processes (the cache module alone, without JAX, to start fast)."""
  compiler, log = fake_compiler(tmp_path, build="sleep 0.5; printf 'lib' > \"$out\"")
  script = textwrap.dedent("""
      import importlib.util, pathlib, sys
      spec = importlib.util.spec_from_file_location("cache", sys.argv[1])
      cache = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(cache)
      data, _, _ = cache.build(sys.argv[2], pathlib.Path(sys.argv[3]), "k", sys.argv[4])
      print(data.decode())
  """)
  args = [_kernel_cache.__file__, compiler, str(tmp_path / "cache"), INCLUDE]
  procs = [subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                            text=True) for _ in range(4)]
  outs = [p.communicate(timeout=60)[0].strip() for p in procs]
  assert [p.returncode for p in procs] == [0] * 4
  assert outs == ["lib"] * 4
  assert builds(log) == 1, f"4 processes starting together compiled {builds(log)} times"


@pytest.mark.parametrize("damage", ["truncated", "altered", "no checksum"])
def test_a_damaged_cached_library_is_rebuilt_and_never_returned(tmp_path, damage):
  compiler, log = fake_compiler(tmp_path, build="printf 'a good library' > \"$out\"")
  data, library, rebuilt = _kernel_cache.build(compiler, tmp_path, "k", INCLUDE)
  assert (data, rebuilt, builds(log)) == (b"a good library", False, 1)
  assert _kernel_cache.build(compiler, tmp_path, "k", INCLUDE)[0] == data and builds(log) == 1  # cached
  if damage == "truncated":
    library.write_bytes(data[:5])
  elif damage == "altered":
    library.write_bytes(data.replace(b"good", b"evil"))
  else:
    (tmp_path / "kernels-k.so.sha256").unlink()
  again, _, rebuilt = _kernel_cache.build(compiler, tmp_path, "k", INCLUDE)
  assert (again, rebuilt, builds(log)) == (data, True, 2)
  assert library.read_bytes() == data
  assert (tmp_path / "kernels-k.so.sha256").read_text().strip() == hashlib.sha256(data).hexdigest()


def test_a_truncated_cached_library_is_rebuilt_and_the_kernels_give_their_results(
    tmp_path, monkeypatch, fresh_state, real_library):
  """The failure of issue 20: half a library in the cache killed every run
  with SIGBUS (and was never rebuilt). Now the first CPU lowering rebuilds it
  and the kernels compute what they did before."""
  del fresh_state
  real_library, registered = real_library
  compiler, log = fake_compiler(tmp_path, build=f"cp '{real_library}' \"$out\"")
  monkeypatch.setenv("CXX", compiler)
  # XLA takes one library per handler name and process: load the rebuilt
  # one (it must be a loadable library) and keep the handlers registered.
  loaded = []
  monkeypatch.setattr(_kernels, "_register",
                      lambda data, path: loaded.append(_kernels._dlopen(data, path)) or registered)
  key = _kernel_cache.cache_key(compiler, INCLUDE)
  _, library, _ = _kernel_cache.build(compiler, tmp_path / "cache", key, INCLUDE)
  library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])
  z = jnp.array([[3.0, 1.0, 0.0, -2.0], [0.5, 0.5, 4.0, 1.0]])
  step = jax.jit(jax.value_and_grad(lambda z: losses.dem(z, 1.3, 0.8).sum()))
  with pytest.warns(RuntimeWarning, match="did not match its checksum"):
    got = step(z)
  assert _kernels.available() and _kernels.library_path() == library and builds(log) == 2
  assert len(loaded) == 1 and hasattr(loaded[0], "DemFwd")
  assert "dem_jax_DemFwd" in step.lower(z).as_text()
  with _kernels.disabled():
    want = jax.jit(jax.value_and_grad(lambda z: losses.dem(z, 1.3, 0.8).sum()))(z)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-7)
  assert _kernel_cache.read_verified(library) is not None


# --------------------------------------------------------------------------
# When there is nothing to build with
# --------------------------------------------------------------------------

Z = jnp.array([[0.0, 0.0], [10.0, 0.0]])


def _pure_entropy():
  with _kernels.disabled():
    return jax.jit(lambda z: losses.entropy(z))(Z)


@pytest.mark.parametrize("compiler", ["none", "failing"])
@pytest.mark.parametrize("call", ["jit", "eager"])
def test_without_a_working_compiler_one_warning_at_the_callers_line(
    tmp_path, monkeypatch, fresh_state, compiler, call):
  del fresh_state
  if compiler == "none":
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))   # no g++, no c++
  else:
    monkeypatch.setenv("CXX", fake_compiler(tmp_path, fail_build=True)[0])
  f = jax.jit(lambda z: losses.entropy(z)) if call == "jit" else losses.entropy
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    line = sys._getframe().f_lineno + 1  # pylint: disable=protected-access
    first = f(Z)
    second = jax.jit(lambda z: losses.dem(z, 1.3, 0.8))(Z)
  messages = [w for w in caught if "could not build the fused CPU kernels" in str(w.message)]
  assert len(messages) == 1, [str(w.message) for w in caught]
  assert (messages[0].filename, messages[0].lineno) == (__file__, line), (
      "the warning should point at the caller's line, not into dem_jax or JAX")
  assert ("no C++ compiler" if compiler == "none" else "kernels.cc:1: error") in str(
      messages[0].message)
  np.testing.assert_array_equal(first, _pure_entropy())
  np.testing.assert_allclose(second, losses.dem(Z, 1.3, 0.8), rtol=1e-6)
  assert not _kernels.available()


def test_kernels_switched_off_build_nothing_and_say_nothing(tmp_path, monkeypatch, fresh_state):
  del fresh_state
  compiler, log = fake_compiler(tmp_path)
  monkeypatch.setenv("CXX", compiler)
  monkeypatch.setenv("DEM_JAX_CPU_KERNELS", "0")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    np.testing.assert_array_equal(jax.jit(lambda z: losses.entropy(z))(Z), _pure_entropy())
  assert builds(log) == 0


# --------------------------------------------------------------------------
# Laziness: a program for another platform builds nothing
# --------------------------------------------------------------------------


def _everything(z, mec):
  out = [jax.value_and_grad(lambda z: jnp.sum(fn(z)))(z) for fn in
         (losses.entropy, lambda z: losses.cadf(z, 0.6), lambda z: losses.gmc(z, 0.7),
          lambda z: losses.dem(z, 1.3, 0.8), lambda z: losses.adadem(z, None, calibrator="gmc")[0])]
  out.append(jax.value_and_grad(lambda z: jnp.sum(losses.adadem(z, mec)[0]))(z))
  return out


def test_nothing_is_built_until_a_program_is_lowered_for_cpu(tmp_path, monkeypatch, fresh_state):
  del fresh_state
  compiler, log = fake_compiler(tmp_path)   # "builds" a file that does not load
  monkeypatch.setenv("CXX", compiler)
  z, mec = jnp.ones((3, 40)), losses.mec_init(40)
  traced = jax.jit(_everything).trace(z, mec)
  for platform in ("cuda", "rocm", "tpu"):
    text = traced.lower(lowering_platforms=(platform,)).as_text()
    assert "dem_jax_" not in text, f"the {platform} program calls the CPU kernels"
  assert builds(log) == 0, "tracing, or lowering for GPU/TPU, compiled the kernels"
  assert _kernels._state == {"loaded": None, "error": None, "path": None}
  with pytest.warns(RuntimeWarning, match="could not build"):
    traced.lower(lowering_platforms=("cpu",))   # a bad library: pure JAX, one warning   # a bad library: pure JAX, one warning
  assert builds(log) == 1


# --------------------------------------------------------------------------
# The fallback when the cache directory cannot be used
# --------------------------------------------------------------------------


def test_the_private_fallback_directory_is_made_0700_and_reused(tmp_path):
  path = _kernel_cache.private_dir(tmp_path)
  assert path == tmp_path / f"dem_jax-{os.getuid()}"
  assert stat.S_IMODE(path.stat().st_mode) == 0o700 and path.stat().st_uid == os.getuid()
  assert _kernel_cache.private_dir(tmp_path) == path


@pytest.mark.parametrize("problem", ["group-writable", "world-readable", "someone else's",
                                     "a symlink", "a file"])
def test_a_fallback_directory_that_is_not_private_is_not_used(tmp_path, monkeypatch, problem):
  uid = os.getuid()
  path = tmp_path / f"dem_jax-{uid}"
  if problem == "a symlink":
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o700)
    path.symlink_to(target)
  elif problem == "a file":
    path.write_bytes(b"")
  else:
    path.mkdir()
    os.chmod(path, {"group-writable": 0o770, "world-readable": 0o705}.get(problem, 0o700))
    if problem == "someone else's":  # seen by another user, whose directory it is not
      monkeypatch.setattr(os, "getuid", lambda: uid + 1)
      path = path.rename(tmp_path / f"dem_jax-{uid + 1}")
  with pytest.raises(PermissionError, match="not a private directory"):
    _kernel_cache.private_dir(tmp_path)


def test_an_unusable_cache_falls_back_to_the_private_directory_only_if_it_is_private(
    tmp_path, monkeypatch, fresh_state):
  del fresh_state
  compiler, log = fake_compiler(tmp_path, build="printf 'lib' > \"$out\"")
  (tmp_path / "cache").write_text("a file, not a directory")   # the cache is unusable
  load = lambda data, path: (data, path)
  with pytest.warns(RuntimeWarning, match="kernel cache is unusable"):
    (data, path), kept = _kernels.build_and_load(compiler, load=load)
  private = tmp_path / f"dem_jax-{os.getuid()}"
  assert data == b"lib" and path.parent == private and kept == path
  # The same directory, opened to the group: not used; a build for this
  # process only, in a fresh private directory removed afterwards.
  os.chmod(private, 0o770)
  before = sorted(p.name for p in private.iterdir())
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    (data, path), kept = _kernels.build_and_load(compiler, load=load)
  said = " | ".join(str(w.message) for w in caught)
  assert "not a private directory" in said and "for this process only" in said, said
  assert data == b"lib" and path.parent != private and kept is None
  assert not path.parent.exists()
  assert sorted(p.name for p in private.iterdir()) == before
  assert builds(log) == 2
