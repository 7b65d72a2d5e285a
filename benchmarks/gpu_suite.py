"""One accelerator's numbers in one run (under 5 minutes on one GPU); prints a markdown table.

1. The chip's own ceilings, measured here: a large matmul's FLOP/s (bf16 and f32) and a large
   copy's bandwidth (bytes read + written per second).
2. W1 (`round_throughput.w1`) at C in {100, 1000, 10000}: engine s/round, GFLOP/s and its share of
   the f32 matmul ceiling; the per-client Python loop alongside at C <= 1000.
3. W2 (`round_throughput.w2`): 1000 clients x 50 images 32x32x3, cohort 50, 2-conv CNN, B=10.
4. The coordinate median of C=1000 updates of P=1e6 against its bytes floor (reading the updates
   once at the copy bandwidth).
5. Sweep throughput: a robustness sub-matrix (`configs/robustness_matrix.py`) as one vmapped
   program, cells/s, compile included and excluded, in every device mode the machine allows
   (`medfed_jax.sweep.Execution`: ``cells`` split over the devices where there are several).

The data is generated on the device (x ~ N(0, I), linear-teacher labels), so the host never holds
W1 at C=10000 (18.8 GB). ``--smoke`` shrinks everything so the script runs on a CPU in a minute or
two (to know it works; its numbers mean nothing). Never a test dependency.

    python benchmarks/gpu_suite.py            # on the GPU machine
    python benchmarks/gpu_suite.py --smoke    # anywhere
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import runpy
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import round_throughput as rt  # noqa: E402

from medfed_jax import aggregators, sweep  # noqa: E402
from medfed_jax.types import ClientData, FederatedDataset  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Sizes:
    matmul: int
    copy_bytes: float
    w1_clients: tuple[int, ...]
    w1_samples: int
    loop_up_to: int  # clients: the Python loop runs only up to this many
    w2: tuple[int, int, int, int]  # clients, images per client, cohort, side
    median: tuple[int, int]  # C, P
    sweep: tuple[tuple[str, ...], tuple[str, ...], int]  # aggregators, attacks, rounds


FULL = Sizes(8192, 2**30, (100, 1000, 10000), 600, 1000, (1000, 50, 50, 32), (1000, 10**6),
             (("mean", "coordinate_median", "krum"), ("sign_flip", "alie"), 50))  # fmt: skip
SMOKE = Sizes(256, 2**22, (4, 8), 100, 8, (20, 10, 5, 8), (10, 1000), (("mean",), ("sign_flip",), 2))


def best_seconds(fn, repeats: int = 3) -> float:
    """Median of ``repeats`` timed calls after one warm-up (compile) call."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_flops(n: int, dtype) -> float:
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    f = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / best_seconds(lambda: f(a, b))


def copy_bandwidth(num_bytes: float) -> float:
    """Bytes read + written per second by ``x + 1`` over a float32 array of ``num_bytes``."""
    x = jnp.zeros(int(num_bytes) // 4, jnp.float32)
    f = jax.jit(lambda x: x + 1)
    return 2 * num_bytes / best_seconds(lambda: f(x))


def device_dataset(num_clients: int, samples: int, feature_shape: tuple[int, ...], name: str) -> FederatedDataset:
    """Linear-teacher clients generated on the device: x ~ N(0, I), y = argmax(x W); one test row each."""
    features = int(np.prod(feature_shape))
    teacher = jax.random.normal(jax.random.key(1), (features, 10))

    @jax.jit
    def make(key):
        x = jax.random.normal(key, (num_clients, samples + 1, features))
        y = jnp.argmax(x @ teacher, -1).astype(jnp.int32)
        x = x.reshape(num_clients, samples + 1, *feature_shape)
        split = lambda a, s: a[:, s]  # noqa: E731
        train = ClientData(split(x, slice(0, samples)), split(y, slice(0, samples)), jnp.full(num_clients, samples))
        test = ClientData(split(x, slice(samples, None)), split(y, slice(samples, None)), jnp.ones(num_clients))
        return train, test

    train, test = make(jax.random.key(0))
    count = lambda d: ClientData(d.x, d.y, np.asarray(d.count, np.int32))  # noqa: E731
    names = tuple(f"client{c}" for c in range(num_clients))
    return FederatedDataset(name, count(train), count(test), names, 10)


def workload_rows(workload: rt.Workload, loop: bool, f32_ceiling: float) -> list[list[str]]:
    devices = len(jax.devices())
    impls = {f"engine, {devices} dev": (rt.engine_round(workload, "auto", 0, devices, 2), 2)}
    if loop:
        impls["loop"] = (rt.loop_round(workload), 1)
    timings = rt.interleaved(impls, passes=3)
    flops = workload.cohort * int(workload.dataset.train.count[0]) * workload.flops_per_sample
    rows = []
    for name, timing in timings.items():
        s = statistics.median(timing["s"])
        notes = [f"{flops / s / 1e9:.0f} GFLOP/s, {100 * flops / s / f32_ceiling:.0f}% of f32 matmul"] if flops else []
        if loop and name != "loop":
            notes.append(f"loop / engine {statistics.median(timings['loop']['s']) / s:.2f}")
        label = f"{workload.name}, C={workload.dataset.num_clients}, cohort {workload.cohort}: {name}"
        rows.append([label, f"{s:.4f} s/round", "; ".join(notes)])
    return rows


def median_row(num_clients: int, params: int, bandwidth: float) -> list[str]:
    updates = {"u": jax.random.normal(jax.random.key(2), (num_clients, params))}
    weights, mask = jnp.ones(num_clients, jnp.int32), jnp.ones(num_clients, bool)
    rule = aggregators.coordinate_median()
    f = jax.jit(lambda u: rule.aggregate(u, weights, mask, (), jax.random.key(0))[0])
    s = best_seconds(lambda: f(updates))
    floor = num_clients * params * 4 / bandwidth
    return [f"coordinate_median, C={num_clients}, P={params:.0e}", f"{s:.4f} s", f"{s / floor:.1f}x its bytes floor"]


def sweep_row(names: tuple[str, ...], attacks: tuple[str, ...], rounds: int, mode: str) -> list[str]:
    matrix = runpy.run_path(os.path.join(ROOT, "configs", "robustness_matrix.py"))["matrix_config"]
    cfg = matrix(names, attacks, rounds=rounds)
    start = time.perf_counter()
    result = sweep.run_sweep(cfg, log=None, sweep_devices=mode)
    first = time.perf_counter() - start
    start = time.perf_counter()
    sweep.run_sweep(cfg, log=None, sweep_devices=mode)  # compiled programs are kept: run time alone
    second = time.perf_counter() - start
    cells = len(result.histories)
    return [
        f"sweep: {cells} cells x {rounds} rounds (robustness sub-matrix), {mode}: {sweep.execution(mode).describe()}",
        f"{cells / first:.2f} cells/s with compile",
        f"{cells / second:.2f} cells/s compiled ({cells * rounds / second:.0f} cell-rounds/s)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs (e.g. on a CPU)")
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    device = jax.devices()[0]
    print(f"# GPU suite, {datetime.date.today()}, {len(jax.devices())} x {device.device_kind}, jax {jax.__version__}")
    rows = []
    flops = {dtype.__name__: matmul_flops(sizes.matmul, dtype) for dtype in (jnp.bfloat16, jnp.float32)}
    bandwidth = copy_bandwidth(sizes.copy_bytes)
    for dtype, rate in flops.items():
        rows.append([f"matmul {sizes.matmul}^3, {dtype}", f"{rate / 1e12:.2f} TFLOP/s", "ceiling"])
    rows.append([f"copy {sizes.copy_bytes / 2**20:.0f} MiB", f"{bandwidth / 1e9:.0f} GB/s", "ceiling (read + write)"])
    for clients in sizes.w1_clients:
        data = device_dataset(clients, sizes.w1_samples, (784,), "w1_device")
        rows += workload_rows(rt.w1(data), clients <= sizes.loop_up_to, flops["float32"])
    clients, images, cohort, side = sizes.w2
    w2 = rt.w2(device_dataset(clients, images, (side, side, 3), "w2_device"), cohort)
    rows += workload_rows(w2, True, flops["float32"])
    rows.append(median_row(*sizes.median, bandwidth))
    rows += [sweep_row(*sizes.sweep, mode) for mode in sweep.allowed_sweep_devices()]
    print("| measurement | result | notes |\n|---|---|---|")
    print("\n".join(f"| {' | '.join(row)} |" for row in rows))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
