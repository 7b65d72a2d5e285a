"""How many JAX devices a CPU host is split into, decided before JAX is imported.

Kept free of JAX so that ``import medfed_jax`` can set the default cheaply:
`default_before_jax` writes ``JAX_NUM_CPU_DEVICES`` (JAX reads it when its CPU
backend starts) from ``MEDFED_JAX_DEVICES`` (``all`` = every core, the
default). Once JAX is imported, `medfed_jax.mesh.configure_devices` does the
same through ``jax.config`` and refuses a late explicit change.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any

ENV_DEVICES = "MEDFED_JAX_DEVICES"
JAX_ENV_DEVICES = "JAX_NUM_CPU_DEVICES"  # JAX's own variable for its `jax_num_cpu_devices` option
XLA_DEVICE_FLAG = "--xla_force_host_platform_device_count"  # XLA's own way to set the same count


def host_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parse_devices(value: Any, source: str) -> int | None:
    """``'all'`` -> None, a positive integer -> itself; anything else is one clear error."""
    text = str(value).strip().lower()
    if text == "all":
        return None
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"{source}={value!r} must be 'all' or a positive integer (the number of devices to use).")


def resolve_devices(
    value: Any = None, source: str = "--devices", environ: Mapping[str, str] = os.environ
) -> tuple[int | None, int | None, bool]:
    """``(count, cpu_devices, explicit)`` for ``value`` (from ``source``), else ``$MEDFED_JAX_DEVICES``, else all.

    ``count``: the devices asked for (None = every device); ``cpu_devices``:
    the host device count to set on a CPU, None when a default yields to a
    count the user gave JAX or XLA (``JAX_NUM_CPU_DEVICES``, ``XLA_FLAGS``);
    ``explicit``: whether a value or ``MEDFED_JAX_DEVICES`` was given. A
    malformed value is one clear error (`parse_devices`).
    """
    explicit = value is not None or ENV_DEVICES in environ
    if value is None:
        value, source = environ.get(ENV_DEVICES, "all"), ENV_DEVICES
    count = parse_devices(value, source)
    user_set = JAX_ENV_DEVICES in environ or XLA_DEVICE_FLAG in environ.get("XLA_FLAGS", "")
    return count, (count or host_cores()) if explicit or not user_set else None, explicit


def default_before_jax(environ: MutableMapping[str, str] = os.environ) -> None:
    """Set ``JAX_NUM_CPU_DEVICES`` as `resolve_devices` says (every core by default) if JAX is not loaded yet.

    A malformed value is left for `medfed_jax.mesh.configure_devices` to refuse
    in one line. If JAX is already imported (costing nothing more here), this
    is `medfed_jax.mesh.configure_default_devices`, which applies while JAX's
    backend has not started.
    """
    if "jax" in sys.modules:
        from medfed_jax import mesh  # noqa: PLC0415 (JAX is loaded already)

        mesh.configure_default_devices()
        return
    try:
        _, cpu_devices, _ = resolve_devices(environ=environ)
    except ValueError:
        return
    if cpu_devices is not None:
        environ[JAX_ENV_DEVICES] = str(cpu_devices)


def quiet_backend_probe() -> None:
    """Hide JAX's INFO line for every backend it cannot start ("Unable to initialize backend 'tpu'").

    Called by the command-line programs (`medfed_jax.cli`, `.report`, `.audit`) before they use JAX.
    """
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
