"""Command line: ``python -m medfed_jax --config=<name or file.py> --workdir=<dir>``.

``--config`` names a shipped config (``heart_fedavg``; ``--help`` lists them)
or a config file; ``--config.<field>=<value>`` overrides any field
(``--config.rounds=50``), ``--help`` lists every field with its default and
meaning, ``--help=<section>`` one section. A config with a non-empty ``sweep``
runs as a sweep (`medfed_jax.sweep`): ``results.csv``, ``clients.csv``,
``summary.csv``, ``clients_summary.csv``, ``sweep.json`` and per-chunk results in the workdir, resumed after a crash by
running the same command again; ``--seeds=N`` adds a seed axis. Otherwise it
is one run per method: with ``--seeds=N`` every method runs N seeds as one
compiled program each and the run ends with a mean +- std table. The workdir
receives ``config.json``, ``history.csv`` and ``summary.json`` (atomic
writes), and a run killed midway resumes from its checkpoints when started
again with the same command.

Everything is checked before anything is written or compiled: a refused
command prints one ``error: ...`` line on stderr and exits with status 2
(``--debug`` shows the traceback). The workdir is the user's: a workdir
holding a different config is refused unless ``--overwrite``, which removes
only the files medfed_jax writes there (`WORKDIR_FILES`).

Every method
trains exactly ``rounds`` rounds, evaluated every ``eval_every`` rounds and at
the last (`medfed_jax.program.eval_rounds`), in chunks: a line for the compile,
then a progress line per evaluation (rounds/s after compiling, ETA). With
``--seeds=N`` every method runs N seeds vmapped, chunk by chunk the same way,
and the run ends with a mean +- sample std table (over the seeds whose model
did not diverge; a diverged model reads ``diverged``). Each seed trains on its
own partition and train/test split unless ``data.seed`` pins one. The workdir receives
``config.json``, ``history.csv`` (with ``elapsed_s`` and ``diverged``
columns) and ``summary.json`` (atomic writes); a workdir that holds a
different config is refused unless ``--overwrite``, and a run killed midway
resumes from its checkpoints when started again with the same command.
"""

from __future__ import annotations

import atexit
import dataclasses
import fnmatch
import gc
import json
import os
import sys
from typing import Any

import numpy as np
from absl import app, flags

from medfed_jax import client_results, compilation_cache, config_files, host_devices, report, runner, sweep, tabular
from medfed_jax import config as config_lib
from medfed_jax import mesh as mesh_lib
from medfed_jax.eval import pooled_score

_CONFIG = flags.DEFINE_string(
    "config", None, "A shipped config name (e.g. heart_fedavg) or a config file path (e.g. configs/heart_fedavg.py)."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, checkpoints and the resolved config.")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Start afresh: remove medfed_jax's own files from the workdir (never others) first."
)
_SEEDS = flags.DEFINE_integer("seeds", 1, "Seeds per method; > 1 runs them vmapped and reports mean +- std.")
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    None,
    f"Folder of the persistent compilation cache, or 'off' (default: ${compilation_cache.ENV_VAR}, else "
    "~/.cache/medfed_jax/jax); see medfed_jax.compilation_cache.",
)
_DEVICES = flags.DEFINE_string(
    "devices", None, "Devices to split each cohort over: 'all' or a count (default: $MEDFED_JAX_DEVICES, else all)."
)
_SWEEP_DEVICES = flags.DEFINE_string(
    "sweep_devices",
    None,
    f"How a sweep's chunks use the devices: {', '.join(sweep.SWEEP_DEVICES)} (default: cells on several GPUs or "
    f"TPUs, {sweep.CPU_DEFAULT} on a CPU; see medfed_jax.sweep.Execution).",
)
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of a refused command instead of one error line.")
_ALLOW_LARGE = flags.DEFINE_bool(
    "allow_large_sweep",
    False,
    f"Run a sweep above {sweep.MAX_CELLS} cells or {sweep.MAX_PROGRAMS} compiled programs (refused otherwise).",
)

USAGE = (
    "python -m medfed_jax --config=<name or file.py> [--workdir=DIR] [--seeds=N] [--overwrite] [--debug]\n"
    "                     [--devices=all|N] [--sweep_devices=cells|threads|clients]\n"
    "                     [--config.<field>=<value> ...]\n"
    "       python -m medfed_jax --help[=<section>]   (every config field, or one section's)"
)
HELP_FLAGS = ("--help", "-help", "-h", "-?")
# Everything medfed_jax writes into a workdir (patterns relative to it); --overwrite removes these, nothing else.
WORKDIR_FILES = (
    *("config.json", "history.csv", "summary.json", "checkpoint_*.npz"),  # a run
    *("sweep.json", *sweep.FILES, f"{sweep.CHUNK_DIR}/*.json"),  # a sweep (clients.csv: a run's too)
    *("final.csv", "report.md", *(figure[0] for figure in report.FIGURES)),  # its report (medfed_jax.report)
)
MAX_TABLE_WIDTH = 160  # wider final tables show quartiles of the clients instead of every client


@dataclasses.dataclass(frozen=True)
class Command:
    """A parsed command line."""

    config: str | None
    overrides: tuple[tuple[str, str], ...]
    workdir: str | None
    overwrite: bool
    seeds: int
    debug: bool
    compilation_cache: str | None  # --compilation_cache: a folder, 'off', or None (medfed_jax.compilation_cache)
    extra_args: tuple[str, ...]  # positional arguments (refused)
    allow_large_sweep: bool = False
    devices: str | None = None  # --devices (`medfed_jax.mesh.configure_devices`)
    sweep_devices: str | None = None  # --sweep_devices (`medfed_jax.sweep.execution`)


def help_text(section: str | None = None) -> str:
    """``--help``: usage, flags, shipped configs and every config field (or one section)."""
    if section is not None:
        return config_files.describe_fields(section)
    module_flags = flags.FLAGS.get_flags_for_module(sys.modules[__name__])
    flag_lines = [f"  --{f.name}: {f.help}" for f in sorted(module_flags, key=lambda f: f.name)]
    return "\n".join(
        [
            f"usage: {USAGE}",
            "",
            "flags:",
            *flag_lines,
            "  --helpfull: absl's own flags too",
            "",
            f"shipped configs (--config=<name>): {', '.join(config_files.shipped_names())}",
            "",
            "config fields (--config.<field>=<value>; defaults of medfed_jax.config.default_config(), "
            "which configs change):",
            "",
            config_files.describe_fields(),
        ]
    )


def parse_command_line(argv: list[str]) -> Command:
    """Split ``--config.<field>=<value>`` overrides from absl's flags; ``--help[=<section>]`` prints and exits 0.

    Raises ValueError (a one-line message) for a malformed command line.
    """
    overrides, rest = [], [argv[0]]
    for arg in argv[1:]:
        name, sep, value = arg.partition("=")
        if name in HELP_FLAGS:
            print(help_text(value if sep else None))
            sys.exit(0)
        if name.startswith(("--config.", "-config.")):
            if not sep:
                raise ValueError(f"{arg}: give the value with '=', e.g. {name}=<value>.")
            overrides.append((name.split(".", 1)[1], value))
        else:
            rest.append(arg)
    flags.FLAGS.unparse_flags()
    try:
        positional = flags.FLAGS(rest)
    except flags.Error as error:
        raise ValueError(f"{error}. Usage: {USAGE.splitlines()[0]}") from None
    return Command(
        config=_CONFIG.value,
        overrides=tuple(overrides),
        workdir=_WORKDIR.value,
        overwrite=_OVERWRITE.value,
        seeds=_SEEDS.value,
        debug=_DEBUG.value,
        compilation_cache=_COMPILATION_CACHE.value,
        extra_args=tuple(positional[1:]),
        allow_large_sweep=_ALLOW_LARGE.value,
        devices=_DEVICES.value,
        sweep_devices=_SWEEP_DEVICES.value,
    )


def command_config(command: Command) -> Any:
    """The config a command asks for: loaded by name or path, overrides applied, seeds checked."""
    if command.extra_args:
        raise ValueError(f"unexpected arguments {list(command.extra_args)}; flags look like --name=value.")
    if not command.config:
        raise ValueError(
            f"--config is required: a shipped config ({', '.join(config_files.shipped_names())}) or a .py file."
        )
    cfg = config_files.load_config(command.config)
    for path, text in command.overrides:
        config_files.apply_override(cfg, path, text)
    if command.seeds < 1:
        raise ValueError(f"--seeds={command.seeds} must be >= 1 (1 = one seed per method).")
    last = cfg.seed + command.seeds - 1
    if last > config_lib.SEED_MAX:
        raise ValueError(
            f"--seeds={command.seeds} from seed={cfg.seed} reaches seed {last}, beyond 2**32 - 1; "
            "lower --seeds or --config.seed."
        )
    return cfg


def _own(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in WORKDIR_FILES)


def own_files(workdir: str) -> list[str]:
    """Paths (relative to ``workdir``) of the files medfed_jax wrote there, and of their stale temporaries.

    A temporary (``<file>.tmp<pid>``, `tabular.TEMPORARY`) of this very process is not stale and is left out.
    """
    found = []
    for folder in ("", sweep.CHUNK_DIR):
        directory = os.path.join(workdir, folder)
        if not os.path.isdir(directory):
            continue
        for name in sorted(os.listdir(directory)):
            rel = os.path.join(folder, name) if folder else name
            if not os.path.isfile(os.path.join(workdir, rel)):
                continue
            temporary = tabular.TEMPORARY.match(rel)
            if _own(rel) or (temporary and _own(temporary["target"]) and int(temporary["pid"]) != os.getpid()):
                found.append(rel)
    return found


def prepare_workdir(workdir: str, cfg: Any, overwrite: bool, extra: dict | None = None) -> None:
    """Create the workdir, or check that it holds this config (a different one is refused unless ``overwrite``).

    Call it once the config is validated. ``overwrite`` first removes every
    file medfed_jax wrote there (`own_files`), never another file; otherwise
    only the stale temporaries of an interrupted write go.
    """
    text = (
        config_lib.to_json(cfg)
        if not extra
        else json.dumps({"config": json.loads(config_lib.to_json(cfg)), **extra}, sort_keys=True, indent=2)
    )
    path = os.path.join(workdir, "config.json")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ValueError(f"--workdir={workdir} is a file, not a directory; give a directory.")
    if not overwrite and os.path.isfile(path):
        with open(path, errors="replace") as f:
            if f.read() != text:
                raise ValueError(
                    f"{workdir} holds results of a different config ({path}). Use another --workdir, or pass "
                    "--overwrite to replace them (only the files medfed_jax wrote there are removed)."
                )
    for rel in own_files(workdir) if os.path.isdir(workdir) else []:
        if overwrite or tabular.TEMPORARY.match(rel):
            os.remove(os.path.join(workdir, rel))
    chunks = os.path.join(workdir, sweep.CHUNK_DIR)
    if overwrite and os.path.isdir(chunks) and not os.listdir(chunks):
        os.rmdir(chunks)
    os.makedirs(workdir, exist_ok=True)
    tabular.write_text_atomic(path, text)


def finite_mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and sample std (ddof 1, `medfed_jax.sweep.mean_std_ci`) of the finite ``values``: (NaN, NaN)
    when none, std NaN for one."""
    values = np.asarray(values, np.float64).reshape(-1, 1)
    mean, std, _ = sweep.mean_std_ci(np.nan_to_num(values), np.isfinite(values))
    return float(mean[0]), float(std[0])


def final_accuracy_table(
    finals: dict[str, dict[str, np.ndarray]], client_names: tuple[str, ...], max_width: int = MAX_TABLE_WIDTH
) -> str:
    """Methods x (each client's own test split, their mean and worst, all clients' test rows) in %, and the
    ROC AUC on those rows; mean +- sample std (ddof 1) over seeds. "pooled test" is each method's own pooled
    score (`medfed_jax.eval.pooled_score`): the global model's, local-only's mean client model's, a
    personalised method's own-client one.

    A diverged model (`medfed_jax.eval`) is not scored: a cell shows the mean
    +- std over the seeds whose value is finite, ``diverged`` when none is, and
    the method column counts the diverged seeds. A table wider than
    ``max_width`` characters shows the clients' quartiles and best instead of
    every client (each client stays in history.csv and summary.json).
    """

    def cell(values: np.ndarray, diverged: np.ndarray, scale: float = 100, digits: int = 1) -> str:
        values = np.asarray(values, np.float64)
        kept = values[~np.asarray(diverged, bool)]
        if kept.size == 0:
            return "diverged"
        mean, std = finite_mean_std(kept)
        if kept.size > 1:
            return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"
        return f"{scale * mean:.{digits}f}"

    def finite_cell(values: np.ndarray) -> str:
        return cell(values, np.isnan(values))

    def table(client_columns: dict[str, Any]) -> str:
        rows = []
        for method, final in finals.items():
            per_client = np.asarray(final["client_accuracy"]).reshape(-1, len(client_names))
            score = pooled_score(final)
            seed_diverged = np.asarray(final["diverged"]).reshape(-1) > 0
            diverged_note = f" ({seed_diverged.sum()}/{seed_diverged.size} diverged)" if seed_diverged.any() else ""
            rows.append(
                [
                    method + diverged_note,
                    *(finite_cell(column(per_client)) for column in client_columns.values()),
                    finite_cell(per_client.mean(1)),
                    finite_cell(per_client.min(1)),
                    cell(final[f"{score}_accuracy"], seed_diverged),
                    cell(final[f"{score}_auc"], seed_diverged, scale=1, digits=3),
                ]
            )
        header = ["method", *client_columns, "mean of clients", "worst client", "pooled test", "pooled AUC"]
        return tabular.markdown_table(header, rows)

    every = table({name: (lambda a, c=c: a[:, c]) for c, name in enumerate(client_names)})
    if max(map(len, every.splitlines())) <= max_width:
        return every
    quartiles = {f"client {q}%": (lambda a, q=q: np.percentile(a, q, axis=1)) for q in (25, 50, 75)}
    folded = table({**quartiles, "best client": lambda a: a.max(1)})
    where = "clients.csv" if client_results.summarised(len(client_names)) else "history.csv"
    return (
        f"{folded}\n\n({len(client_names)} clients: their quartiles and best are shown; every client's "
        f"accuracy is in {where} and summary.json)"
    )


def final_metrics(metrics: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What `final_accuracy_table` and `final_summary` read of a method's last evaluation: its score on all test
    rows (`medfed_jax.eval.pooled_score`: accuracy and AUC), the client accuracies, ``diverged``."""
    score = pooled_score(metrics)
    return {k: metrics[k] for k in (f"{score}_accuracy", f"{score}_auc", "client_accuracy", "diverged")}


def _run_methods(prepared: runner.Prepared, workdir: str | None, seeds: list[int], seed_axis: bool) -> dict:
    """Every method of the run in evaluation chunks (progress lines, checkpoints in the workdir), then `_finish`."""
    rows, finals = [], {}
    for method in runner.methods_of(prepared.cfg):
        checkpoint = os.path.join(workdir, f"checkpoint_{method}.npz") if workdir else None
        evaluations = runner.train_evaluations(method, prepared, seeds, seed_axis, checkpoint)
        rows.extend(runner.history_rows(method, prepared, evaluations, seeds if seed_axis else None))
        finals[method] = final_metrics(evaluations[-1].metrics)
    return _finish(workdir, prepared, rows, finals, seeds)


def run_single(prepared: runner.Prepared, workdir: str | None) -> dict:
    """One seed (``cfg.seed``) per method, chunked with progress lines and checkpoints."""
    return _run_methods(prepared, workdir, [prepared.cfg.seed], seed_axis=False)


def run_many_seeds(prepared: runner.Prepared, workdir: str | None, num_seeds: int) -> dict:
    """Every method over ``num_seeds`` seeds (``cfg.seed``, ``cfg.seed + 1``, ...), vmapped, chunked likewise."""
    return _run_methods(prepared, workdir, [prepared.cfg.seed + s for s in range(num_seeds)], seed_axis=True)


def final_summary(final: dict[str, np.ndarray], num_clients: int) -> dict:
    """summary.json's ``final`` entry of one method: mean and std over the seeds with finite values."""
    per_client = np.asarray(final["client_accuracy"]).reshape(-1, num_clients)
    score = pooled_score(final)
    accuracy, auc = (finite_mean_std(final[f"{score}_{k}"]) for k in ("accuracy", "auc"))
    clients = [finite_mean_std(per_client[:, c]) for c in range(num_clients)]
    return {
        f"{score}_accuracy_mean": accuracy[0],
        f"{score}_accuracy_std": accuracy[1],
        f"{score}_auc_mean": auc[0],
        f"{score}_auc_std": auc[1],
        "client_accuracy_mean": [c[0] for c in clients],
        "client_accuracy_std": [c[1] for c in clients],
        "diverged_seeds": int(np.sum(np.asarray(final["diverged"]) > 0)),
    }


def _finish(workdir, prepared, rows, finals, seeds) -> dict:
    names = prepared.dataset.eval_names
    rounds = max(row["round"] for row in rows)  # the rounds trained (every method trains cfg.rounds)
    table = final_accuracy_table(finals, names)
    evaluated = prepared.dataset.info.get("eval_sample", "every client")
    sampled = f"; evaluated on {evaluated}" if "eval_sample" in prepared.dataset.info else ""
    split = "a pinned split" if not prepared.split_follows_seed else "each seed its own split"
    print(
        f"\nFinal test accuracy (%) on {prepared.dataset.name}, {len(seeds)} seed(s) ({split}), mean ± sample std "
        f"(n = {len(seeds)}), {rounds} rounds: each client's own test split, their mean, and the pooled test set; "
        f"then the pooled test set's ROC AUC (macro one-vs-rest){sampled}\n"
    )
    print(table)
    summary = {
        "dataset": prepared.dataset.name,
        "client_names": list(names),
        "evaluated_clients": evaluated,
        "seeds": seeds,
        "rounds": rounds,
        "privacy": prepared.accounting.report(rounds),
        "final": {m: final_summary(f, len(names)) for m, f in finals.items()},
        "table": table,
    }
    if workdir:
        history, per_client = client_results.split(rows)
        tabular.write_csv(os.path.join(workdir, "history.csv"), history)
        if per_client:
            tabular.write_csv(os.path.join(workdir, "clients.csv"), client_results.long_rows(rows, names))
        tabular.write_text_atomic(
            os.path.join(workdir, "summary.json"), json.dumps(config_lib.json_safe(summary), indent=2)
        )
        print(f"\nwrote {workdir}/history.csv, {'clients.csv, ' if per_client else ''}summary.json, config.json")
    return summary


def run_sweep_command(prepared: sweep.PreparedSweep, workdir: str | None) -> sweep.SweepResult:
    """Run a prepared sweep (its workdir already prepared) and print its final table."""
    result = sweep.run_prepared(prepared, workdir)
    print(
        f"\nFinal round, mean ± sample std over seeds (%):\n\n{report.final_table(result.summary, result.plan.knobs)}"
    )
    if workdir:
        print(f"\nwrote {workdir}/{', '.join(sweep.FILES)}, sweep.json")
        print(f"figures and report.md: python -m medfed_jax.report --workdir={workdir}")
    return result


REFUSALS = (ValueError, TypeError, OSError)  # bad input: a config, a flag, a data file, a workdir


def refuse(error: BaseException, debug: bool) -> None:
    """One ``error: ...`` line on stderr and exit status 2; with ``--debug`` the exception itself."""
    if debug:
        raise error
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def setup_devices(devices: str | None) -> None:
    """The device count and, when launched as one of many processes, `jax.distributed` (`medfed_jax.mesh`).

    Before anything uses JAX; raises ValueError (one line) for a bad setting.
    """
    mesh_lib.configure_devices(devices, "--devices")
    mesh_lib.initialize_distributed()


def main(command: Command) -> None:
    """Check everything (config, data, workdir), then run; a refusal is one line and exit status 2."""
    try:
        setup_devices(command.devices)
        compilation_cache.enable(command.compilation_cache)
        cfg = command_config(command)
        is_sweep = sweep.is_sweep(cfg)
        prepared = (
            sweep.prepare_sweep(cfg, command.seeds, command.allow_large_sweep, command.sweep_devices)
            if is_sweep
            else runner.prepare(cfg)
        )
        if command.workdir:
            extra = {"seeds": command.seeds} if command.seeds > 1 else None
            prepare_workdir(command.workdir, cfg, command.overwrite, extra)
    except REFUSALS as error:
        refuse(error, command.debug)
    try:
        if is_sweep:
            run_sweep_command(prepared, command.workdir)
        elif command.seeds > 1:
            run_many_seeds(prepared, command.workdir, command.seeds)
        else:
            run_single(prepared, command.workdir)
    except runner.CorruptFile as error:
        refuse(error, command.debug)


def parse_or_refuse(argv: list[str]) -> Command:
    """`parse_command_line`, a malformed command line refused in one line (exit status 2)."""
    try:
        return parse_command_line(argv)
    except ValueError as error:
        refuse(error, debug="--debug" in argv)


def run_main() -> None:
    """The ``python -m medfed_jax`` process.

    Python's garbage collector leaves alone what exists when it starts (the
    imported modules) and when it ends (`gc.freeze`): the collections during
    tracing, and the one at interpreter exit, skip ~10^5 objects that live as
    long as the process anyway.
    """
    gc.freeze()
    gc.enable()  # `medfed_jax.__main__` imports with it disabled
    atexit.register(gc.freeze)
    host_devices.quiet_backend_probe()
    app.run(main, flags_parser=parse_or_refuse)
