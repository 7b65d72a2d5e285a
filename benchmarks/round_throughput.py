"""Benchmarks W1 and W2: seconds per federated round, engine (1 device, all devices) vs a per-client loop.

W1 (medfed_jax/DESIGN.md): synthetic MNIST-shaped data (x ~ N(0, I_784), labels
argmax(x @ W_true)), 600 samples per client, the 2NN MLP 784-200-200-10,
E=1, B=50, SGD lr 0.05, every client in every round.

W2 (pfl-research's CIFAR-10 benchmark shape): 1000 clients x 50 synthetic
32x32x3 images (linear-teacher labels), a cohort of 50 per round, the 2-conv
CNN of `medfed_jax.models` (5x5 convs of 32 and 64 channels, dense 512),
B=10, E=1, SGD lr 0.05.

Implementations, all in one process and timed interleaved (A B C A B C ...),
so that a shared machine's changing load hits them alike:

- ``loop``: written the way a typical user would: one jitted per-client update
  called in a Python loop over the cohort, then a jitted average;
- ``engine, D dev``: `Engine.run_rounds` (``--rounds`` rounds under
  `lax.scan`) with the cohort's client axis split over D devices
  (`medfed_jax.mesh`); ``--devices=1,all`` by default. On a CPU the host
  platform has one device per core unless ``MEDFED_JAX_DEVICES`` says
  otherwise.

For each pair index the ratio ``loop / engine`` is taken from the same
interleaved pass; the table reports medians of seconds per round, and the
median and min-max of the per-pass ratios. Compile time (first call minus a
timed call) is reported separately.

    python benchmarks/round_throughput.py                            # W1, C in {10, 100, 1000}
    python benchmarks/round_throughput.py --workload=w2
    python benchmarks/round_throughput.py --clients=100 --passes=9 --strategies=map:8,map:4
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medfed_jax import config as config_lib
from medfed_jax import host_devices, runner
from medfed_jax import mesh as mesh_lib
from medfed_jax.config import split
from medfed_jax.data.synthetic import linear_teacher, mnist_like
from medfed_jax.models import make_model
from medfed_jax.server import build_engine
from medfed_jax.types import ClientData, FederatedDataset

LR = 0.05


@dataclasses.dataclass(frozen=True)
class Workload:
    """A benchmark shape: data, model and local training."""

    name: str
    dataset: FederatedDataset
    model: str
    widths: tuple[int, ...]
    batch: int
    cohort: int  # clients per round (== num_clients: everyone)
    flops_per_sample: float  # forward + backward of one training row (0: not counted)


MLP_LAYERS = [(784, 200), (200, 200), (200, 10)]


def w1(dataset: FederatedDataset) -> Workload:
    """W1 over ``dataset`` (784 features, 10 classes), every client in every round."""
    forward = sum(2 * i * o for i, o in MLP_LAYERS)
    input_grads = sum(2 * i * o for i, o in MLP_LAYERS[1:])
    flops = 2 * forward + input_grads  # weight gradients everywhere, input gradients for layers 2 and 3
    return Workload("W1", dataset, "mlp", (200, 200), 50, dataset.num_clients, flops)


def w2(dataset: FederatedDataset, cohort: int = 50) -> Workload:
    """W2 over ``dataset`` (images, 10 classes), ``cohort`` clients per round."""
    return Workload("W2", dataset, "cnn", (), 10, min(cohort, dataset.num_clients), 0.0)


def w2_images(num_clients: int = 1000, samples: int = 50, side: int = 32) -> FederatedDataset:
    """``num_clients`` clients of ``samples`` synthetic ``side x side x 3`` images (linear-teacher labels)."""
    flat = linear_teacher(num_clients, samples, side * side * 3, 10, seed=0, name="w2_images")
    images = lambda d: ClientData(d.x.reshape(*d.x.shape[:2], side, side, 3), d.y, d.count)  # noqa: E731
    return dataclasses.replace(flat, train=images(flat.train), test=images(flat.test))


def workload_config(workload: Workload, parallelism: str, chunk: int):
    cfg = config_lib.default_config()
    cfg.model.name, cfg.model.widths = workload.model, workload.widths
    cfg.local.epochs, cfg.local.batch_size, cfg.local.lr = 1, workload.batch, LR
    cfg.client_parallelism, cfg.client_chunk = parallelism, chunk
    cfg.cohort_size = workload.cohort if workload.cohort < workload.dataset.num_clients else 0
    cfg.baselines = ()
    return cfg


def engine_round(workload: Workload, parallelism: str, chunk: int, devices: int, rounds: int) -> Callable:
    """``call() -> result``: ``rounds`` engine rounds with the cohort split over ``devices`` devices."""
    cfg = workload_config(workload, parallelism, chunk)
    prepared = runner.prepare(cfg, workload.dataset)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:devices]), (mesh_lib.AXIS,))
    engine = build_engine(split(cfg).static, prepared.context, mesh=mesh)
    train, _ = runner.place_data(engine, workload.dataset)
    state = engine.init(0, train, prepared.hparams)
    return lambda: engine.run_rounds(state, train, prepared.hparams, rounds)


def loop_round(workload: Workload) -> Callable:
    """``call() -> result``: one round of a jitted per-client update in a Python loop, then averaged."""
    dataset = workload.dataset
    model = make_model(workload.model, dataset.num_classes, workload.widths)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *dataset.feature_shape)))
    optimizer = optax.sgd(LR)
    feature_shape = dataset.feature_shape

    @jax.jit
    def client_update(params, x, y, key):
        order = jax.random.permutation(key, x.shape[0])
        batches = (x[order].reshape(-1, workload.batch, *feature_shape), y[order].reshape(-1, workload.batch))

        def loss(p, xb, yb):
            return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, xb), yb).mean()

        def step(carry, batch):
            p, s = carry
            updates, s = optimizer.update(jax.grad(loss)(p, *batch), s, p)
            return (optax.apply_updates(p, updates), s), None

        (trained, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), batches)
        return trained

    average = jax.jit(lambda *models: jax.tree.map(lambda *leaves: sum(leaves) / len(leaves), *models))
    xs = [jax.device_put(np.asarray(dataset.train.x[c])) for c in range(dataset.num_clients)]
    ys = [jax.device_put(np.asarray(dataset.train.y[c])) for c in range(dataset.num_clients)]
    keys = jax.random.split(jax.random.PRNGKey(1), dataset.num_clients)
    rng = np.random.default_rng(0)

    def one_round():
        cohort = rng.choice(dataset.num_clients, workload.cohort, replace=False)
        return average(*[client_update(params, xs[c], ys[c], keys[c]) for c in cohort])

    return one_round


def seconds(fn: Callable) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def interleaved(implementations: dict[str, tuple[Callable, int]], passes: int) -> dict[str, dict]:
    """Time every implementation once per pass, in turn; ``(fn, rounds per call)`` -> per-pass s/round."""
    compile_s = {name: seconds(fn) for name, (fn, _) in implementations.items()}  # compiles, warms caches
    per_round: dict[str, list[float]] = {name: [] for name in implementations}
    for _ in range(passes):
        for name, (fn, rounds) in implementations.items():
            per_round[name].append(seconds(fn) / rounds)
    return {
        name: {"s": times, "compile_s": compile_s[name] - times[0] * implementations[name][1]}
        for name, times in per_round.items()
    }


def device_counts(text: str) -> list[int]:
    available = len(jax.devices())
    counts = [available if d == "all" else int(d) for d in text.split(",")]
    return sorted({d for d in counts if d <= available})


def table(workload: Workload, timings: dict[str, dict], reference: str = "loop") -> list[str]:
    """Markdown rows: s/round (median), GFLOP/s, compile s, loop/this per pass (median, min-max)."""
    dataset = workload.dataset
    flops = workload.cohort * int(dataset.train.count[0]) * workload.flops_per_sample
    rows = []
    for name, timing in timings.items():
        median = statistics.median(timing["s"])
        ratios = [r / t for r, t in zip(timings[reference]["s"], timing["s"])]
        gflops = f"{flops / median / 1e9:.1f}" if flops else "-"
        rows.append(
            f"| {workload.name} | {dataset.num_clients} | {workload.cohort} | {name} | {median:.3f} | {gflops} | "
            f"{timing['compile_s']:.1f} | {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="w1", choices=("w1", "w2"))
    parser.add_argument("--clients", default="", help="populations (default: W1 10,100,1000; W2 1000)")
    parser.add_argument("--samples", type=int, default=0, help="rows per client (0: the workload's own)")
    parser.add_argument("--cohort", type=int, default=50, help="W2's clients per round")
    parser.add_argument(
        "--strategies", default="map", help="client_parallelism[:chunk] of the engine (map: its CPU default)"
    )
    parser.add_argument("--devices", default="1,all", help="device counts the engine is split over")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per scanned engine call")
    parser.add_argument("--passes", type=int, default=5, help="interleaved timing passes")
    args = parser.parse_args()
    print(
        f"# {args.workload.upper()} round throughput, {datetime.date.today()}, "
        f"{platform.processor() or platform.machine()}, {host_devices.host_cores()} cores, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.passes} passes"
    )
    print("| workload | clients | cohort | implementation | s/round | GFLOP/s | compile s | loop / this (min-max) |")
    print("|---|---|---|---|---|---|---|---|")
    for num_clients in map(int, (args.clients or ("10,100,1000" if args.workload == "w1" else "1000")).split(",")):
        if args.workload == "w1":
            workload = w1(mnist_like(num_clients, args.samples or 600, seed=0))
        else:
            workload = w2(w2_images(num_clients, args.samples or 50), args.cohort)
        implementations = {"loop": (loop_round(workload), 1)}
        for strategy in args.strategies.split(","):
            parallelism, _, chunk = strategy.partition(":")
            for devices in device_counts(args.devices):
                fn = engine_round(workload, parallelism, int(chunk or 0), devices, args.rounds)
                implementations[f"engine {strategy}, {devices} dev"] = (fn, args.rounds)
        print("\n".join(table(workload, interleaved(implementations, args.passes))), flush=True)


if __name__ == "__main__":
    main()
