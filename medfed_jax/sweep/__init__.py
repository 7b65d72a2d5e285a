"""What-if sweeps: many runs as few compiled programs, with tidy results and resume.

A config declares its sweep in ``cfg.sweep``:

- ``grid``: knob -> list of values, nested like the config
  (``{'seed': (0, 1, 2), 'local': {'lr': (0.01, 0.1)}}``); the cells are the
  outer product (knobs in sorted order, the last one varying fastest);
- ``cells``: a list of dicts of dotted knobs (``{'attack.name': 'none'}``),
  each one cell; with a ``grid`` too, every listed cell is crossed with it;
- ``numeric`` (optional): knobs that must ride the vmapped experiment axis; a
  structural knob listed here is refused (a guard for sweeps meant to compile once);
- ``chunk_size``: cells per vmapped call, 0 = automatic;
- ``switch`` (optional): the switched knobs (below); unset = every switchable
  knob the sweep varies, ``()`` = compile one program per value instead.

A knob is a config field (``'local.lr'``), ``'seed'`` (the run seed: training and split) or
``'method'`` (`medfed_jax.runner.METHODS`: ``'federated'``, the default, the
baselines ``'local_only'`` and ``'pooled'``, and the personalised methods).
`variant_cells` turns whole configs into cells (e.g. one per dataset).

**Numeric knobs** (traced into the program; sweeping them never recompiles):
``seed`` and `medfed_jax.config.numeric_fields`: ``local.lr``,
``local.momentum``, ``local.prox_mu``, ``server.lr``/``momentum``/``b1``/``b2``/
``eps``, ``aggregator.nu``/``tau``/``clip_tau``, ``attack.fraction`` (the
malicious mask is drawn inside the program) and the attack strengths
(``scale``, ``eps``, ``z``, ``sigma``, ``gamma``), ``privacy.noise_multiplier``,
``clip_norm`` and the adaptive-clipping rates, ``personalization.ditto_lambda``
and ``alpha``. The cells of one structural combination run as ``vmap`` of the
whole multi-round program over a leading experiment axis, in chunks of
``chunk_size`` cells; each cell's result equals the cell run alone (bitwise on
a CPU in `tests/test_sweep.py`).

**Structural knobs** (everything else) change shapes or code: ``method``,
``aggregator.name``/``f``/``pre``, ``attack.name``, ``privacy.mode``, the
model, every ``data.*`` field (dataset, client count, partition, its seed),
``local.epochs``/``steps``/``batch_size``/``optimizer`` (loop lengths and batch
shapes), ``rounds``, ``eval_every``, ``cohort_size``. Each combination compiles
one program, reused for all its numeric cells.

**Switched knobs** (``aggregator.name``, ``attack.name``) change code but not
shapes: a sweep over several of them compiles every choice into one program as
`jax.lax.switch` branches (`medfed_jax.server.build_engine`) and passes the
choice as an int32 index that is *shared* by the cells of a chunk (not
vmapped), so only the chosen branch runs. The 6 x 6 aggregator x attack matrix
is then one compile instead of 36. Chunks never mix choices.

Programs compile in order on a background thread. How chunks use the devices
is an `Execution` (``--sweep_devices``, `execution`):

- ``cells``: each chunk's cells split over the local devices, each cell whole
  on one device (`medfed_jax.mesh.over_cells`: `jax.shard_map` over a
  ``'cells'`` mesh); a chunk is padded to a multiple of the device count with
  copies of its last cell, computed and dropped, and the automatic chunk size
  is per device;
- ``threads``: every program on one device, one chunk per core at once on a
  CPU (one XLA run keeps about one core busy), one at a time elsewhere;
- ``clients``: one chunk at a time, each cell's cohort split over the devices
  (the client mesh, `medfed_jax.mesh`).

A sweep runs in one process. The default is ``cells`` on several GPUs or
TPUs, ``threads`` on one device and on a CPU: there the host devices
share the same cores, and on the 2-core CPU a 60-cell robustness sub-matrix
ran as fast either way (``threads / cells`` 0.95 and 1.06, medians of
interleaved passes in two runs, `benchmarks/RESULTS.md`), while threads pad
no cells and give the one-device results bit for bit. Each mode runs the same program per cell, but a program split over
several devices is compiled anew and XLA may round its float32 sums
differently (a few ulps; equal to 1e-5 in `tests/test_sharding.py`), so chunk
files are named by the mode and device count (`Execution.layout`): a sweep
resumed in another mode recomputes its chunks. On a CPU, vmapping does not
speed up the cells themselves much: a sweep wins by compiling once and by
filling every core (`benchmarks/sweep_results.md`).

**Seeds and splits**: a cell's ``seed`` is its training seed and, unless
``data.seed`` pins the data (`medfed_jax.data.resolve_seed`), also its
partition and train/test split: cells of one program that differ in seed get
their own splits, stacked on the experiment axis (`PreparedProgram`), still
one compile. Summaries over seeds are then over splits x training seeds.

Results (workdir), tidy (`medfed_jax.sweep.tables`): ``results.csv``, one row
per cell x evaluation (every knob a column, then ``round``, for private runs
``epsilon`` (the run's relation, named in ``sweep.json``'s privacy note) and
``epsilon_replace_one``, then the scalar metrics); ``clients.csv``, one row per
cell x evaluation x client x per-client metric (``cell``, the knobs,
``round``, ``client``, ``metric``, ``value``; under DP-SGD each client's own
``epsilon`` too); ``summary.csv`` and ``clients_summary.csv``, the same over
seeds (mean, sample std (ddof 1), t-based 95% confidence half-width, n). While
the sweep runs, each chunk's rows are appended to ``results.csv`` and
``clients.csv`` and the summaries are refreshed every `SUMMARY_EVERY_S`
seconds; at the end all four are written atomically in cell order
(`TableFiles`). Each chunk's histories are kept in ``chunks/<hash>.json`` (a
hash of the chunk's cells), so a sweep killed at any point and started again
recomputes only the missing chunks and ends with byte-identical CSVs.

Before compiling, a sweep logs its cells, compiled programs, cell-rounds and
an estimated cost (`SweepCost`, from nominal rates); a sweep above
`MAX_CELLS` cells or `MAX_PROGRAMS` programs is refused unless
``allow_large`` (``--allow_large_sweep``). Progress lines give the rate after
compiling and an ETA from the measured chunk times.

The package, one module per job (each name below is re-exported here):

- `medfed_jax.sweep.plan`: the grid mini-language -> `Plan` (cells, `ProgramSpec` per structural
  combination, switches), `with_overrides`, `variant_cells`, `label_knobs`;
- `medfed_jax.sweep.prepare`: data, validation of every cell, knobs and epsilons -> `PreparedSweep`;
- `medfed_jax.sweep.devices`: the `Execution` modes (``--sweep_devices``);
- `medfed_jax.sweep.execute`: compiled programs (`ProgramCache`), chunks, workers, chunk files, `run_prepared`;
- `medfed_jax.sweep.progress`: the cost estimate, the size refusal, progress lines and ETA;
- `medfed_jax.sweep.tables`: result rows, summaries over seeds (`mean_std_ci`), `results.csv` / `summary.csv`.
"""

from medfed_jax.sweep.devices import (
    CPU_DEFAULT,
    MAX_CPU_WORKERS,
    SWEEP_DEVICES,
    Execution,
    allowed_sweep_devices,
    default_sweep_devices,
    execution,
    place_program_data,
)
from medfed_jax.sweep.execute import (
    AUTO_CHUNK,
    AUTO_CHUNK_DEFAULT,
    CHUNK_DIR,
    PROGRAMS,
    Chunk,
    ProgramCache,
    SweepResult,
    chunk_bounds,
    chunk_key,
    effective_chunk_size,
    load_chunk,
    run_chunk,
    run_prepared,
    run_sweep,
    save_chunk,
    shared_batch,
    vmapped_program,
)
from medfed_jax.sweep.plan import (
    SPECIAL_KNOBS,
    SWEEP_FIELDS,
    Cell,
    Plan,
    ProgramSpec,
    flatten,
    format_value,
    is_sweep,
    label_knobs,
    numeric_knobs,
    plan_sweep,
    variant_cells,
    with_overrides,
)
from medfed_jax.sweep.prepare import PRIVACY_COLUMNS, PreparedProgram, PreparedSweep, prepare_program, prepare_sweep
from medfed_jax.sweep.progress import (
    MAX_CELLS,
    MAX_PROGRAMS,
    NOMINAL_CELL_ROUNDS_PER_S,
    NOMINAL_COMPILE_S,
    Progress,
    SweepCost,
    check_size,
    sweep_cost,
)
from medfed_jax.sweep.tables import (
    CLIENT_COLUMNS,
    FILES,
    SUMMARY_EVERY_S,
    TableFiles,
    Tables,
    cell_rows,
    client_rows,
    client_summary_over_seeds,
    client_summary_rows,
    format_float,
    mean_std_ci,
    parse_client_values,
    parse_metrics,
    result_rows,
    summary_keys,
    summary_over_seeds,
    summary_rows,
)

__all__ = [
    "AUTO_CHUNK",
    "AUTO_CHUNK_DEFAULT",
    "CHUNK_DIR",
    "CLIENT_COLUMNS",
    "CPU_DEFAULT",
    "Cell",
    "Chunk",
    "Execution",
    "FILES",
    "MAX_CELLS",
    "MAX_CPU_WORKERS",
    "MAX_PROGRAMS",
    "NOMINAL_CELL_ROUNDS_PER_S",
    "NOMINAL_COMPILE_S",
    "PRIVACY_COLUMNS",
    "PROGRAMS",
    "Plan",
    "PreparedProgram",
    "PreparedSweep",
    "ProgramCache",
    "ProgramSpec",
    "Progress",
    "SPECIAL_KNOBS",
    "SUMMARY_EVERY_S",
    "SWEEP_DEVICES",
    "SWEEP_FIELDS",
    "SweepCost",
    "SweepResult",
    "TableFiles",
    "Tables",
    "allowed_sweep_devices",
    "cell_rows",
    "check_size",
    "chunk_bounds",
    "chunk_key",
    "client_summary_over_seeds",
    "client_rows",
    "client_summary_rows",
    "default_sweep_devices",
    "effective_chunk_size",
    "execution",
    "flatten",
    "format_float",
    "format_value",
    "is_sweep",
    "label_knobs",
    "load_chunk",
    "mean_std_ci",
    "numeric_knobs",
    "parse_client_values",
    "parse_metrics",
    "place_program_data",
    "plan_sweep",
    "prepare_program",
    "prepare_sweep",
    "result_rows",
    "run_chunk",
    "run_prepared",
    "run_sweep",
    "save_chunk",
    "shared_batch",
    "summary_keys",
    "summary_over_seeds",
    "summary_rows",
    "sweep_cost",
    "variant_cells",
    "vmapped_program",
    "with_overrides",
]
