"""Checkpoint format: the runner's ``np.savez`` file against orbax-checkpoint, on real FedStates.

For the initial `medfed_jax.server.FedState` of heart (logistic, 4 hospitals), digits
(MLP 64, 20 clients) and digits under Ditto (a personal model per client on the client
axis), each format saves and restores the state plus the evaluations so far:

- *npz*: `medfed_jax.runner.save_checkpoint` / `load_checkpoint` (one file, written to a
  temporary and renamed, `medfed_jax.tabular.write_atomic`);
- *orbax*: an ``orbax.checkpoint.CheckpointManager`` (synchronous, ``max_to_keep=1``) saving
  ``StandardSave(state)`` and ``JsonSave(history)`` as one step, restored into the abstract state.

Columns: median seconds to save and to restore (``--repeats`` each, after one warm-up), bytes on
disk, files written. Then atomicity under ``kill -9``: a child process saves checkpoints in a
loop and is killed at a random moment, ``--kills`` times per format; the parent counts the kills
after which the latest checkpoint does not restore, and what the kill left behind.

    python benchmarks/checkpoint_format.py                  # prints a markdown section
    python benchmarks/checkpoint_format.py --repeats=3 --kills=2   # the quick check
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from medfed_jax import config as config_lib
from medfed_jax import config_files, runner, tabular

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {  # name -> (config, method)
    "heart (logistic, 4 clients)": ("heart_fedavg", "federated"),
    "digits (MLP 64, 20 clients)": ("digits_dirichlet", "federated"),
    "digits, Ditto (20 personal MLPs)": ("digits_dirichlet", "ditto"),
}


def initial_state(config: str, method: str):
    """The run's initial FedState (seed 0) and two evaluations' worth of history."""
    prepared = runner.prepare(config_files.load_config(config))
    engine, view, method_cfg = runner.engine_for(method, prepared)
    train, _ = runner.place_data(engine, view)
    state = jax.block_until_ready(engine.init(np.uint32(0), train, config_lib.split(method_cfg).hparams))
    metrics = {
        "global_pooled_accuracy": np.asarray([0.5], np.float32),
        "client_accuracy": np.full((1, 20), 0.5, np.float32),
    }
    return state, [runner.Evaluation(r, 1.0 * r, metrics) for r in (10, 20)]


def _history_json(evaluations) -> list:
    return json.loads(runner._evaluations_to_json(evaluations))


def orbax_manager(directory: str):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "history"))


def orbax_save(manager, step: int, state, evaluations) -> None:
    import orbax.checkpoint as ocp

    items = ocp.args.Composite(
        state=ocp.args.StandardSave(state), history=ocp.args.JsonSave(_history_json(evaluations))
    )
    manager.save(step, args=items)
    manager.wait_until_finished()


def orbax_restore(manager, like):
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    items = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), history=ocp.args.JsonRestore())
    restored = manager.restore(manager.latest_step(), args=items)
    return restored["state"], restored["history"]


def disk(path: str) -> tuple[int, int]:
    """(bytes, files) under ``path``."""
    if os.path.isfile(path):
        return os.path.getsize(path), 1
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files]
    return sum(sizes), len(sizes)


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def same_state(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def measure(name: str, config: str, method: str, repeats: int, scratch: str) -> list[str]:
    state, evaluations = initial_state(config, method)
    npz = os.path.join(scratch, "checkpoint.npz")
    save_npz = median_seconds(lambda: runner.save_checkpoint(npz, state, evaluations), repeats)
    load_npz = median_seconds(lambda: runner.load_checkpoint(npz, state), repeats)
    restored, _ = runner.load_checkpoint(npz, state)
    assert same_state(state, restored)
    manager, step = orbax_manager(os.path.join(scratch, "orbax")), iter(range(1, 10**6))
    save_orbax = median_seconds(lambda: orbax_save(manager, next(step), state, evaluations), repeats)
    load_orbax = median_seconds(lambda: orbax_restore(manager, state), repeats)
    restored, _ = orbax_restore(manager, state)
    assert same_state(state, restored)
    leaves = sum(np.asarray(x).nbytes for x in jax.tree.leaves(state))
    (npz_bytes, npz_files), (orbax_bytes, orbax_files) = disk(npz), disk(os.path.join(scratch, "orbax"))
    return [
        name,
        f"{leaves:,}",
        f"{1e3 * save_npz:.1f} / {1e3 * load_npz:.1f}",
        f"{1e3 * save_orbax:.1f} / {1e3 * load_orbax:.1f}",
        f"{npz_bytes:,} ({npz_files})",
        f"{orbax_bytes:,} ({orbax_files})",
    ]


def child(fmt: str, path: str) -> None:
    """Save checkpoints of a changing state forever (until killed), printing each finished step."""
    state, evaluations = initial_state(*CASES["heart (logistic, 4 clients)"])
    manager = orbax_manager(path) if fmt == "orbax" else None
    for step in range(1, 10**6):
        state = state._replace(round=np.int32(step))
        if manager is None:
            runner.save_checkpoint(path, state, evaluations)
        else:
            orbax_save(manager, step, state, evaluations)
        print(step, flush=True)


def kill_trials(fmt: str, kills: int, scratch: str) -> str:
    """After each random ``kill -9`` of `child`, whether the latest checkpoint restores, and what was left behind."""
    like, _ = initial_state(*CASES["heart (logistic, 4 clients)"])
    restored, leftovers, rng = 0, set(), random.Random(0)
    for trial in range(kills):
        path = os.path.join(scratch, f"{fmt}{trial}" + (".npz" if fmt == "npz" else ""))
        command = [sys.executable, __file__, f"--child={fmt}", f"--path={path}"]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT})
        for _ in range(3):  # three saves finished, then a kill at a random point of the next ones
            proc.stdout.readline()
        time.sleep(rng.uniform(0.0, 0.05))
        proc.kill()
        proc.wait()
        try:
            state, _ = runner.load_checkpoint(path, like) if fmt == "npz" else orbax_restore(orbax_manager(path), like)
            restored += int(state.round) >= 3
        except Exception:  # noqa: BLE001  (any failure to restore counts)
            pass
        if fmt == "npz":
            leftovers.update("<file>.tmp<pid>" for f in os.listdir(scratch) if f.startswith(f"{fmt}{trial}.npz.tmp"))
        else:
            leftovers.update("<step>.orbax-checkpoint-tmp-*" for f in os.listdir(path) if "tmp" in f)
    return f"{restored}/{kills} restored" + (f"; left behind: {', '.join(sorted(leftovers))}" if leftovers else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--child", choices=("npz", "orbax"), help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.path)
        return
    scratch = tempfile.mkdtemp(prefix="checkpoint_format_")
    try:
        header = ["state", "leaf bytes", "npz save / load (ms)", "orbax save / load (ms)", "npz bytes (files)"]
        header.append("orbax bytes (files)")
        body = []
        for name, (config, method) in CASES.items():
            folder = os.path.join(scratch, str(len(body)))
            os.makedirs(folder)
            body.append(measure(name, config, method, args.repeats, folder))
        print(tabular.markdown_table(header, body))
        print()
        for fmt in ("npz", "orbax"):
            print(f"- kill -9 while saving, {fmt}: {kill_trials(fmt, args.kills, scratch)}")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
