"""Config files: find one by name or path, run its ``get_config()``, check it, apply overrides.

``load_config('heart_fedavg')`` runs a config shipped with medfed_jax (the
repository's ``configs/`` folder, installed as the package
``medfed_jax.configs``); ``load_config('my/exp.py')`` runs a file. Either way
the result is checked field by field against `medfed_jax.config.default_config`
(a field that does not exist is refused with a "did you mean", a value of the
wrong kind or an integer out of range too), and every error is one
`ConfigError` line naming the file and the line at fault.

`apply_override` sets ``--config.<field>=<text>`` from the command line,
parsing the text as the field's kind (integer, number, true/false, string,
tuple).
"""

from __future__ import annotations

import ast
import difflib
import inspect
import io
import json
import os
import pathlib
import re
import textwrap
import tokenize
import traceback
from collections.abc import Callable
from typing import Any

import ml_collections

from medfed_jax import config as config_lib
from medfed_jax import sweep


class ConfigError(ValueError):
    """A config that cannot be used, as one line naming the file or flag and the fix."""


def shipped_dir(package: pathlib.Path | None = None) -> pathlib.Path:
    """Where the shipped configs are: ``medfed_jax/configs`` once installed, ``<checkout>/configs`` in a checkout.

    ``package``: the ``medfed_jax`` package folder (default: this one).
    """
    package = package or pathlib.Path(__file__).resolve().parent
    installed = package / "configs"
    return installed if (installed / "__init__.py").is_file() else package.parent / "configs"


def shipped_names() -> tuple[str, ...]:
    """The names ``--config=<name>`` accepts."""
    return tuple(sorted(p.stem for p in shipped_dir().glob("*.py") if not p.name.startswith("_")))


def config_path(name_or_path: str) -> pathlib.Path:
    """The file of a shipped config name (``heart_fedavg``) or a path (ending in ``.py`` or holding a ``/``)."""
    if name_or_path.endswith(".py") or os.sep in name_or_path or "/" in name_or_path:
        path = pathlib.Path(name_or_path).expanduser()
        if not path.is_file():
            shipped = f"did you mean the shipped --config={path.stem}? " if path.stem in shipped_names() else ""
            raise ConfigError(
                f"config file {name_or_path} not found (working directory {os.getcwd()}); {shipped}Give a path "
                f"to a .py file or a shipped config name: {', '.join(shipped_names())}."
            )
        return path
    path = shipped_dir() / f"{name_or_path}.py"
    if name_or_path.startswith("_") or not path.is_file():
        close = difflib.get_close_matches(name_or_path, shipped_names(), n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        raise ConfigError(
            f"no shipped config is named {name_or_path!r}; {hint}Shipped: {', '.join(shipped_names())}; "
            "or give a path to a .py file."
        )
    return path


_CAST = re.compile(
    r"Could not override field '(\w+)' \(reference\)\. (.*) is of original type <class '(\w+)'> "
    r"and cannot be casted to type <class '(\w+)'>"
)
_KINDS = {"int": 0, "float": 0.0, "str": "", "bool": False, "tuple": ()}


def _failure(path: pathlib.Path, error: BaseException) -> ConfigError:
    """One line: where in the config file ``error`` arose, and what it says."""
    if isinstance(error, SyntaxError):
        return ConfigError(f"{path}, line {error.lineno}: {error.msg} (a Python syntax error); fix the file.")
    frames = [f for f in traceback.extract_tb(error.__traceback__) if pathlib.Path(f.filename) == path.resolve()]
    where = f"{path}, line {frames[-1].lineno}" if frames else str(path)
    cast = _CAST.match(str(error))
    if not cast:
        return ConfigError(f"{where}: {type(error).__name__}: {error}")
    field, value, given, wanted = cast.groups()
    wanted = config_lib.kind_of(_KINDS[wanted]) if wanted in _KINDS else f"a {wanted}"
    fix = "write it without quotes" if given == "str" else "change the value"
    return ConfigError(f"{where}: {field} is set to {value} (a {given}), but {field} takes {wanted}; {fix}.")


def load_config(name_or_path: str) -> ml_collections.ConfigDict:
    """``get_config()`` of a shipped config or a config file, checked against `config.default_config`."""
    path = config_path(name_or_path)
    scope: dict[str, Any] = {"__file__": str(path), "__name__": f"medfed_jax_config_{path.stem}"}
    try:
        code = compile(path.read_text(), str(path.resolve()), "exec")
        exec(code, scope)  # noqa: S102 - a config file is Python by design
        if "get_config" not in scope:
            raise ConfigError(f"{path} defines no get_config(); a config file returns its config from get_config().")
        cfg = scope["get_config"]()
    except ConfigError:
        raise
    except Exception as error:  # noqa: BLE001 - the config file is user code; report where it failed
        raise _failure(path, error) from error
    if not isinstance(cfg, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned a {type(cfg).__name__}, not an ml_collections.ConfigDict.")
    try:
        config_lib.check_fields(cfg)
    except ValueError as error:
        raise ConfigError(f"{path}: {error}") from None
    return cfg


_BOOLS = {"true": True, "false": False, "1": True, "0": False}


def parse_value(path: str, text: str, default: Any) -> Any:
    """The value of ``--config.<path>=<text>`` for a field whose default is ``default``."""
    flag = f"--config.{path}={text}"
    try:
        if isinstance(default, bool):
            return _BOOLS[text.strip().lower()]
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
        if isinstance(default, str):
            return text
        value = ast.literal_eval(text)
        if default is None or isinstance(default, ml_collections.ConfigDict):
            return value
    except (KeyError, ValueError, SyntaxError):
        kind = "an integer seed or None" if path in config_lib.OPTIONAL_SEEDS else config_lib.kind_of(default)
        raise ConfigError(
            f"{flag}: {path} takes {kind} (default {format_default(default)}); {text!r} is not one."
        ) from None
    if isinstance(default, (tuple, list)):
        value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return value


def apply_override(cfg: ml_collections.ConfigDict, path: str, text: str) -> None:
    """Set ``--config.<path>=<text>``: the field must exist (else "did you mean"), the text must parse as its kind.

    ``sweep.<key>`` sets a key of the sweep section (`medfed_jax.sweep.SWEEP_FIELDS`), parsed as a Python literal
    unless the config already gives that key a kind.
    """
    leaves = config_lib.leaf_values(cfg)
    known = {**leaves, **{f"sweep.{k}": None for k in sweep.SWEEP_FIELDS}}
    if path not in known:
        raise ConfigError(f"--config.{path}: {config_lib.unknown_field(path, known)}")
    default = leaves[path] if path in leaves else cfg.sweep.get(path.split(".", 1)[1])
    value = parse_value(path, text, default)
    try:
        config_lib.set_path(cfg, path, value)
        if path in leaves:
            config_lib.check_value(path, config_lib.get_path(cfg, path), leaves[path])
    except (TypeError, ValueError) as error:
        raise ConfigError(f"--config.{path}={text}: {error}") from None


# --------------------------------------------------------------------------- --help: every field and its meaning


def _comments(make: Callable) -> dict[str, str]:
    """``field -> comment`` from the source of a defaults function: the comment on the line that sets the field.

    A line ``cfg.rounds = 50  # ...``, ``rounds=50,  # ...`` or ``"rounds": 50,  # ...``
    documents ``rounds``; upper-case names of the function's module that hold
    tuples of strings (``one of MODELS``) are spelled out.
    """
    module = inspect.getmodule(make)
    source = textwrap.dedent(inspect.getsource(make))
    docs, line = {}, []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            ops = [i for i, t in enumerate(line) if t.type == tokenize.OP and t.string in ("=", ":")]
            if ops and ops[0] > 0 and line[ops[0] - 1].type in (tokenize.NAME, tokenize.STRING):
                key = line[ops[0] - 1].string.strip("\"'")
                docs[key] = _spell_out(token.string.lstrip("#").strip(), module)
        elif token.type in (tokenize.NL, tokenize.NEWLINE):
            line = []
        else:
            line.append(token)
    return docs


def _spell_out(text: str, module: Any) -> str:
    def name(match: re.Match) -> str:
        value = getattr(module, match.group(0), None)
        ok = isinstance(value, tuple) and value and all(isinstance(v, str) for v in value)
        return ", ".join(value) if ok else match.group(0)

    return re.sub(r"\b[A-Z][A-Z_]{2,}\b", name, text)


def field_docs() -> dict[str, dict[str, str]]:
    """Section (``'run'`` for the top-level fields) -> field path -> its one line of meaning."""
    docs = {"run": {k: v for k, v in _comments(config_lib.default_config).items() if k not in config_lib.sections()}}
    for section, make in config_lib.sections().items():
        docs[section] = {f"{section}.{k}": v for k, v in _comments(make).items()}
    return docs


def describe_fields(section: str | None = None) -> str:
    """Every config field (or one section's) with its default and meaning, grouped by section."""
    docs, defaults = field_docs(), config_lib.default_config()
    titles = {"run": config_lib.default_config, **config_lib.sections()}
    if section is not None and section not in titles:
        raise ValueError(f"--help={section}: no such config section; choose one of {', '.join(titles)}.")
    lines = []
    for name in [section] if section else titles:
        title = inspect.getdoc(titles[name]).splitlines()[0].replace("``", "'")
        flags = {path: f"--config.{path}={format_default(config_lib.get_path(defaults, path))}" for path in docs[name]}
        width = min(max(map(len, flags.values())), 44)
        lines += ["", f"[{name}] {title}", *(f"  {flags[p]:<{width}}  {doc}" for p, doc in docs[name].items())]
    return "\n".join(lines[1:])


def format_default(value: Any) -> str:
    """A default as written on the command line (``(200, 200)``, ``'sgd'`` bare, ``{}`` for an empty section)."""
    if isinstance(value, ml_collections.ConfigDict):
        return json.dumps(value.to_dict())
    return value if isinstance(value, str) else repr(value)
