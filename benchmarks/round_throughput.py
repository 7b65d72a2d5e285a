"""Benchmark W1: seconds per federated round, engine vs a per-client Python loop.

W1 (ARCHITECTURE.md): synthetic MNIST-shaped data (x ~ N(0, I_784), labels
argmax(x @ W_true)), 600 samples per client, the 2NN MLP 784-200-200-10,
E=1, B=50, SGD lr 0.05, every client in every round.

(a) the engine: `Engine.run_rounds` (rounds under `lax.scan`), for several
    client-parallel strategies (full vmap, or `lax.map` over chunks of k
    clients);
(b) a reference written the way a typical user would: one jitted per-client
    update called in a Python loop over clients, then a jitted average.

Seconds per round are medians over repeats after the first call (compile time
reported separately). GFLOP/s counts the 2NN's forward and backward passes
(weight gradients everywhere, input gradients for layers 2 and 3).

    python benchmarks/round_throughput.py                 # C in {10, 100, 1000}
    python benchmarks/round_throughput.py --clients=10,100 --repeats=3
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medfed_jax import config as config_lib
from medfed_jax import runner
from medfed_jax.data.synthetic import mnist_like
from medfed_jax.models import make_model
from medfed_jax.server import build_engine, static_config
from medfed_jax.types import FederatedDataset

SAMPLES, BATCH, LR, WIDTHS = 600, 50, 0.05, (200, 200)
LAYERS = [(784, 200), (200, 200), (200, 10)]


def flops_per_round(num_clients: int) -> float:
    """Forward + backward FLOPs of the 2NN over one epoch of every client."""
    forward = sum(2 * i * o for i, o in LAYERS)
    input_grads = sum(2 * i * o for i, o in LAYERS[1:])
    return num_clients * SAMPLES * (2 * forward + input_grads)


def w1_config(parallelism: str, chunk: int):
    cfg = config_lib.default_config()
    cfg.model.name, cfg.model.widths = "mlp", WIDTHS
    cfg.local.epochs, cfg.local.batch_size, cfg.local.lr = 1, BATCH, LR
    cfg.client_parallelism, cfg.client_chunk = parallelism, chunk
    cfg.baselines = ()
    return cfg


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call seconds, median seconds of the next ``repeats`` calls)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def engine_seconds(dataset: FederatedDataset, parallelism: str, chunk: int, rounds: int, repeats: int):
    """Seconds per round of the engine's scanned rounds (``rounds`` per call)."""
    cfg = w1_config(parallelism, chunk)
    prepared = runner.prepare(cfg, dataset)
    engine = build_engine(static_config(cfg), prepared.context)
    train = jax.device_put(dataset.train)
    state = engine.init(0, train, prepared.knobs)
    first, median = timed(lambda: engine.run_rounds(state, train, prepared.knobs, rounds), repeats)
    return (first - median), median / rounds


def loop_reference_seconds(dataset: FederatedDataset, repeats: int):
    """Seconds per round of a jitted per-client update in a Python loop, then averaged."""
    model = make_model("mlp", 10, WIDTHS)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))
    optimizer = optax.sgd(LR)

    @jax.jit
    def client_update(params, x, y, key):
        order = jax.random.permutation(key, x.shape[0])
        batches = (x[order].reshape(-1, BATCH, 784), y[order].reshape(-1, BATCH))

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

    def one_round():
        return average(*[client_update(params, xs[c], ys[c], keys[c]) for c in range(dataset.num_clients)])

    first, median = timed(one_round, repeats)
    return first - median, median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,100,1000")
    parser.add_argument("--strategies", default="vmap,map:1,map:4,map:10,map:25")
    parser.add_argument("--rounds", type=int, default=2, help="rounds per scanned engine call")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(
        f"# W1 round throughput, {datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{jax.device_count()} x {jax.devices()[0].device_kind}, jax {jax.__version__}"
    )
    print("| C | implementation | s/round | GFLOP/s | compile s | loop / this |")
    print("|---|---|---|---|---|---|")
    for num_clients in map(int, args.clients.split(",")):
        dataset = mnist_like(num_clients, SAMPLES, seed=0)
        flops = flops_per_round(num_clients)
        loop_compile, loop = loop_reference_seconds(dataset, args.repeats)
        rows = [("per-client jit, Python loop (reference)", loop_compile, loop)]
        for strategy in args.strategies.split(","):
            parallelism, _, chunk = strategy.partition(":")
            if parallelism == "map" and int(chunk) > num_clients:
                continue
            compile_s, seconds = engine_seconds(dataset, parallelism, int(chunk or 0), args.rounds, args.repeats)
            rows.append((f"engine, {strategy}", compile_s, seconds))
        for name, compile_s, seconds in rows:
            print(
                f"| {num_clients} | {name} | {seconds:.3f} | {flops / seconds / 1e9:.1f} | {compile_s:.1f} | "
                f"{loop / seconds:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
