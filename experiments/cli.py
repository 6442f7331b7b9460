"""The `--config` flag shared by the experiment entry points, with clear errors.

ml_collections reports a misspelt override (`--config.lr_gird=...`) as a long
traceback that ends in `AttributeError: "'lr_gird'"`, and accepts any text for a
tuple field (`--config.seeds=abc` becomes `('abc',)` and fails much later, deep
in NumPy). `define_config` checks the override names against the config file
before the flag is defined, and `check_overrides` the element types of tuple
fields once flags are parsed; both stop with a message that names the field
and what it expects.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Any

from ml_collections import config_dict
from ml_collections import config_flags


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


def load_config_file(path: str):
    """`get_config()` of a config file, as ml_collections loads it (no overrides)."""
    spec = importlib.util.spec_from_file_location("_dem_jax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


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


def define_config(default_file: str, argv: list[str] | None = None) -> None:
    """Defines `--config` (default `default_file`), refusing unknown override names.

    Call at import time of an entry point, where ml_collections would itself
    parse the overrides in `sys.argv`.
    """
    argv = sys.argv if argv is None else argv
    paths = override_paths(argv)
    config_file = _flag_value(argv, "config") or default_file
    if paths and os.path.isfile(config_file):
        messages = unknown_overrides(load_config_file(config_file), paths)
        if messages:
            sys.exit("error: " + "\n       ".join(messages)
                     + f"\n       (config file: {config_file})")
    config_flags.DEFINE_config_file("config", default_file, "ml_collections config file.",
                                    lock_config=True)


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
