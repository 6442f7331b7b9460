"""The fused CPU kernels' library cache: key, lock, checksum, fallback.

Kept apart from `_kernels` (which registers the library with XLA) and free of
JAX, so that what decides which library a process may load can be read, and
tested, on its own. A library is cached as `kernels-<key>.so` with its
SHA-256 in `kernels-<key>.so.sha256`, written after it; `build` returns the
library's bytes only once they match that checksum, rebuilding otherwise.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import pathlib
import shutil
import stat
import subprocess
import tempfile

SOURCE = pathlib.Path(__file__).parent / "_cpu" / "kernels.cc"
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-std=c++17",
         "-shared", "-fPIC", "-w")
# The /proc/cpuinfo fields that tell CPUs apart: x86 names its features
# `flags`, aarch64 `Features` (and the core by implementer and part).
CPU_FIELDS = ("vendor_id", "cpu family", "model", "flags", "CPU implementer",
              "CPU architecture", "CPU variant", "CPU part", "Features")


def cache_dir() -> pathlib.Path:
  """`$DEM_JAX_CACHE_DIR`, else `$XDG_CACHE_HOME/dem_jax` (`~/.cache/dem_jax`)."""
  root = os.environ.get("DEM_JAX_CACHE_DIR")
  if not root:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    root = os.path.join(base, "dem_jax")
  return pathlib.Path(root)


def find_compiler() -> str | None:
  """`$CXX`, else g++ or c++ on the PATH; None if there is none."""
  return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def _ask(compiler: str, *args: str) -> str:
  """What the compiler prints for `args` (stdout and stderr); raises if it fails."""
  proc = subprocess.run([compiler, *args], capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f"`{compiler} {' '.join(args)}` failed (exit {proc.returncode}): "
                       f"{(proc.stderr or proc.stdout)[-500:].strip()}")
  return proc.stdout + proc.stderr


def cpu_identity(cpuinfo: str | None = None) -> str:
  """The CPU fields (`CPU_FIELDS`) of /proc/cpuinfo's first processor.

  Args:
    cpuinfo: the file's text (default: read it; the machine's name where
      there is no such file).
  """
  if cpuinfo is None:
    try:
      cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
      return os.uname().machine
  fields = {}
  for line in cpuinfo.strip().split("\n\n")[0].splitlines():
    name, _, value = line.partition(":")
    if name.strip() in CPU_FIELDS:
      fields[name.strip()] = " ".join(value.split())
  return repr(sorted(fields.items()))


@functools.cache
def headers_digest(include_dir: str) -> str:
  """SHA-256 of the FFI headers' names and contents under `include_dir` (not
  of its path: every virtualenv with the same headers shares one library)."""
  digest = hashlib.sha256()
  root = pathlib.Path(include_dir)
  for path in sorted(p for p in root.rglob("*") if p.is_file()):
    digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
  return digest.hexdigest()


def cache_key(compiler: str, include_dir: str) -> str:
  """The library's key: what changes the machine code or the ABI changes it.

  The kernel source and flags; the compiler (path and `--version`); what
  `-march=native` resolves to (`-###` prints the target CPU and every
  feature the compiler enables, for g++ and clang alike); the CPU itself
  (its /proc/cpuinfo model and features, so that two CPUs of one family,
  e.g. aarch64 cores the compiler does not know, never share a library);
  the FFI headers' contents.
  """
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), " ".join((compiler,) + FLAGS).encode(),
               _ask(compiler, "--version").encode(),
               _ask(compiler, "-###", "-march=native", "-x", "c++", "-E", os.devnull,
                    "-o", os.devnull).encode(),
               cpu_identity().encode(), headers_digest(include_dir).encode()):
    key.update(hashlib.sha256(part).digest())
  return key.hexdigest()[:16]


def _checksum_path(library: pathlib.Path) -> pathlib.Path:
  return library.with_name(library.name + ".sha256")


def read_verified(library: pathlib.Path) -> bytes | None:
  """The library's bytes if they match the checksum written after them, else None."""
  try:
    data = library.read_bytes()
    want = _checksum_path(library).read_text().strip()
  except OSError:
    return None
  return data if hashlib.sha256(data).hexdigest() == want else None


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
  fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
  try:
    os.fchmod(fd, 0o644)  # mkstemp's 0600 would keep other users of a shared cache out
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _compile(compiler: str, directory: pathlib.Path, include_dir: str) -> bytes:
  """Compiles kernels.cc in `directory` and returns the library's bytes."""
  fd, tmp = tempfile.mkstemp(prefix="build.", suffix=".so", dir=directory)
  os.close(fd)
  try:
    cmd = [compiler, *FLAGS, f"-I{include_dir}", str(SOURCE), "-o", tmp]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as e:  # the compiler itself, not the directory
      raise RuntimeError(f"`{' '.join(cmd)}` could not run: {e}") from e
    if proc.returncode != 0:
      raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n"
                         f"{(proc.stderr or proc.stdout)[-2000:]}")
    data = pathlib.Path(tmp).read_bytes()
    if not data:
      raise RuntimeError(f"`{' '.join(cmd)}` wrote an empty library")
    return data
  finally:
    os.unlink(tmp)


def build(compiler: str, directory: pathlib.Path, key: str,
          include_dir: str) -> tuple[bytes, pathlib.Path, bool]:
  """The verified library for `key` in `directory`, built there if needed.

  Under an exclusive lock on `kernels-<key>.lock`, so that processes starting
  together build once: a cached library whose bytes match its checksum is
  used as it is; otherwise (missing, truncated, altered, or no checksum,
  e.g. a build killed before writing it) it is compiled again and replaced,
  the library first and its checksum after it.

  Returns:
    `(bytes, path, rebuilt)`: the library's verified bytes, its path, and
    whether a cached library failed its check and was replaced.

  Raises:
    OSError: the directory cannot be created or written (the caller falls
      back to another directory); RuntimeError: the compiler failed.
  """
  directory.mkdir(parents=True, exist_ok=True)
  library = directory / f"kernels-{key}.so"
  try:
    lock = open(directory / f"kernels-{key}.lock", "a+b")  # pylint: disable=consider-using-with
  except OSError:
    data = read_verified(library)  # a read-only cache may still hold a good library
    if data is not None:
      return data, library, False
    raise
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    data = read_verified(library)
    if data is not None:
      return data, library, False
    corrupt = library.exists()
    data = _compile(compiler, directory, include_dir)
    _write_atomic(library, data)
    _write_atomic(_checksum_path(library), (hashlib.sha256(data).hexdigest() + "\n").encode())
    return data, library, corrupt


def private_dir(parent: str | os.PathLike | None = None) -> pathlib.Path:
  """This user's private fallback directory `<parent>/dem_jax-<uid>` (parent:
  the system's temporary directory).

  Created with mode 0700. One that exists already is used only if it is a
  real directory (not a link), owned by this user, and neither group- nor
  world-accessible: a directory that another user made under a shared,
  predictable name could hold any library.

  Raises:
    PermissionError: the directory exists and fails one of these checks.
  """
  path = pathlib.Path(parent or tempfile.gettempdir()) / f"dem_jax-{os.getuid()}"
  try:
    os.mkdir(path, 0o700)
  except FileExistsError:
    pass
  info = os.lstat(path)
  if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
      or info.st_mode & 0o077):
    raise PermissionError(
        f"{path} is not a private directory of this user (owner uid {info.st_uid}, "
        f"mode {stat.filemode(info.st_mode)}; want uid {os.getuid()}, drwx------), "
        "so it is not used")
  return path
