"""Population scaling: memory and training s/round against the population size, cohort fixed.

The population: ``data.name='random'`` (x ~ N(0, I_8), labels from a fixed
linear teacher, 2 classes), log-normal client sizes (median ``--median_rows``
training rows, sigma ``--sigma``; 20% more rows for each client's test split),
the default 2NN-style MLP (8-200-200-2), E=1, B=32, a cohort of ``--cohort``
clients per round, evaluation on a seeded sample of ``--eval_clients``.

Two measurements:

1. *per size* (one fresh process per population size and storage: padded,
   flat, and generated on device from per-client keys; under
   ``/usr/bin/time -v``): peak RSS, the stored bytes, data generation and
   compile seconds, and training s/round (`Engine.run_rounds`, ``--rounds``
   rounds per call, median of ``--repeats`` calls after the first);
2. *interleaved ratio*: the smallest and the largest population of each
   ``--interleave`` storage in ONE process, timed A B A B ... (``--repeats``
   pairs); the median and range of the per-pair ratios large / small is the
   number to quote on a shared machine.

    python benchmarks/population.py                       # 10^3 .. 10^6, markdown on stdout
    python benchmarks/population.py --sizes=1000,10000 --padded_sizes=1000 --rounds=2 --repeats=2   # quick
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

from medfed_jax import config as config_lib
from medfed_jax import runner
from medfed_jax.config import split
from medfed_jax.server import build_engine


def population_config(args: argparse.Namespace, num_clients: int, storage: str):
    cfg = config_lib.default_config()
    cfg.data.name, cfg.data.num_clients, cfg.data.num_features = "random", num_clients, 8
    cfg.data.samples_per_client, cfg.data.size_sigma = args.median_rows, args.sigma
    cfg.data.storage, cfg.data.cap_quantile = storage, args.cap_quantile
    cfg.data.eval_clients = args.eval_clients
    cfg.cohort_size, cfg.baselines = args.cohort, ()
    return cfg


class Run:
    """One population's engine, data and state on device, ready to time."""

    def __init__(self, args: argparse.Namespace, num_clients: int, storage: str):
        start = time.perf_counter()
        self.prepared = runner.prepare(population_config(args, num_clients, storage))
        self.generate_s = time.perf_counter() - start
        self.engine = build_engine(split(self.prepared.cfg).static, self.prepared.context)
        self.train, _ = runner.place_data(self.engine, self.prepared.dataset)  # on the engine's devices
        self.state = self.engine.init(0, self.train, self.prepared.hparams)
        self.rounds = args.rounds
        start = time.perf_counter()
        self.call()
        self.first_s = time.perf_counter() - start

    def call(self) -> float:
        start = time.perf_counter()
        state, _ = self.engine.run_rounds(self.state, self.train, self.prepared.hparams, self.rounds)
        jax.block_until_ready(state)
        return (time.perf_counter() - start) / self.rounds

    def facts(self) -> dict:
        train = self.prepared.dataset.train
        return {
            "rows": int(np.sum(train.count)),
            "stored_gb": sum(np.asarray(a).nbytes for a in train) / 1e9,
            "largest": int(np.max(train.count)),
            "cap": self.prepared.context.cohort_cap or int(train.y.shape[1]),
            "generate_s": self.generate_s,
        }


def one(args: argparse.Namespace) -> None:
    """Child mode: one population, one JSON line."""
    run = Run(args, args.one, args.storage)
    seconds = [run.call() for _ in range(args.repeats)]
    result = {**run.facts(), "compile_s": run.first_s - statistics.median(seconds)}
    print(json.dumps({**result, "s_per_round": statistics.median(seconds)}), flush=True)


def measure(args: argparse.Namespace, num_clients: int, storage: str) -> dict:
    """A fresh process for one population under /usr/bin/time -v: its JSON line and peak RSS."""
    command = [sys.executable, os.path.abspath(__file__), f"--one={num_clients}", f"--storage={storage}"]
    command += [
        f"--{k}={v}"
        for k, v in vars(args).items()
        if k not in ("one", "storage", "sizes", "padded_sizes", "generated_sizes", "interleave")
    ]
    proc = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, env=os.environ.copy())
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1][:160]}
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**result, "peak_rss_gb": int(rss.group(1)) / 1e6 if rss else float("nan")}


def interleaved(args: argparse.Namespace, storage: str, small: int, large: int) -> tuple[float, ...]:
    """Median s/round of each and the median, min, max of the per-pair ratios large / small."""
    a, b = Run(args, small, storage), Run(args, large, storage)
    pairs = [(a.call(), b.call()) for _ in range(args.repeats)]
    ratios = [tb / ta for ta, tb in pairs]
    return (
        statistics.median(t for t, _ in pairs),
        statistics.median(t for _, t in pairs),
        statistics.median(ratios),
        min(ratios),
        max(ratios),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000,10000,100000,1000000", help="flat populations")
    parser.add_argument("--padded_sizes", default="1000,10000", help="padded populations (the old storage)")
    parser.add_argument("--generated_sizes", default="1000,1000000", help="generated on device (no stored rows)")
    parser.add_argument("--interleave", default="flat,generated", help="storages timed smallest vs largest, A B A B")
    parser.add_argument("--cohort", type=int, default=100)
    parser.add_argument("--median_rows", type=int, default=32)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--cap_quantile", type=float, default=0.99)
    parser.add_argument("--eval_clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=20, help="rounds per timed call (each draws its own cohort)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--storage", default="flat", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args)
        return
    print(
        f"# Population scaling, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, jax {jax.__version__}; cohort {args.cohort}, log-normal sizes (median "
        f"{args.median_rows}, sigma {args.sigma}), cap_quantile {args.cap_quantile} (flat), eval sample "
        f"{args.eval_clients}; load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| clients | storage | rows | largest | cap | stored GB | peak RSS GB | generate s | compile s | s/round |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    jobs = [(int(n), "padded") for n in args.padded_sizes.split(",") if n]
    jobs += [(int(n), "flat") for n in args.sizes.split(",")]
    jobs += [(int(n), "generated") for n in args.generated_sizes.split(",") if n]
    for num_clients, storage in jobs:
        r = measure(args, num_clients, storage)
        if "error" in r:
            print(f"| {num_clients} | {storage} | failed: {r['error']} |||||||||", flush=True)
            continue
        print(
            f"| {num_clients} | {storage} | {r['rows']} | {r['largest']} | {r['cap']} | {r['stored_gb']:.3f} | "
            f"{r['peak_rss_gb']:.2f} | {r['generate_s']:.1f} | {r['compile_s']:.1f} | {r['s_per_round']:.4f} |",
            flush=True,
        )
    for storage in args.interleave.split(","):
        listed = args.generated_sizes if storage == "generated" else args.sizes
        sizes = [int(n) for n in listed.split(",") if n]
        if len(sizes) < 2:
            continue
        small, large = min(sizes), max(sizes)
        ta, tb, ratio, low, high = interleaved(args, storage, small, large)
        print(
            f"\nInterleaved in one process, {storage} ({args.repeats} pairs): {small} clients {ta:.4f} s/round, "
            f"{large} clients {tb:.4f} s/round; ratio {ratio:.2f} (range {low:.2f} to {high:.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
