"""What the experiment entry points share: their flags, config checks and clear errors.

* `define_flags(default_file)`: `--config` (an ml_collections file, default
  `default_file`), `--workdir` and the multi-host flags of
  `dem_jax.engine.distributed`, all shown by `--help` together with the
  experiment's config files.
* ml_collections reports a misspelt override (`--config.lr_gird=...`) as a long
  traceback that ends in `AttributeError: "'lr_gird'"`, and accepts any text for
  a tuple field (`--config.seeds=abc` becomes `('abc',)` and fails much later,
  deep in NumPy). `define_config` checks the override names against the config
  file before the flag is defined, and `check_overrides` the element types of
  tuple fields once flags are parsed; both stop with a message that names the
  field and what it expects.
* `check_config(config, spec)`: the type and range of every numeric field and
  the element type of every tuple, from a per-experiment spec (`experiments.specs`),
  before any work; each experiment's `validate` calls it.
* `start(argv)`: what every entry point does before importing its library.
* `run(lib, config, workdir)`: validates, runs, and prints a configuration error
  or a `reporting.ClearError` (work directory, corrupt file) as one paragraph,
  without a traceback.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
import os
import re
import sys
from typing import Any

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_dict
from ml_collections import config_flags

from dem_jax.engine import reporting


class ConfigError(reporting.ClearError, ValueError):
    """A configuration that breaks its experiment's spec (types, ranges, empty grids)."""


def _flat(config, prefix: str = "") -> dict[str, Any]:
    """{dotted path: value} of every leaf of a ConfigDict (and of its sub-dicts)."""
    out = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, config_dict.ConfigDict):
            out[path] = value
            out.update(_flat(value, path + "."))
        else:
            out[path] = value
    return out


def _flag_value(argv: list[str], name: str) -> str | None:
    """The value of `--name=V` or `--name V` in argv (the last one wins)."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith(f"--{name}="):
            value = arg.split("=", 1)[1]
        elif arg == f"--{name}" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


def override_paths(argv: list[str]) -> list[str]:
    """The field paths of the `--config.<path>=...` flags in argv."""
    paths = []
    for arg in argv:
        if arg.startswith("--config."):
            paths.append(arg[len("--config."):].split("=", 1)[0])
    return paths


def split_config_arg(value: str) -> tuple[str, str | None]:
    """`--config`'s value -> (file, argument or None): `"glyphs_c.py:100"` -> `("glyphs_c.py", "100")`."""
    file, colon, arg = value.partition(":")
    return file, (arg if colon else None)


def load_config_file(path: str):
    """`get_config()` of a config file, as ml_collections loads it (no overrides).

    `path` may carry the config's argument after a colon, as `--config` does:
    `"experiments/configs/glyphs_c.py:100"` returns `get_config("100")`.
    """
    file, arg = split_config_arg(path)
    spec = importlib.util.spec_from_file_location("_dem_jax_config", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config() if arg is None else module.get_config(arg)


def unknown_overrides(config, paths: list[str]) -> list[str]:
    """One message per override path that names no field of `config`."""
    fields = _flat(config)
    messages = []
    for path in paths:
        if path in fields:
            continue
        close = difflib.get_close_matches(path, list(fields), n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join(f'--config.{c}' for c in close)}?" if close else ""
        messages.append(f"--config.{path}: the config has no field '{path}'.{hint}")
    return messages


def config_files(default_file: str) -> list[str]:
    """The config files of the experiment whose default is `default_file`.

    They are `default_file` and the files beside it that import it (named
    configs start from the default and override a few fields), read with `ast`
    without running them.
    """
    folder = os.path.dirname(os.path.abspath(default_file))
    module = os.path.splitext(os.path.basename(default_file))[0]
    out = [os.path.abspath(default_file)]
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not name.endswith(".py") or name.startswith("_") or path == out[0]:
            continue
        try:
            tree = ast.parse(open(path).read())
        except (OSError, SyntaxError):
            continue
        for node in ast.walk(tree):
            names = ([f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(n.split(".")[-1] == module and "configs" in n for n in names):
                out.append(path)
                break
    return out


def _describe(path: str) -> str:
    """`experiments/configs/x.py: first line of its docstring`."""
    try:
        doc = ast.get_docstring(ast.parse(open(path).read())) or ""
    except (OSError, SyntaxError):
        doc = ""
    rel = os.path.relpath(path)
    first = doc.strip().splitlines()[0].rstrip(".") if doc.strip() else ""
    return f"{rel}: {first}" if first else rel


def define_config(default_file: str, argv: list[str] | None = None) -> None:
    """Defines `--config` (default `default_file`), refusing unknown override names.

    Call at import time of an entry point, where ml_collections would itself
    parse the overrides in `sys.argv`. A `--config` file that does not exist
    stops the program with the list of this experiment's config files.
    """
    argv = sys.argv if argv is None else argv
    paths = override_paths(argv)
    given = _flag_value(argv, "config")
    files = config_files(default_file)
    listing = "\n".join(f"  {_describe(f)}" for f in files)
    if given is not None and not os.path.isfile(split_config_arg(given)[0]):
        sys.exit(f"error: --config={given}: no such file. The config files of this "
                 f"experiment are:\n{listing}")
    config_file = given or default_file
    if paths and os.path.isfile(split_config_arg(config_file)[0]):
        messages = unknown_overrides(load_config_file(config_file), paths)
        if messages:
            sys.exit("error: " + "\n       ".join(messages)
                     + f"\n       (config file: {config_file})")
    config_flags.DEFINE_config_file(
        "config", default_file,
        "ml_collections config file; override a field with --config.<field>=<value>. "
        f"This experiment's config files (the first is the default):\n{listing}",
        lock_config=True)


def define_flags(default_file: str) -> None:
    """Defines an entry point's flags: `--config`, `--workdir` and the multi-host flags.

    All of them are key flags of the main module, so `--help` shows them.

    Example (in `experiments/<name>.py`, at import time):
      >>> cli.define_flags(os.path.join(_HERE, "configs", "default.py"))
    """
    from dem_jax.engine import distributed
    define_config(default_file)
    flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go (required).")
    distributed.define_flags()
    main = sys.argv[0]  # the name absl's --help gives the main module
    for name in ("config", "workdir", "coordinator_address", "num_processes", "process_id"):
        flags.FLAGS.register_key_flag_for_module(main, flags.FLAGS[name])


def tuple_type_errors(config, reference) -> list[str]:
    """Tuple fields of `config` whose elements are not of the reference's element type."""
    given, expected = _flat(config), _flat(reference)
    messages = []
    for path, ref in expected.items():
        value = given.get(path)
        if not isinstance(ref, tuple) or not ref or not isinstance(value, tuple):
            continue
        types = {type(x) for x in ref}
        numeric = types <= {int, float}
        for x in value:
            ok = (isinstance(x, (int, float)) and not isinstance(x, bool)) if numeric \
                else isinstance(x, tuple(types))
            if not ok:
                kinds = "numbers" if numeric else " or ".join(sorted(t.__name__ for t in types))
                messages.append(f"--config.{path}: expected a tuple of {kinds} like {ref!r}, "
                                f"got {value!r}.")
                break
    return messages


def check_overrides(flag) -> None:
    """Stops with a message if a tuple override has elements of the wrong type.

    Args:
      flag: the parsed `--config` flag, `flags.FLAGS["config"]`.
    """
    if not override_paths(sys.argv):
        return
    reference = load_config_file(config_flags.get_config_filename(flag))
    messages = tuple_type_errors(flag.value, reference)
    if messages:
        sys.exit("error: " + "\n       ".join(messages))


# A rule of a spec: "[[nonempty ]tuple of ](int|float|str)[ (>|>=|<|<=) N | in [a, b] ]",
# with ( ) for open ends of a range. "float" accepts ints; "int" accepts no float.
_RULE = re.compile(
    r"^(?:(?P<nonempty>nonempty )?tuple of )?(?P<kind>int|float|str)"
    r"(?: (?P<op>>=|>|<=|<) (?P<bound>[-+.\deE]+)"
    r"| in (?P<lo_b>[\[(])(?P<lo>[-+.\deE]+), (?P<hi>[-+.\deE]+)(?P<hi_b>[\])]))?$")
_KIND = {"int": "int", "float": "number", "str": "string"}


def parse_rule(rule: str) -> re.Match:
    match = _RULE.match(rule)
    if match is None:
        raise ValueError(f"Bad spec rule {rule!r}: write e.g. 'int >= 1', 'float in (0, 1]', "
                         "'nonempty tuple of float > 0'.")
    return match


def _condition(m: re.Match) -> str:
    if m["op"]:
        return f"{m['op']} {m['bound']}"
    if m["lo"]:
        return f"in {m['lo_b']}{m['lo']}, {m['hi']}{m['hi_b']}"
    return ""


def _scalar_ok(m: re.Match, x) -> tuple[bool, bool]:
    """(type ok, range ok) of one value under a rule."""
    kind = m["kind"]
    if kind == "str":
        return isinstance(x, str), True
    if isinstance(x, bool) or not isinstance(x, (int, float) if kind == "float" else int):
        return False, True
    if kind == "float" and not math.isfinite(x):
        return True, False
    if m["op"]:
        b = float(m["bound"])
        return True, {">": x > b, ">=": x >= b, "<": x < b, "<=": x <= b}[m["op"]]
    if m["lo"]:
        lo, hi = float(m["lo"]), float(m["hi"])
        return True, ((x >= lo if m["lo_b"] == "[" else x > lo)
                      and (x <= hi if m["hi_b"] == "]" else x < hi))
    return True, True


def rule_errors(path: str, value, rule: str) -> list[str]:
    """What is wrong with `config.<path> = value` under `rule` (empty list: nothing)."""
    m = parse_rule(rule)
    kind, cond = _KIND[m["kind"]], _condition(m)
    what = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    if not m.group(0).startswith(("tuple", "nonempty")):
        type_ok, range_ok = _scalar_ok(m, value)
        if not type_ok:
            return [f"config.{path} must be {what}{' ' + cond if cond else ''}, got {value!r}."]
        return [] if range_ok else [f"config.{path} must be {cond}, got {value!r}."]
    if not isinstance(value, (tuple, list)):
        return [f"config.{path} must be a tuple of {kind}s, got {value!r}."]
    if m["nonempty"] and not value:
        return [f"config.{path} is empty: give at least one {kind}."]
    for x in value:
        type_ok, range_ok = _scalar_ok(m, x)
        if not (type_ok and range_ok):
            return [f"config.{path} must hold {kind}s{' ' + cond if cond else ''} only, got "
                    f"{x!r} in {tuple(value)!r}."]
    return []


def _matches(path: str, pattern: str) -> bool:
    """`pattern` with `*` for one path component (`learning_rates.*`)."""
    return re.fullmatch(re.escape(pattern).replace(r"\*", r"[^.]+"), path) is not None


def spec_rule(spec: dict[str, str], path: str) -> str | None:
    """The rule of `path` in `spec` (an exact entry first, then a pattern)."""
    if path in spec:
        return spec[path]
    return next((r for p, r in spec.items() if "*" in p and _matches(path, p)), None)


def config_errors(config, spec: dict[str, str]) -> list[str]:
    """Every field of `config` that breaks its rule in `spec`, one message each."""
    messages = []
    for path, value in _flat(config).items():
        if isinstance(value, config_dict.ConfigDict):
            continue
        rule = spec_rule(spec, path)
        if rule is not None:
            messages += rule_errors(path, value, rule)
    return messages


def check_config(config, spec: dict[str, str]) -> None:
    """Raises ConfigError naming every field of `config` that breaks its rule in `spec`.

    Call first in an experiment's `validate`, before any work and before the work
    directory is claimed.

    Example:
      >>> cli.check_config(config, specs.TTA)
      ConfigError: config.lr_grid must hold numbers > 0 only, got -0.1 in (-0.1, 1.0).
    """
    messages = config_errors(config, spec)
    if messages:
        raise ConfigError(" ".join(messages) if len(messages) == 1 else
                          "Bad configuration: " + " ".join(messages))


def start(argv: list[str]) -> None:
    """What every entry point's `main` does before it imports its library (and JAX starts).

    Refuses stray arguments and a missing --workdir, checks the config overrides,
    joins the other hosts (before any JAX work) and quiets orbax's per-save INFO logs.
    """
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    if not flags.FLAGS.workdir:
        raise app.UsageError("--workdir is required (where results and checkpoints go).")
    check_overrides(flags.FLAGS["config"])
    from dem_jax.engine import distributed  # imports jax, starts nothing
    distributed.initialize_from_flags()  # before any JAX work
    logging.set_verbosity(logging.WARNING)


def run(lib, config, workdir: str) -> Any:
    """`lib.validate(config)` then `lib.run(config, workdir)`, with clear errors.

    A configuration error (any ValueError of `validate`, which only reads the
    config) and a `reporting.ClearError` of the run (a work directory that is a
    file, read-only or another run's; a corrupt config.json) stop the program
    with `error: <message>`, one paragraph and no traceback. Anything else keeps
    its traceback.

    Example (in `experiments/<name>.py`'s `main`):
      >>> from experiments import tta_lib
      >>> cli.run(tta_lib, FLAGS.config, FLAGS.workdir)
    """
    try:
        lib.validate(config)
    except ValueError as e:
        sys.exit(f"error: {e}")
    try:
        return lib.run(config, workdir)
    except reporting.ClearError as e:
        sys.exit(f"error: {e}")
