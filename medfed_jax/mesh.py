"""Devices for a run: the host device count, the client mesh, and many hosts.

A round's cohort is split over a one-axis `jax.sharding.Mesh` named
``'clients'``: each device trains its share of the clients where their data
lives (`medfed_jax.client.map_clients` under `jax.shard_map`), then the
aggregation runs on the whole ``[C, ...]`` stack, partitioned by XLA's SPMD
pass: for the means a sum over the client axis becomes local sums and an
all-reduce; for the order statistics the updates are re-split along their
coordinates first (`spread_coordinates`, an all-to-all), so that each device
sorts its own coordinates of every client. A sweep can split its experiment
axis instead, over a one-axis ``'cells'`` mesh: each device runs whole cells
(`cell_mesh`, `over_cells`; `medfed_jax.sweep.Execution`).

Settings, read before JAX's backend starts:

- ``MEDFED_JAX_DEVICES`` (or ``--devices``): ``all`` (default) or a count.
  On a CPU the host platform is split into that many devices (every core by
  default: one XLA CPU run keeps about one core busy); on a GPU or TPU the
  mesh takes the first that many devices.
- Many hosts, one process per host: ``MEDFED_JAX_COORDINATOR`` (``host:port``
  of process 0), ``MEDFED_JAX_NUM_PROCESSES`` and ``MEDFED_JAX_PROCESS_ID``;
  `initialize_distributed` passes them to `jax.distributed.initialize` (with
  Gloo collectives on CPU) and the mesh spans every process's devices.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from medfed_jax.host_devices import ENV_DEVICES, resolve_devices

AXIS = "clients"
CELL_AXIS = "cells"  # a sweep's experiment axis (`medfed_jax.sweep`, ``--sweep_devices=cells``)
ENV_DISTRIBUTED = ("MEDFED_JAX_COORDINATOR", "MEDFED_JAX_NUM_PROCESSES", "MEDFED_JAX_PROCESS_ID")

_requested: dict[str, int | None] = {"devices": None}  # the resolved setting; None = every device


def _backend_started() -> bool:
    from jax._src import xla_bridge  # noqa: PLC0415 (no public query for this)

    return xla_bridge.backends_are_initialized()


def configure_devices(value: Any = None, source: str = "--devices") -> None:
    """Set the device count: ``value`` (from ``source``), else ``$MEDFED_JAX_DEVICES``, else every device.

    On a CPU this sets the host platform's device count, which JAX reads when
    its backend starts (`medfed_jax.host_devices.resolve_devices`: a default
    leaves a count the user gave JAX or XLA); if the backend already runs with
    another count, an explicit setting is refused (one line naming the fix), a
    default is kept.
    """
    count, cpu_devices, explicit = resolve_devices(value, source)
    if not _backend_started():
        if cpu_devices is not None:
            jax.config.update("jax_num_cpu_devices", cpu_devices)
    elif explicit and jax.default_backend() == "cpu" and len(jax.local_devices()) != cpu_devices:
        shown = value if value is not None else os.environ[ENV_DEVICES]
        shown_source = source if value is not None else ENV_DEVICES
        raise ValueError(
            f"{shown_source}={shown!r}: JAX's CPU backend already started with {len(jax.local_devices())} "
            f"device(s); set {ENV_DEVICES}={shown} (or call medfed_jax.mesh.configure_devices) before anything "
            "uses JAX."
        )
    _requested["devices"] = count


def configure_default_devices() -> None:
    """`configure_devices` from the environment, at import: never raises for a started backend."""
    try:
        configure_devices()
    except ValueError as e:
        if _backend_started():
            return
        raise SystemExit(f"error: {e}") from None


def distributed_settings(environ: Mapping[str, str] = os.environ) -> tuple[str, int, int] | None:
    """(coordinator, num_processes, process_id) from the environment; None when none is set."""
    given = {name: environ[name] for name in ENV_DISTRIBUTED if environ.get(name)}
    if not given:
        return None
    missing = [name for name in ENV_DISTRIBUTED if name not in given]
    if missing:
        raise ValueError(
            f"a distributed launch needs all of {', '.join(ENV_DISTRIBUTED)}; {', '.join(missing)} "
            f"missing (set {ENV_DISTRIBUTED[0]}=host:port of process 0, the process count and this process's id)."
        )
    coordinator, num, pid = (given[name] for name in ENV_DISTRIBUTED)
    if ":" not in coordinator:
        raise ValueError(f"{ENV_DISTRIBUTED[0]}={coordinator!r} must be host:port (process 0's address).")
    if not num.isdigit() or int(num) < 1:
        raise ValueError(f"{ENV_DISTRIBUTED[1]}={num!r} must be a positive integer.")
    if not pid.isdigit() or int(pid) >= int(num):
        raise ValueError(f"{ENV_DISTRIBUTED[2]}={pid!r} must be an integer in [0, {int(num) - 1}].")
    return coordinator, int(num), int(pid)


def initialize_distributed(environ: Mapping[str, str] = os.environ) -> bool:
    """`jax.distributed.initialize` from the environment (see the module docstring); False when not set."""
    settings = distributed_settings(environ)
    if settings is None:
        return False
    coordinator, num_processes, process_id = settings
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def selected_devices() -> list:
    """The devices a run may use: every device of every process, or the first ``--devices``."""
    devices = jax.devices()
    count = _requested["devices"]
    if count is not None and jax.default_backend() != "cpu":
        if count > len(devices):
            raise ValueError(f"devices={count} but this machine has {len(devices)} {jax.default_backend()} device(s).")
        devices = devices[:count]
    return devices


def client_mesh(num_clients: int, devices: int | None = None) -> Mesh | None:
    """The ``'clients'`` mesh for a cohort of ``num_clients``; None when it would have one device.

    ``devices``: how many (default: `selected_devices`). One process uses at
    most one device per client; several processes always use every device
    (each process must hold a part of the mesh).
    """
    chosen = selected_devices()
    if devices is not None:
        if devices > len(chosen):
            raise ValueError(f"devices={devices} but only {len(chosen)} device(s) are available.")
        chosen = chosen[:devices]
    if jax.process_count() == 1:
        chosen = chosen[: max(1, min(len(chosen), num_clients))]
    return Mesh(np.asarray(chosen), (AXIS,)) if len(chosen) > 1 else None


def one_device_mesh() -> Mesh:
    """This process's first selected device as a ``'clients'`` mesh: a program that runs on one device."""
    return Mesh(np.asarray(local_devices()[:1]), (AXIS,))


def local_devices() -> list:
    """The selected devices this process holds (`selected_devices`)."""
    return [d for d in selected_devices() if d.process_index == jax.process_index()]


def cell_mesh(devices: int | None = None) -> Mesh:
    """The ``'cells'`` mesh a sweep's chunks are split over: this process's first ``devices`` (default: all)."""
    chosen = local_devices()
    return Mesh(np.asarray(chosen[: devices or len(chosen)]), (CELL_AXIS,))


def over_cells(fn: Callable, mesh: Mesh, in_axes: tuple) -> Callable:
    """``fn`` (batched over a leading cell axis; ``in_axes`` as `jax.vmap`'s: 0 batched, None shared) jitted with
    that axis split over ``mesh``: each device runs ``fn`` on its own block of cells (`jax.shard_map`, no
    collectives), shared arguments replicated, outputs split along the cell axis. The cell count must be a
    multiple of ``mesh.size``. (`jax.jit` with these shardings alone, leaving the split to XLA's partitioner,
    ran as fast on 2 host devices; `jax.shard_map` guarantees that no cell's work crosses devices.)"""
    specs = jax.tree.map(
        lambda axis: PartitionSpec(CELL_AXIS) if axis == 0 else PartitionSpec(), in_axes, is_leaf=lambda a: a is None
    )
    shardings = jax.tree.map(
        lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda a: isinstance(a, PartitionSpec)
    )
    split = PartitionSpec(CELL_AXIS)
    sharded = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=split, check_vma=False)
    return jax.jit(sharded, in_shardings=shardings, out_shardings=NamedSharding(mesh, split))


def spread_coordinates(updates: Any, mesh: Mesh | None) -> Any:
    """Re-split client-split updates ``[C, ...]`` along a coordinate axis instead (an all-to-all).

    For the order statistics (median, trimmed mean, Krum, Bulyan, ...): each
    device then sorts, or sums distances over, its own slice of the coordinates
    of every client, and the results equal one device's bit for bit. It costs
    moving ``(D - 1) / D`` of the ``C x P`` updates once per round; the means
    skip it (their sum over clients is local sums plus an all-reduce of ``P``).
    Each leaf is split along its largest trailing axis that the device count
    divides, or replicated (all-gathered) when none does.
    """
    if mesh is None:
        return updates

    def constrain(leaf):
        axes = [a for a in range(1, leaf.ndim) if leaf.shape[a] % mesh.size == 0]
        spec = [None] * leaf.ndim
        if axes:
            spec[max(axes, key=lambda a: leaf.shape[a])] = AXIS
        return jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, PartitionSpec(*spec)))

    return jax.tree.map(constrain, updates)


def replicated(mesh: Mesh | None) -> NamedSharding | None:
    """Every device holds the whole value."""
    return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def gather(tree: Any, mesh: Mesh | None) -> Any:
    """``tree`` whole on every device (an all-gather where it is split), so what follows runs as on one."""
    return tree if mesh is None else jax.lax.with_sharding_constraint(tree, replicated(mesh))


def put(tree: Any, mesh: Mesh | None, shard_clients: bool = False) -> Any:
    """Host arrays as global arrays on ``mesh``: split along the leading client axis, or replicated.

    The client axis is split only when ``shard_clients`` and its length divides
    the mesh; every process passes the same host values and keeps its part.
    """
    if mesh is None:
        return jax.device_put(tree)

    def place(leaf):
        leaf = np.asarray(leaf)
        split = shard_clients and leaf.ndim > 0 and leaf.shape[0] % mesh.size == 0
        sharding = NamedSharding(mesh, PartitionSpec(AXIS) if split else PartitionSpec())
        return jax.make_array_from_callback(leaf.shape, sharding, lambda index: leaf[index])

    return jax.tree.map(place, tree)


def is_writer() -> bool:
    """Whether this process writes files (process 0 of a distributed run; the only process otherwise)."""
    return jax.process_index() == 0
