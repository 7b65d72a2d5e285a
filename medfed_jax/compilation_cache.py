"""JAX's persistent compilation cache, on by default: a program compiled once is read from disk next time.

Where (first match wins):

1. an explicit setting: ``--compilation_cache=DIR|off`` on the command line,
   ``enable(DIR | 'off')`` in Python;
2. the environment variable ``MEDFED_JAX_CACHE_DIR`` (a folder, or ``off``);
3. JAX's own setting, when the user made one (``JAX_COMPILATION_CACHE_DIR``,
   or ``JAX_ENABLE_COMPILATION_CACHE=0`` for none);
4. the default, ``$XDG_CACHE_HOME/medfed_jax/jax``, i.e.
   ``~/.cache/medfed_jax/jax`` when ``XDG_CACHE_HOME`` is unset, empty or
   relative (XDG Base Directory spec).

The command line and `medfed_jax.runner.prepare` (so ``mf.run``,
``mf.prepare`` and sweeps) call `enable`; importing medfed_jax changes nothing,
and `medfed_jax.server.build_engine` used on its own leaves JAX's settings to
the caller. Every program is cached, however short its compile
(`MIN_COMPILE_SECONDS`): a warm start reads even the small ones.

Several processes may share a folder, with one caveat. JAX (0.10) writes an
entry with a plain ``write_bytes`` (no temporary file and rename) and takes no
lock unless ``jax_compilation_cache_max_size`` is set, so a process can read an
entry that another is still writing, and a process killed mid-write leaves a
truncated entry. Neither can change a result: such an entry fails to
decompress, JAX warns and compiles afresh (a truncated entry keeps doing so
until it is deleted; deleting the folder is always safe). Entries are keyed by
the program, the JAX/XLA version, the backend and its flags, so stale entries
are never used, only kept; the folder grows until deleted.
"""

from __future__ import annotations

import logging
import os
import sys

ENV_VAR = "MEDFED_JAX_CACHE_DIR"
OFF = "off"
MIN_COMPILE_SECONDS = 0.0  # jax_persistent_cache_min_compile_time_secs (JAX's default, 1 s, skips most programs)

_configured = False  # whether `enable` ran in this process


def default_dir() -> str:
    """``$XDG_CACHE_HOME/medfed_jax/jax``, or ``~/.cache/medfed_jax/jax`` (XDG: an unset, empty or relative
    ``XDG_CACHE_HOME`` is ignored)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "medfed_jax", "jax")


def check_setting(setting: str, source: str = "--compilation_cache") -> None:
    """Refuse an empty setting with one line naming where it came from and the fix."""
    if not setting.strip():
        raise ValueError(f"{source}={setting!r} is empty: give a folder for the compilation cache, or {OFF!r}.")


def enable(setting: str | None = None) -> str | None:
    """Turn the persistent compilation cache on (in the folder chosen as in the module docstring) or off.

    ``setting``: a folder, ``'off'``, or None (environment, then JAX's own
    setting, then `default_dir`). Returns the folder in use, or None when the
    cache is off. A folder that cannot be created or written turns the cache
    off with a one-line warning instead of failing the run.
    """
    import jax  # here, so that importing this module stays light
    from jax.experimental.compilation_cache import compilation_cache

    global _configured
    _configured = True
    source = "--compilation_cache"
    if setting is None and os.environ.get(ENV_VAR):
        setting, source = os.environ[ENV_VAR], ENV_VAR
    if setting is None:  # the user's own JAX settings win over the default, untouched
        if not jax.config.jax_enable_compilation_cache:
            return None
        if jax.config.jax_compilation_cache_dir:
            return jax.config.jax_compilation_cache_dir
        setting = default_dir()
    check_setting(setting, source)
    path = None if setting.strip().lower() == OFF else os.path.abspath(os.path.expanduser(setting))
    if path is not None:
        try:
            os.makedirs(path, exist_ok=True)
            problem = None if os.access(path, os.W_OK) else "not writable"
        except OSError as e:
            problem = e.strerror
        if problem:
            print(
                f"warning: compilation cache off: cannot use {path} ({problem}); set {ENV_VAR}=DIR or off.",
                file=sys.stderr,
            )
            path = None
    if path is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir) != (path is not None, path):
        jax.config.update("jax_enable_compilation_cache", path is not None)
        jax.config.update("jax_compilation_cache_dir", path)
        _quietly(compilation_cache.reset_cache)  # JAX opens its cache once per process: make the change take effect
    return path


def _quietly(fn) -> None:
    """Call ``fn`` with JAX's compilation-cache logger at WARNING (``reset_cache`` logs at INFO, which absl shows)."""
    logger = logging.getLogger("jax._src.compilation_cache")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        fn()
    finally:
        logger.setLevel(level)


def enable_once() -> None:
    """`enable` with the default choice, unless the process already chose (the command line's flag, a user's call)."""
    if not _configured:
        enable()
