"""How a sweep's chunks use the devices: the `Execution` modes (``--sweep_devices``) and where data goes.

``cells`` splits each chunk's cells over the local devices (each cell whole
on one), ``threads`` runs one chunk per core on one device (a CPU's default),
``clients`` splits each cell's cohort over the devices; `execution` picks and
checks the mode (one line naming the fix), `place_program_data` puts a
program's data where it runs.
"""

from __future__ import annotations

import dataclasses
import os

import jax

from medfed_jax import mesh as mesh_lib
from medfed_jax import runner
from medfed_jax.server import Engine
from medfed_jax.types import ClientData, FederatedDataset

MAX_CPU_WORKERS = 8  # each running chunk holds its own buffers: bound the memory on big hosts
SWEEP_DEVICES = ("cells", "threads", "clients")  # how a sweep's chunks use the devices (`Execution`)
CPU_DEFAULT = "threads"  # measured on the host devices: see the module docstring


@dataclasses.dataclass(frozen=True)
class Execution:
    """How a sweep's chunks use the devices (``--sweep_devices``; `execution` picks and checks it).

    - ``cells``: one chunk at a time, its cells split over ``devices`` devices
      (`medfed_jax.mesh.over_cells`), each cell whole on one device; a chunk is
      padded to a multiple of ``devices`` with copies of its last cell, whose
      results are dropped; `effective_chunk_size` is per device;
    - ``threads``: every program on one device, ``workers`` chunks at once
      (one per core on a CPU, where one XLA run keeps about one core busy);
    - ``clients``: one chunk at a time, each cell's cohort split over the
      devices (the client mesh of `medfed_jax.mesh`).
    """

    mode: str
    devices: int

    @property
    def workers(self) -> int:
        """Chunks run at once."""
        if self.mode == "threads" and jax.default_backend() == "cpu":
            return min(MAX_CPU_WORKERS, os.cpu_count() or 1)
        return 1

    def program_mesh(self) -> jax.sharding.Mesh | None:
        """The mesh each program is built on: one device, or the default client mesh (None) in ``clients``."""
        return None if self.mode == "clients" else mesh_lib.one_device_mesh()

    def cell_mesh(self) -> jax.sharding.Mesh | None:
        """The ``'cells'`` mesh a chunk is split over, in ``cells`` mode."""
        return mesh_lib.cell_mesh(self.devices) if self.mode == "cells" else None

    def padded(self, batch: int) -> int:
        """Cells a chunk of ``batch`` runs as: a multiple of `split`."""
        return -(-batch // self.split) * self.split

    @property
    def split(self) -> int:
        """Devices a chunk's cells are split over: the device count in ``cells`` mode, else 1."""
        return self.devices if self.mode == "cells" else 1

    @property
    def parallel(self) -> int:
        """One-device chunks' worth of cells running at once: ``workers``, or the device count in ``cells``."""
        return self.split * self.workers

    @property
    def layout(self) -> tuple:
        """What a chunk's results depend on besides its cells: () on one device (``threads``), else the mode and
        device count (another device split compiles another program, which may round differently)."""
        return () if self.mode == "threads" else (self.mode, self.devices)

    def describe(self) -> str:
        if self.mode == "cells":
            return f"cells split over {self.devices} {jax.default_backend()} devices"
        if self.mode == "clients":
            return f"each cohort split over {self.devices} {jax.default_backend()} device(s)"
        return f"{self.workers} chunk(s) at once on one {jax.default_backend()} device"


def place_program_data(run_on: Execution, engine: Engine, view: FederatedDataset) -> tuple[ClientData, ClientData]:
    """A program's train and test data where it runs: on every device of the cell mesh, else on the engine's."""
    cells = run_on.cell_mesh()
    if cells is None:
        return runner.place_data(engine, view)
    return tuple(type(d)(*mesh_lib.put(tuple(d), cells)) for d in (view.train, view.test))


def default_sweep_devices(devices: int) -> str:
    """The mode when none is asked for: on several devices ``cells`` (``CPU_DEFAULT`` on a CPU's host devices),
    else ``threads``."""
    if devices > 1:
        return CPU_DEFAULT if jax.default_backend() == "cpu" else "cells"
    return "threads"


def execution(mode: str | None = None) -> Execution:
    """The `Execution` for ``mode`` (one of `SWEEP_DEVICES`; None: `default_sweep_devices`), checked.

    Raises ValueError (one line, naming the fix) for an unknown mode,
    ``cells`` or ``clients`` on one device, or a launch of several processes
    (a sweep runs in one: its chunk files and tables are not shared out).
    """
    if jax.process_count() > 1:
        raise ValueError(
            f"a sweep runs in one process, but this launch has {jax.process_count()} (MEDFED_JAX_NUM_PROCESSES); "
            "run it on one host without the MEDFED_JAX_COORDINATOR/NUM_PROCESSES/PROCESS_ID variables."
        )
    devices = len(mesh_lib.local_devices())
    if mode is None:
        return Execution(default_sweep_devices(devices), devices)
    where = f"--sweep_devices={mode!r}"
    if mode not in SWEEP_DEVICES:
        raise ValueError(f"{where} is unknown: choose one of {', '.join(SWEEP_DEVICES)} (or leave it unset).")
    if mode != "threads" and devices < 2:
        raise ValueError(
            f"{where} splits work over several devices, but this process has 1 {jax.default_backend()} device; "
            "use --sweep_devices=threads, or give it more (--devices=N or MEDFED_JAX_DEVICES=N on a CPU)."
        )
    return Execution(mode, devices)


def allowed_sweep_devices() -> tuple[str, ...]:
    """The `SWEEP_DEVICES` modes `execution` accepts on this machine, the default first."""
    allowed = []
    for mode in SWEEP_DEVICES:
        try:
            execution(mode)
        except ValueError:
            continue
        allowed.append(mode)
    default = execution().mode
    return (default, *(m for m in allowed if m != default))
